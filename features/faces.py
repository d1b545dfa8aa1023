"""Face detection (MTCNN), sparse detection with bounded interpolation, and square face crops.

The box maths (selection, squaring, interpolation, cropping) are pure functions;
:class:`FaceDetector` is the only part that runs MTCNN. Boxes and landmarks are
always in source-frame pixels, even though MTCNN sees frames shrunk to
``FaceConfig.detect_max_side``; crops are cut from the full-resolution frames.

One module of ~500 lines because the detector wrapper, crop geometry and per-frame bookkeeping change together when the face pipeline changes; the MTCNN networks themselves are in mtcnn.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from features.config import FaceConfig
from features.mtcnn import Mtcnn, Window
from features.spill import FrameSpool

# Two detections are joined by interpolation only if they overlap at least this much;
# otherwise (a cut, a different face, a jump) the frames between are detected one by one.
MIN_INTERP_IOU = 0.3
# search="near": the window is the previous face's box grown by this many box sides on each side,
# searched at the pyramid scales whose P-net cell is within NEAR_SIZE_RATIO of the box side; the
# whole frame is searched again every NEAR_REFRESH frames (so a larger face that enters elsewhere
# is taken within a second) and every frame whose window gives no face or one cut by its edge.
NEAR_GROW = 1.0
NEAR_SIZE_RATIO = 2.0
NEAR_REFRESH = 30
NEAR_BATCH = 8  # frames searched at once in one window (267 ms at 30 fps: the window's margin covers the motion)
# search="track": no P-net and no R-net between whole-frame searches. Each frame's face is O-net's on the
# box O-net saw for the previous frame's face, moved and scaled as that face moved (track_input); a frame
# where O-net confirms no face there, or whose face is cut by the frame's edge, is searched whole, and so is
# every TRACK_REFRESH-th frame. (R-net first was measured too: dearer, and further from the full search.)
TRACK_REFRESH = 30


@dataclass
class Detections:
    """One face (or none) per frame, in source pixels."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2; zeros where not found
    landmarks: np.ndarray  # (N, 5, 2) float32; zeros where not found
    probs: np.ndarray  # (N,) float32; 0 where not found
    found: np.ndarray  # (N,) bool

    @classmethod
    def empty(cls, n: int) -> Detections:
        return cls(
            boxes=np.zeros((n, 4), np.float32),
            landmarks=np.zeros((n, 5, 2), np.float32),
            probs=np.zeros(n, np.float32),
            found=np.zeros(n, bool),
        )

    def __len__(self) -> int:
        return len(self.found)

    def take(self, idx: np.ndarray | list[int] | slice) -> Detections:
        return Detections(self.boxes[idx], self.landmarks[idx], self.probs[idx], self.found[idx])


@dataclass
class FaceTrack:
    """Per-frame face results of one video, matching the ClipFeatures video fields."""

    crops: np.ndarray  # (T, S, S, 3) uint8
    times: np.ndarray  # (T,) float64
    mask: np.ndarray  # (T,) bool
    boxes: np.ndarray  # (T, 4) float32
    landmarks: np.ndarray  # (T, 5, 2) float32
    probs: np.ndarray  # (T,) float32
    n_detected: int  # frames MTCNN actually ran on (the rest were interpolated)

    @property
    def face_ratio(self) -> float:
        return float(self.mask.mean()) if len(self.mask) else 0.0


# ----------------------------------------------------------------------------- pure helpers


