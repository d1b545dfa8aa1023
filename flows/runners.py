"""Task runners for the clip and file tasks: always bounded, and never in the way of a stop.

``task_runner_for(workers, dask_address)``: a remote Dask cluster when an address is
given, local Dask worker processes when ``workers > 1``, else ``workers`` threads
(1 by default). Prefect's own default thread pool has no limit: a flow mapping
over a whole corpus would start one thread per clip.
"""

from __future__ import annotations

from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner


class StoppableThreadPoolTaskRunner(ThreadPoolTaskRunner):
    """A thread pool whose exit on Ctrl-C / SIGTERM does not wait for the running tasks.

    Prefect's ``ThreadPoolTaskRunner`` shuts its executor down with ``wait=True``, so a
    stopped flow only ends when its running clip ends (minutes for a long video).
    Here a stop cancels the queued tasks and returns at once; a running task's thread
    is abandoned (the CLI then ends the process with ``os._exit``). That is safe for
    the feature store: a clip becomes visible only through its final commit, and the
    next run removes the abandoned staging files of a dead process.
    """

    def cancel_all(self) -> None:
        for event in self._cancel_events.values():
            event.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):  # KeyboardInterrupt, TerminationSignal
            self.cancel_all()
        super().__exit__(exc_type, exc_value, traceback)


def validate_workers(workers: int, dask_address: str | None) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if dask_address is not None and not (isinstance(dask_address, str) and "://" in dask_address):
        raise ValueError(f"dask_address must be a scheduler address such as tcp://host:8786, got {dask_address!r}")


def task_runner_for(workers: int = 1, dask_address: str | None = None):
    """Threads locally by default; a Dask cluster (remote address or local processes) otherwise."""
    validate_workers(workers, dask_address)
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        import dask
        from prefect_dask import DaskTaskRunner

        # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's trim
        # threshold and switches off its adaptive mmap threshold: ~1.7 CPU-s more per CREMA-D clip in
        # system time (docs/benchmarks.md). msata trims the heap itself after every chunk of frames
        # (features/faces.py), so msata's own local workers start without it. None unsets it.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

        # Processes, one thread each: MTCNN and librosa are CPU-bound and hold the GIL in places.
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
    return StoppableThreadPoolTaskRunner(max_workers=1)
