"""Reader of CTranslate2 ``model.bin`` files: a plain stream of named raw tensors, no pickle.

Layout (CTranslate2 binary version 6, ``ctranslate2/specs/model_spec.py``), little-endian::

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x ( str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | n_bytes raw data )
    u32 n_aliases | n_aliases x ( str alias | str target )

where ``str`` is ``u16 length`` (including a trailing NUL) then that many bytes. Nothing in
the file is executed: it is parsed into numpy arrays, and a malformed file raises ValueError.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

SUPPORTED_BINARY_VERSIONS = (5, 6)
# CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_MAX_RANK = 8


class _Reader:
    def __init__(self, stream: BinaryIO, where: str) -> None:
        self.stream, self.where = stream, where

    def exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise ValueError(f"{self.where}: truncated CTranslate2 model (wanted {n} bytes, got {len(data)})")
        return data

    def u8(self) -> int:
        return self.exact(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.exact(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.exact(4))[0]

    def string(self) -> str:
        raw = self.exact(self.u16())
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.where}: malformed string in CTranslate2 model")
        return raw[:-1].decode("utf-8")

    def skip(self, n: int) -> None:
        while n > 0:  # plain reads: works on streams that cannot seek
            n -= len(self.exact(min(n, 1 << 20)))


def read_ct2_variables(
    stream: BinaryIO, keep: Callable[[str], bool] = lambda name: True, where: str = "model.bin"
) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) for the variables ``keep`` accepts; others are skipped."""
    reader = _Reader(stream, where)
    version = reader.u32()
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(f"{where}: CTranslate2 binary version {version}, this reader knows {SUPPORTED_BINARY_VERSIONS}")
    spec = reader.string()
    reader.u32()  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.u32()):
        name = reader.string()
        rank = reader.u8()
        if rank > _MAX_RANK:
            raise ValueError(f"{where}: variable {name!r} has rank {rank}")
        shape = tuple(reader.u32() for _ in range(rank))
        dtype_id = reader.u8()
        n_bytes = reader.u32()
        if not keep(name):
            reader.skip(n_bytes)
            continue
        dtype = _DTYPES.get(dtype_id)
        if dtype is None:
            raise ValueError(f"{where}: variable {name!r} has unsupported CTranslate2 dtype id {dtype_id}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n_bytes != expected:
            raise ValueError(f"{where}: variable {name!r} of shape {shape} holds {n_bytes} bytes, expected {expected}")
        variables[name] = np.frombuffer(reader.exact(n_bytes), dtype=dtype).reshape(shape)
    return spec, variables
