"""Progress of a preprocessing run, read from the feature store by the caller's process.

Nothing unpicklable travels with the flow: the clip tasks run wherever the task
runner puts them (threads, local Dask processes, a remote Dask cluster) and commit
their clips to the store; a thread in the calling process lists the store's
committed clips every ``interval_s`` and reports ``(stored, total)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from storage import FeatureStore, StoreError

ProgressCallback = Callable[[int, int], None]  # (clips of this run stored so far, clips in this run)


def stored_count(store: str, clip_ids: set[str]) -> int:
    """How many of ``clip_ids`` are committed in ``store`` (0 while the store does not exist yet)."""
    try:
        committed = FeatureStore.open(store).clip_ids()
    except StoreError:
        return 0
    return len(clip_ids.intersection(committed))


@contextmanager
def store_progress(store: str, clip_ids: Iterable[str], on_progress: ProgressCallback | None, interval_s: float = 0.5) -> Iterator[None]:
    """Call ``on_progress(stored, total)`` from a polling thread while the body runs, and once at the end."""
    if on_progress is None:
        yield
        return
    wanted = set(clip_ids)
    total = len(wanted)
    stop = threading.Event()

    def poll() -> None:
        last = -1
        while not stop.wait(interval_s):
            count = stored_count(store, wanted)
            if count != last:
                on_progress(count, total)
                last = count

    on_progress(stored_count(store, wanted), total)
    thread = threading.Thread(target=poll, name="msata-store-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        on_progress(stored_count(store, wanted), total)