def select_face(
    boxes: np.ndarray | None, probs: np.ndarray | None, points: np.ndarray | None, min_probability: float
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The largest face with probability >= ``min_probability``, or None.

    boxes (K, 4), probs (K,), points (K, 5, 2) as MTCNN returns them (None when K = 0).
    Filtering before picking the largest keeps a big low-confidence blob from hiding
    a real face.
    """
    if boxes is None or points is None or probs is None or len(boxes) == 0:
        return None
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    p = np.asarray([0.0 if x is None else x for x in np.atleast_1d(probs)], dtype=np.float32)
    keep = np.flatnonzero(p >= min_probability)
    if keep.size == 0:
        return None
    areas = (b[keep, 2] - b[keep, 0]) * (b[keep, 3] - b[keep, 1])
    best = int(keep[np.argmax(areas)])
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 5, 2)
    return b[best], pts[best], float(p[best])


def square_box(box: np.ndarray, margin: float) -> np.ndarray:
    """Square (4,) box with the same centre, side = max(w, h) * (1 + 2 * margin).

    ``margin`` is the context added on each side as a fraction of the box side.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dtype=np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (4,) x1, y1, x2, y2 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def interpolate_faces(t0: float, det0: Detections, t1: float, det1: Detections, times: np.ndarray) -> Detections:
    """Linear interpolation in time between two single-frame detections, both found.

    ``times`` (M,) lie strictly between t0 and t1; probabilities take the lower of the
    two ends, so an interpolated frame never claims more confidence than its anchors.
    """
    if not (det0.found[0] and det1.found[0]):
        raise ValueError("interpolate_faces needs a face at both ends")
    if not t1 > t0:
        raise ValueError(f"interpolation needs t1 > t0, got t0={t0}, t1={t1}")
    w = ((np.asarray(times, np.float64) - t0) / (t1 - t0)).astype(np.float32)  # (M,)
    boxes = (1 - w)[:, None] * det0.boxes[0] + w[:, None] * det1.boxes[0]  # (M, 4)
    lms = (1 - w)[:, None, None] * det0.landmarks[0] + w[:, None, None] * det1.landmarks[0]  # (M, 5, 2)
    probs = np.full(len(w), min(det0.probs[0], det1.probs[0]), np.float32)
    return Detections(boxes.astype(np.float32), lms.astype(np.float32), probs, np.ones(len(w), bool))


def crop_square(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Cut the square ``box`` (4,) out of ``frame`` (H, W, 3) and resize it to (size, size, 3).

    Parts of the box outside the frame are black, so the face stays centred near
    borders. Resizing is PIL's antialiased bilinear.
    """
    h, w = frame.shape[:2]
    x0, y0 = int(round(float(box[0]))), int(round(float(box[1])))
    side = max(1, int(round(float(box[2] - box[0]))))
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    if side == size:
        return canvas
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR))


def crop_faces(frames: np.ndarray, det: Detections, crop_size: int, margin: float) -> np.ndarray:
    """(N, S, S, 3) uint8 crops; black where no face was found."""
    crops = np.zeros((len(det), crop_size, crop_size, 3), dtype=np.uint8)
    for i in np.flatnonzero(det.found):
        crops[i] = crop_square(frames[i], square_box(det.boxes[i], margin), crop_size)
    return crops


def near_window(prior: np.ndarray, scales: list[float], width: int, height: int) -> Window | None:
    """Where to look for the face that was at ``prior`` (4,) in the frame before, in a width x height
    detection image: None when no pyramid scale fits its size (then the whole frame is searched)."""
    side = max(float(prior[2] - prior[0]), float(prior[3] - prior[1]), 1.0)
    cx, cy = (prior[0] + prior[2]) / 2, (prior[1] + prior[3]) / 2
    cell = 12.0  # P-net's window: at scale s it finds faces of about 12 / s detection pixels
    near = tuple(s for s in scales if side / NEAR_SIZE_RATIO <= cell / s <= side * NEAR_SIZE_RATIO)
    if not near:
        return None
    half = side * (0.5 + NEAR_GROW)
    return Window(near, max(0.0, cx - half), max(0.0, cy - half), min(float(width), cx + half), min(float(height), cy + half))


def track_input(onet_input: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The square box (4,) O-net should see next: ``onet_input`` (4,), which gave the face ``after`` (4,),
    moved by the shift of the face's centre from ``before`` (4,, the frame before's face) and scaled as its
    longer side, so the box follows the face without re-estimating it from O-net's output."""
    shift = (after[:2] + after[2:]) / 2 - (before[:2] + before[2:]) / 2
    ratio = float(max(after[2] - after[0], after[3] - after[1])) / max(float(max(before[2] - before[0], before[3] - before[1])), 1e-6)
    centre = (onet_input[:2] + onet_input[2:]) / 2 + shift
    half = float(onet_input[2] - onet_input[0]) * ratio / 2
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], np.float32)


def within_frame(box: np.ndarray, width: int, height: int) -> bool:
    """Whether ``box`` (4,) lies wholly inside a width x height image (a face cut by its edge does not)."""
    return bool(box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height)


def inside(box: np.ndarray, window: Window, width: int, height: int) -> bool:
    """Whether ``box`` lies within ``window``, edges of the image excepted (a box may pass those)."""
    return bool(
        (box[0] >= window.x0 or window.x0 <= 0)
        and (box[1] >= window.y0 or window.y0 <= 0)
        and (box[2] <= window.x1 or window.x1 >= width)
        and (box[3] <= window.y1 or window.y1 >= height)
    )


