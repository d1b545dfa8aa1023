"""Per-frame arrays whose length grows with the clip: in memory up to a bound, then in a nameless file.

A clip's face crops (27.6 KB per frame at 96 px) are the one extraction output that grows with the
clip's length without bound: 10 minutes at 30 fps is ~500 MB, held twice while the per-chunk pieces
are joined. :class:`FrameSpool` keeps them in memory while they are small (every CREMA-D or RAVDESS
clip: the stored features are then exactly today's) and past ``SPILL_BYTES`` moves them to a
temporary file, handing back a read-only ``np.memmap`` over it: an ``np.ndarray`` for every reader,
whose pages the kernel reads in only when touched (the feature store writes it a slice at a time and
drops each slice's pages again, storage/feature_store.py).

The file is nameless (``tempfile.TemporaryFile``: O_TMPFILE on Linux, created then unlinked at once
elsewhere), so nothing has to be deleted after the commit or a failure and nothing is left behind
when the process is killed: its blocks are freed when the last reference to the mapping goes away.
"""

from __future__ import annotations

import tempfile
from typing import BinaryIO

import numpy as np

# In-memory bound of one spool: 64 MiB, the bound decode already puts on a chunk of frames
# (decode.MAX_CHUNK_BYTES), so a clip's crops never take more memory than one chunk of its frames.
# At 96 px that is 2,431 crops (81 s at 30 fps): every clip of CREMA-D (~2-5 s) and RAVDESS (~4 s)
# stays in memory, and only long recordings go to disk. Read when a spool is created, so a test or
# a bench can change it.
SPILL_BYTES = 64 * 2**20


class FrameSpool:
    """Append-only (N, *frame_shape) array of one dtype; ``array()`` returns all of it at once.

    ``limit`` (bytes, default SPILL_BYTES) bounds what is held in memory; once exceeded, what was
    held and everything after goes to a nameless temporary file in ``directory`` (default: the
    system's temporary directory, $TMPDIR). Call ``array()`` once at the end, or ``close()`` to
    give up (idempotent; after ``array()`` it does nothing, the mapping owns the file).
    """

    def __init__(
        self, frame_shape: tuple[int, ...], dtype: np.dtype | type, limit: int | None = None, directory: str | None = None
    ) -> None:
        self.frame_shape, self.dtype = tuple(frame_shape), np.dtype(dtype)
        self.limit = SPILL_BYTES if limit is None else int(limit)
        if self.limit < 0:
            raise ValueError(f"FrameSpool limit must be >= 0 bytes, got {self.limit}")
        self.directory = directory
        self._parts: list[np.ndarray] = []
        self._held = 0  # bytes in _parts
        self._file: BinaryIO | None = None
        self._frames = 0
        self._done = False
        self._spilled = False

    @property
    def spilled(self) -> bool:
        """Whether the frames went to disk (then ``array()`` is a memmap)."""
        return self._spilled

    def __len__(self) -> int:
        return self._frames

    def append(self, block: np.ndarray) -> None:
        """Add ``block`` (n, *frame_shape) of this spool's dtype; it is copied to disk or kept as given."""
        if self._done:
            raise RuntimeError("FrameSpool.append after array() or close()")
        if block.shape[1:] != self.frame_shape or block.dtype != self.dtype:
            raise ValueError(f"FrameSpool of {self.frame_shape} {self.dtype} frames got a block {block.shape} {block.dtype}")
        if self._file is None and self._held + block.nbytes > self.limit:
            self._spill()
        if self._file is not None:
            self._file.write(np.ascontiguousarray(block).data)
        else:
            self._parts.append(block)
            self._held += block.nbytes
        self._frames += len(block)

    def _spill(self) -> None:
        self._file = tempfile.TemporaryFile(dir=self.directory, prefix="msata-spill-")
        self._spilled = True
        try:
            for part in self._parts:
                self._file.write(np.ascontiguousarray(part).data)
        except BaseException:
            self.close()
            raise
        self._parts, self._held = [], 0

    def array(self) -> np.ndarray:
        """All frames appended, (N, *frame_shape): an in-memory array, or a read-only np.memmap once spilled."""
        if self._done:
            raise RuntimeError("FrameSpool.array called twice, or after close()")
        self._done = True
        if self._file is None:
            if not self._parts:
                return np.zeros((0, *self.frame_shape), self.dtype)
            parts, self._parts = self._parts, []
            return np.concatenate(parts)
        try:
            self._file.flush()
            # The mapping holds its own duplicate of the descriptor, so the file object can go now.
            return np.memmap(self._file, dtype=self.dtype, mode="r", shape=(self._frames, *self.frame_shape))
        finally:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Drop whatever was appended (the failure path): the file's blocks are freed as it closes."""
        self._done = True
        self._parts, self._held = [], 0
        if self._file is not None:
            self._file.close()
            self._file = None
