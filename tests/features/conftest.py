"""Shared fixtures for feature tests: real synthetic media (encoded once per session) and one MTCNN."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from features.config import FaceConfig
from features.faces import FaceDetector
from features.synthetic import SyntheticClip, make_talking_face_clip


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # MTCNN's small convolutions gain nothing from a second thread on a shared 2-core
    # runner and stall badly when the cores are oversubscribed; restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_clip(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SyntheticClip]:
    """make_clip(name, **kwargs) -> SyntheticClip, encoded once per session per name."""
    root = tmp_path_factory.mktemp("clips")
    cache: dict[str, SyntheticClip] = {}

    def _make(name: str, **kwargs: Any) -> SyntheticClip:
        if name not in cache:
            cache[name] = make_talking_face_clip(root / name, **kwargs)
        return cache[name]

    return _make


@pytest.fixture(scope="session")
def detector() -> FaceDetector:
    return FaceDetector(FaceConfig())


@pytest.fixture(scope="session")
def crema_flvs(shared_data: Path) -> list[Path]:
    flvs = sorted((shared_data / "crema_d_sample" / "VideoFlash").glob("*.flv"))
    if not flvs:
        pytest.skip("no CREMA-D .flv files in the shared data")
    return flvs