def downscale(frames: np.ndarray, max_side: int) -> tuple[torch.Tensor, float, float]:
    """Shrink (N, H, W, 3) uint8 frames so the longest side is <= max_side.

    Returns (N, h, w, 3) uint8 tensor and the (sx, sy) factors mapping small -> source
    pixels. Antialiased bilinear on uint8 channels-last is torch's fast path.
    """
    n, h, w = frames.shape[:3]
    x = torch.from_numpy(np.ascontiguousarray(frames))  # (N, H, W, 3)
    if max(h, w) <= max_side:
        return x, 1.0, 1.0
    scale = max_side / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(x.permute(0, 3, 1, 2), size=(sh, sw), mode="bilinear", antialias=True)  # (N, 3, h, w)
    return small.permute(0, 2, 3, 1).contiguous(), w / sw, h / sh


# ----------------------------------------------------------------------------- MTCNN


class FaceDetector:
    """MTCNN face detector plus the sparse-detection tracker used for whole videos.

    ``max_interp_gap`` bounds how many frames may ever be filled in by interpolation
    between two detections; a ``detect_every`` that would need more is refused.
    """

    def __init__(
        self,
        config: FaceConfig,
        device: str | torch.device = "cpu",
        max_interp_gap: int = 7,
        batch_size: int = 32,
    ) -> None:
        if config.detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {config.detect_every}")
        if config.detect_every - 1 > max_interp_gap:
            raise ValueError(
                f"detect_every={config.detect_every} would interpolate across {config.detect_every - 1} frames; "
                f"at most max_interp_gap={max_interp_gap} are allowed"
            )
        self.config = config
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.mtcnn = Mtcnn(config.min_face_size, self.device)
        self._prior: np.ndarray | None = None  # search="near"/"track": the last face, in detection pixels
        self._prior_input: np.ndarray | None = None  # search="track": the box O-net saw for that face
        self._since_full = 0  # frames since the whole frame was last searched

    def detect(self, frames: np.ndarray) -> Detections:
        """Run MTCNN on every frame of (N, H, W, 3) uint8 RGB, each frame on its own; results in source pixels."""
        out = Detections.empty(len(frames))
        for start in range(0, len(frames), self.batch_size):
            part = frames[start : start + self.batch_size]
            small, sx, sy = downscale(part, self.config.detect_max_side)
            for i, found in enumerate(self.mtcnn.detect(small.to(self.device))):
                self._record(out, start + i, self._select(found), sx, sy)
        return out

    def detect_sequence(self, frames: np.ndarray) -> Detections:
        """Like :meth:`detect` for consecutive frames of one video; with search="near" each group of
        NEAR_BATCH frames is searched near the last face of the group before (state carried over
        from the previous call), and a frame whose face is not found there is searched whole."""
        if self.config.search == "full":
            return self.detect(frames)
        if self.config.search == "track":
            return self._detect_tracked(frames)
        out = Detections.empty(len(frames))
        for start in range(0, len(frames), NEAR_BATCH):
            part = frames[start : start + NEAR_BATCH]
            small, sx, sy = downscale(part, self.config.detect_max_side)
            small = small.to(self.device)
            h, w = small.shape[1:3]
            faces: list[tuple[np.ndarray, np.ndarray, float] | None] = [None] * len(part)
            rest = list(range(len(part)))
            if self._prior is None or self._since_full >= NEAR_REFRESH:
                faces[0] = self._select(self.mtcnn.detect(small[:1])[0])  # the whole frame, then near it
                self._since_full, rest = 0, rest[1:]
                self._prior = None if faces[0] is None else faces[0][0]
            window = near_window(self._prior, self.mtcnn.scales(h, w), w, h) if self._prior is not None else None
            if window is not None and rest:
                for i, found in zip(rest, self.mtcnn.detect(small[rest[0] :], window), strict=True):
                    faces[i] = self._select(found)
                rest = [i for i in rest if faces[i] is None or not inside(faces[i][0], window, w, h)]
            if rest:  # no face near the last one (or none to start from): the whole frame
                for i, found in zip(rest, self.mtcnn.detect(small[rest]), strict=True):
                    faces[i] = self._select(found)
            for i, face in enumerate(faces):
                self._record(out, start + i, face, sx, sy)
            self._since_full += len(part)
            self._prior = None if faces[-1] is None else faces[-1][0]
        return out

    def _detect_tracked(self, frames: np.ndarray) -> Detections:
        """search="track": each frame's face from O-net alone on the box it saw for the previous frame's face
        (track_input); the whole frame where there is no previous face, where O-net confirms none there or
        the face is cut by the frame's edge, and every TRACK_REFRESH frames. State carries over between calls."""
        out = Detections.empty(len(frames))
        for start in range(0, len(frames), self.batch_size):
            part = frames[start : start + self.batch_size]
            small, sx, sy = downscale(part, self.config.detect_max_side)
            small = small.to(self.device)
            h, w = small.shape[1:3]
            for i in range(len(part)):
                face = None
                if self._prior is not None and self._prior_input is not None and self._since_full < TRACK_REFRESH:
                    face, onet_input = self._select_with_input(self.mtcnn.confirm(small[i], self._prior_input[None]))
                    if face is not None and not within_frame(face[0], w, h):
                        face = None
                    if face is not None:
                        onet_input = track_input(self._prior_input, self._prior, face[0])
                if face is None:  # nothing to track, nothing confirmed, or time for a whole-frame search
                    face, onet_input = self._select_with_input(self.mtcnn.detect_with_inputs(small[i : i + 1])[0])
                    self._since_full = 0
                self._record(out, start + i, face, sx, sy)
                self._since_full += 1
                self._prior, self._prior_input = (None, None) if face is None else (face[0], onet_input)
        return out

    def _select_with_input(self, found: tuple[np.ndarray, np.ndarray, np.ndarray]):
        """(face as _select gives it, the box O-net saw for it), or (None, None)."""
        boxes, points, inputs = found
        face = select_face(boxes[:, :4], boxes[:, 4], points, self.config.min_probability)
        if face is None:
            return None, None
        k = int(np.flatnonzero((boxes[:, :4] == face[0]).all(1))[0])  # select_face returns that very row
        return face, inputs[k]

    def _select(self, found: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, float] | None:
        boxes, points = found  # (K, 5) with the probability last, (K, 5, 2)
        return select_face(boxes[:, :4], boxes[:, 4], points, self.config.min_probability)

    @staticmethod
    def _record(out: Detections, j: int, face: tuple[np.ndarray, np.ndarray, float] | None, sx: float, sy: float) -> None:
        if face is None:
            return
        box, lm, prob = face
        scale = np.array([sx, sy], dtype=np.float32)
        out.boxes[j] = box * np.tile(scale, 2)
        out.landmarks[j] = lm * scale
        out.probs[j] = prob
        out.found[j] = True

    def track(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], spill_dir: str | None = None) -> FaceTrack:
        """Faces for a stream of (frames (N, H, W, 3), times (N,)) chunks, e.g. from iter_video_frames.

        MTCNN runs on frames 0, k, 2k, ... and the last frame (k = detect_every). The
        frames between two anchors are interpolated only when both anchors found
        overlapping faces (IoU >= MIN_INTERP_IOU); otherwise they are detected one by
        one, so a missed or jumping face is never papered over. Only the frames since
        the last anchor are held back, so memory stays bounded by chunk + k frames; the
        crops kept go to a nameless file in ``spill_dir`` once they pass spill.SPILL_BYTES
        (then ``crops`` is a read-only memmap), so they do not grow memory with the clip either.
        """
        k = self.config.detect_every
        self._prior, self._prior_input, self._since_full = None, None, 0  # a new video: no face to search near yet
        acc = _Accumulator(self.config.crop_size, spill_dir)
        try:
            anchor: tuple[float, Detections] | None = None
            pending_frames: list[np.ndarray] = []
            pending_times: list[float] = []
            index = 0
            for frames, times in chunks:
                is_anchor = (index + np.arange(len(frames))) % k == 0  # (N,)
                dets = self.detect_sequence(frames if k == 1 else frames[is_anchor])
                acc.n_detected += int(is_anchor.sum())
                d = 0
                for i in range(len(frames)):
                    if not is_anchor[i]:
                        # Copy so a held-back frame does not pin its whole chunk in memory.
                        pending_frames.append(frames[i].copy())
                        pending_times.append(float(times[i]))
                        continue
                    current = (float(times[i]), dets.take(slice(d, d + 1)))
                    d += 1
                    self._resolve(anchor, pending_frames, pending_times, current, acc)
                    acc.add(frames[i : i + 1], times[i : i + 1], current[1], self.config)
                    anchor, pending_frames, pending_times = current, [], []
                index += len(frames)
                _release_free_heap()
            if pending_frames:  # the stream ended between anchors: the last frame becomes one
                last_frame, last_time = pending_frames.pop(), pending_times.pop()
                current = (last_time, self.detect_sequence(last_frame[None]))
                acc.n_detected += 1
                self._resolve(anchor, pending_frames, pending_times, current, acc)
                acc.add(last_frame[None], np.array([last_time]), current[1], self.config)
            return acc.finish()
        except BaseException:
            acc.discard()  # a spilled clip's file goes now, not when the traceback is freed
            raise

    def _resolve(
        self,
        anchor: tuple[float, Detections] | None,
        frames: list[np.ndarray],
        times: list[float],
        current: tuple[float, Detections],
        acc: _Accumulator,
    ) -> None:
        """Fill in the frames held back between ``anchor`` and ``current``."""
        if not frames:
            return
        if anchor is None:
            raise RuntimeError("frames were held back before the first anchor")
        stack = np.stack(frames)  # (M, H, W, 3)
        t = np.asarray(times, np.float64)
        (t0, d0), (t1, d1) = anchor, current
        if d0.found[0] and d1.found[0] and box_iou(d0.boxes[0], d1.boxes[0]) >= MIN_INTERP_IOU:
            det = interpolate_faces(t0, d0, t1, d1, t)
        else:
            det = self.detect(stack)
            acc.n_detected += len(stack)
        acc.add(stack, t, det, self.config)


