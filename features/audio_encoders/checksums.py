"""The weights' error type and checksum: a leaf module that both weight sources import."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 22


class WeightsError(RuntimeError):
    """Encoder weights that cannot be used: not installed, or not the file msata pinned."""


def sha256_of(paths: list[Path]) -> str:
    """sha256 of the files' concatenation, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()
