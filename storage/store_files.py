"""File primitives of the feature store: atomic publish on a local disk, plain fsspec elsewhere.

Every path handled here is absolute inside the store (``StoreFiles.join``). Work in
progress lives in ``_staging/`` under names ``label~host~pid~unix_time~random`` so a
later process can tell the leftovers of a dead writer from a live writer's files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

STAGING = "_staging"

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The path is not a usable feature store, or the store refuses the operation."""


class ConfigMismatchError(StoreError):
    """The store exists with another feature-config hash."""


def staging_name(label: str) -> str:
    return f"{label[:100]}~{socket.gethostname()}~{os.getpid()}~{int(time.time())}~{uuid.uuid4().hex[:8]}"


def is_stale_staging(name: str, stale_after_s: float) -> bool:
    """True for a staging entry whose writer is dead (same host) or that is older than ``stale_after_s``."""
    parts = name.rsplit("~", 4)
    if len(parts) != 5 or not (parts[2].isdigit() and parts[3].isdigit()):
        return False  # not written by a FeatureStore: leave it alone
    _, host, pid, started, _ = parts
    if time.time() - int(started) > stale_after_s:
        return True
    return host == socket.gethostname() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class StoreFiles:
    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self.local = isinstance(fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *[p for p in parts if p]])

    def staging_path(self, label: str) -> str:
        return self.join(STAGING, staging_name(label))

    def exists(self, path: str) -> bool:
        return os.path.exists(path) if self.local else self.fs.exists(path)

    def names(self, folder: str) -> list[str]:
        """Entry names of a folder of the store ('' = root); [] when it does not exist."""
        path = self.join(folder)
        try:
            if self.local:
                return os.listdir(path)
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def cat_many(self, paths: list[str]) -> list[bytes]:
        """Contents of the files that still exist (a failure row may be cleared meanwhile)."""
        if not paths:
            return []
        if not self.local:
            found = self.fs.cat(paths, on_error="omit")  # one batched request, concurrent on async back ends
            return [found[p] for p in paths if p in found]
        out = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    out.append(handle.read())
            except FileNotFoundError:
                continue
        return out

    def write_file(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Make ``path`` appear with ``data`` in one step; ``exclusive`` keeps an existing file."""
        if not self.local:
            if not (exclusive and self.fs.exists(path)):
                self.fs.pipe_file(path, data)  # a single PUT: atomic on object stores
            return
        tmp = self.staging_path("tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails when it exists: the first creator wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)

    def remove(self, path: str) -> None:
        """Delete a file or a tree; no-op when absent."""
        if self.local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def discard(self, stage: str) -> None:
        """Best-effort removal of a failed write's staging dir, never masking the original error.

        When one chunk write fails, zarr's other in-flight chunk writes still land for a
        few milliseconds, so a first rmtree can race them; leftovers are invisible anyway
        and a later create() removes them once their writer is gone.
        """
        for attempt in range(4):
            try:
                self.remove(stage)
                return
            except OSError as err:
                last = err
                time.sleep(0.05 * (attempt + 1))
        log.warning("could not remove staging dir %s (%s); a later create() will", stage, last)

    def move_dir(self, stage: str, target: str, committed: Callable[[], bool]) -> bool:
        """Move a finished staged dir to ``target``; False when ``committed()`` says another writer won.

        A ``target`` that exists while ``committed()`` is False is an orphan of a writer
        killed between its move and its commit marker; it is replaced.
        """
        if not self.local:
            if committed():
                return False
            self.remove(target)
            self.fs.mv(stage, target, recursive=True)
            return True
        for _ in range(5):
            try:
                os.rename(stage, target)
                return True
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if committed():
                return False
            aside = self.staging_path("orphan")  # rename aside first: deleting in place could race a reader
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue  # another writer moved it first
            shutil.rmtree(aside)
        raise StoreError(f"could not publish {stage} to {target}: the target keeps reappearing")

    def zarr_store(self, path: str, read_only: bool) -> zarr.abc.store.Store:
        if self.local:
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_mapper(self.fs.get_mapper(path), read_only=read_only)

    def clean_staging(self, stale_after_s: float) -> None:
        for name in self.names(STAGING):
            if is_stale_staging(name, stale_after_s):
                try:
                    self.remove(self.join(STAGING, name))
                except FileNotFoundError:
                    continue  # another create() cleaned it concurrently