def _libc_malloc_trim():  # -> the C function, or None off glibc
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``).

    Each chunk frees frame-sized buffers (decoded frames, their downscaled copies, crop
    canvases) while the crops it keeps are small and long-lived. glibc serves the
    mid-sized buffers from its heap once a large block has been freed (its mmap threshold
    adapts upwards), and the kept crops pin that heap, so without this the resident set
    grew by ~0.3 MB per frame (measured on 1080p clips) although the live Python/numpy
    memory grows only by the crops (27.6 KB per frame at 96 px).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Accumulator:
    """Collects per-frame results in order; only crops are kept, never frames.

    Crops go to a FrameSpool (in memory up to spill.SPILL_BYTES, then a nameless file). The small
    per-frame arrays (times, boxes, landmarks, probabilities: 69 bytes a frame) stay in memory, joined
    every COMPACT_EVERY additions: kept one piece per frame, their Python objects cost ~1 KB a frame.
    """

    COMPACT_EVERY = 1024

    def __init__(self, crop_size: int, spill_dir: str | None = None) -> None:
        self.crops = FrameSpool((crop_size, crop_size, 3), np.uint8, directory=spill_dir)
        self.parts: list[tuple[np.ndarray, Detections]] = []
        self.n_detected = 0

    def add(self, frames: np.ndarray, times: np.ndarray, det: Detections, config: FaceConfig) -> None:
        self.crops.append(crop_faces(frames, det, config.crop_size, config.margin))
        self.parts.append((np.asarray(times, np.float64), det))
        if len(self.parts) >= self.COMPACT_EVERY:
            self.parts = [self._joined()]

    def _joined(self) -> tuple[np.ndarray, Detections]:
        return np.concatenate([p[0] for p in self.parts]), Detections(
            boxes=np.concatenate([p[1].boxes for p in self.parts]),
            landmarks=np.concatenate([p[1].landmarks for p in self.parts]),
            probs=np.concatenate([p[1].probs for p in self.parts]),
            found=np.concatenate([p[1].found for p in self.parts]),
        )

    def discard(self) -> None:
        self.crops.close()
        self.parts = []

    def finish(self) -> FaceTrack:
        crops = self.crops.array()
        if not self.parts:
            return FaceTrack(
                crops=crops,
                times=np.zeros(0, np.float64),
                mask=np.zeros(0, bool),
                boxes=np.zeros((0, 4), np.float32),
                landmarks=np.zeros((0, 5, 2), np.float32),
                probs=np.zeros(0, np.float32),
                n_detected=0,
            )
        times, det = self._joined()
        return FaceTrack(
            crops=crops, times=times, mask=det.found, boxes=det.boxes, landmarks=det.landmarks, probs=det.probs, n_detected=self.n_detected
        )
