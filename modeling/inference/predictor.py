"""Inference for media files: clip-level emotion, class probabilities and a timeline.

``load_predictor(model)`` loads a checkpoint file (or a training folder holding
``best.pt``, or a local MLflow model folder) or an MLflow model URI
(``models:/msata-crema-d@champion``, ``models:/name/3``, ``runs:/<id>/model``),
with the feature config the model was trained with. ``Predictor.predict_file``
then decodes one file with ``features.extract.extract_clip`` (one MTCNN detector
per predictor) and runs the model on:

* the clip: the whole clip in one example, as validation scored it, when it is at
  most ``clip_max_s`` long (twice the training crop, the checkpoint's
  ``train_config.max_duration_s``); a longer clip gets the mean of the class
  probabilities of training-crop windows with 50 % overlap, so attention never spans
  far more than the model was trained and selected on;
* the timeline: windows of ``window_s`` every ``hop_s`` seconds, cut at the same
  instants in both streams with the training cropping code
  (``modeling.data.examples.features_to_example``: frames whose times fall in
  ``[t0, t1)``, times re-based to ``t0``), batched through the model.

Features are extracted once per file; windows only slice them. Batches of windows
are padded, and padding is masked everywhere in the model, so a window gets the
same probabilities alone or in a batch.

One module of ~440 lines because the Predictor's steps (features from the recorded config, windows, batching, speaker statistics) share its state; per-file results and the plot live in predictions.py and timeline_plot.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from features.clip import ClipError, ClipFeatures
from features.config import FeatureConfig
from features.manifest import ClipRecord
from features.recipes.folder import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS, clip_id_for
from modeling.data.examples import features_to_example
from modeling.inference.model_source import resolve_checkpoint
from modeling.inference.predictions import FaceTrace, FilePrediction, Thumbnail, WindowPrediction
from modeling.network.batch import collate
from modeling.network.encoder import MsataModel
from modeling.network.precision import autocast

if TYPE_CHECKING:
    from features.decode import MediaInfo

MODALITIES = ("audio", "video")
DEFAULT_CROP_S = 4.0  # TrainConfig.max_duration_s default, for checkpoints without a train_config
# Validation scores whole clips (CREMA-D / RAVDESS: up to ~5 s with 4 s training crops), so
# the model is known to do well on clips up to about twice its crop length; beyond that a
# clip is averaged over crop-length windows instead of attending over all of it at once.
WHOLE_CLIP_FACTOR = 2.0
_EPS = 1e-6
# End of a window that reaches the clip's end: frame times can sit a hair past the declared
# duration (codec padding). Finite on purpose: features_to_example reads an infinite end
# as "the whole clip" and would ignore the window's start.
_OPEN_END = 1e9
_VIDEO_FIELDS = ("face_crops", "face_blendshapes", "video_times", "face_mask", "face_boxes", "face_landmarks", "face_probs")


def check_window(window_s: float, hop_s: float) -> None:
    if not (window_s > 0 and hop_s > 0 and math.isfinite(window_s) and math.isfinite(hop_s)):
        raise ValueError(f"window_s and hop_s must be finite and > 0, got window_s={window_s}, hop_s={hop_s}")


def sliding_windows(duration_s: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """[t0, t1) windows of ``window_s`` every ``hop_s`` covering ``[0, duration_s]``.

    A clip no longer than one window gives the single window ``(0, duration_s)``.
    When the regular hops leave a tail uncovered, the last window is aligned to the
    end of the clip (its start is then off the hop grid): it replaces the last
    regular window when the tail is under half a hop, so that no two windows nearly
    coincide, and is added after it otherwise.
    """
    check_window(window_s, hop_s)
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s must be a positive number, got {duration_s}")
    if duration_s <= window_s + _EPS:
        return [(0.0, float(duration_s))]
    n = int(math.floor((duration_s - window_s) / hop_s + _EPS)) + 1
    starts = [round(i * hop_s, 6) for i in range(n)]
    tail = duration_s - (starts[-1] + window_s)
    if tail > _EPS:
        if tail < hop_s / 2 and len(starts) > 1:
            starts.pop()
        starts.append(round(duration_s - window_s, 6))
    return [(s, round(s + window_s, 6)) for s in starts]


def record_for_file(path: str | Path, use_audio: bool = True, use_video: bool = True) -> tuple[ClipRecord, list[str]]:
    """A ClipRecord for one media file, from its extension and the streams ffprobe finds.

    Video containers read both streams from the file (a silent video has none of
    audio); audio containers are audio-only. Returns the record and notes about
    what is not used. Raises ClipError naming the file when it is missing, of an
    unsupported type, unreadable, or has no stream the model can use.
    """
    record, notes, _ = inspect_file(path, use_audio, use_video)
    return record, notes


def inspect_file(path: str | Path, use_audio: bool = True, use_video: bool = True) -> tuple[ClipRecord, list[str], MediaInfo]:
    """:func:`record_for_file` and the file's ffprobe result, which ``extract_clip(..., probed=...)`` reuses
    (one ffprobe per predicted file instead of two)."""
    from features.decode import probe

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in VIDEO_EXTENSIONS | AUDIO_EXTENSIONS:
        known = ", ".join(sorted(VIDEO_EXTENSIONS | AUDIO_EXTENSIONS))
        raise ClipError(f"{p}: unsupported file type {suffix or '(no extension)'!r}; expected one of {known}")
    info = probe(p)  # ClipError for missing, empty or unreadable files
    has_audio = info.has_audio
    has_video = info.has_video and suffix in VIDEO_EXTENSIONS  # cover art in audio files is not video
    notes: list[str] = []
    if has_video and not has_audio:
        notes.append("the file has no audio stream: the prediction uses the video only")
    if has_video and not use_video:
        notes.append("the model was trained without video: only the audio is used")
        has_video = False
    if has_audio and not use_audio:
        notes.append("the model was trained without audio: only the video is used")
        has_audio = False
    if not has_audio and not has_video:
        streams = [s for s, ok in (("audio", info.has_audio), ("video", info.has_video)) if ok] or ["none"]
        raise ClipError(f"{p}: no stream the model can use (file has: {', '.join(streams)})")
    record = ClipRecord(
        clip_id=clip_id_for(p.name),
        dataset="predict",
        speaker="unknown",
        label="",
        audio_path=str(p) if has_audio else None,
        video_path=str(p) if has_video else None,
    )
    return record, notes, info


def pick_thumbnails(features: ClipFeatures, n: int) -> list[Thumbnail]:
    """Up to ``n`` face crops evenly spread over the frames where a face was found."""
    if n <= 0 or features.face_crops is None or features.video_times is None:
        return []
    mask = np.ones(len(features.face_crops), bool) if features.face_mask is None else np.asarray(features.face_mask, bool)
    found = np.flatnonzero(mask)
    if found.size == 0:
        return []
    picks = np.unique(found[np.linspace(0, found.size - 1, min(n, found.size)).round().astype(int)])
    return [Thumbnail(float(features.video_times[i]), np.array(features.face_crops[i])) for i in picks]


def face_trace(features: ClipFeatures, n_blendshapes: int = 4) -> FaceTrace | None:
    """The face features to draw under the class probabilities; None without faces.

    Blendshapes: the ``n_blendshapes`` scores with the largest standard deviation over the
    frames with a face, i.e. the expressions that change in this clip (a constant score says
    nothing about when an emotion shows). Crops: the detector's probability, 0 where no face."""
    if features.video_times is None or features.face_mask is None or not np.any(features.face_mask):
        return None
    mask = np.asarray(features.face_mask, bool)  # (Tv,)
    times = np.asarray(features.video_times, np.float64)
    if features.face_blendshapes is not None:
        from features.face_landmarks import BLENDSHAPE_NAMES

        scores = np.asarray(features.face_blendshapes, np.float32)  # (Tv, 52)
        moving = np.argsort(-scores[mask].std(axis=0), kind="stable")[:n_blendshapes]  # most-moving first
        values = scores[:, moving].copy()  # (Tv, K)
        values[~mask] = np.nan  # a gap, not a drop to 0: no face is not a neutral face
        return FaceTrace(times, values, [BLENDSHAPE_NAMES[i] for i in moving], "blendshapes")
    if features.face_probs is not None and len(features.face_probs) == len(mask):  # features cut by hand may keep stale probs
        probs = np.where(mask, np.asarray(features.face_probs, np.float32), 0.0)[:, None]  # (Tv, 1)
    else:
        probs = mask.astype(np.float32)[:, None]
    return FaceTrace(times, probs.astype(np.float32), ["face probability"], "face probability")


def _frame_count(times: np.ndarray | None, mask: np.ndarray | None, t0: float, t1: float) -> int:
    if times is None:
        return 0
    inside = (times >= t0) & (times < t1)
    return int(np.sum(inside & mask)) if mask is not None else int(np.sum(inside))


class Predictor:
    """A trained model with its feature config, ready to predict files.

    ``modalities``: the streams the model was trained on; others are not fed to it.
    ``clip_max_s``: longest clip predicted in one piece; longer clips get the mean over
    windows of ``clip_window_s`` (the training crop) with 50 % overlap.
    """

    def __init__(
        self,
        model: MsataModel,
        feature_config: FeatureConfig,
        label_names: Sequence[str],
        device: torch.device,
        modalities: Sequence[str] = MODALITIES,
        clip_max_s: float = WHOLE_CLIP_FACTOR * DEFAULT_CROP_S,
        clip_window_s: float = DEFAULT_CROP_S,
        batch_size: int = 32,
        n_thumbnails: int = 6,
        min_face_ratio: float = 0.5,
        source: str = "",
        speaker_norm: bool = False,
    ) -> None:
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities={list(modalities)}; expected a non-empty subset of {MODALITIES}")
        if clip_max_s <= 0 or clip_window_s <= 0 or batch_size < 1:
            raise ValueError(
                f"clip_max_s and clip_window_s must be > 0 and batch_size >= 1, got {clip_max_s}, {clip_window_s}, {batch_size}"
            )
        self.model = model.to(device).eval()
        self.feature_config = feature_config
        self.label_names = list(label_names)
        self.device = device
        # A stream the store held but the model was built without (the audio-only / video-only
        # ablations) is not even decoded.
        self.modalities = tuple(m for m in MODALITIES if m in modalities and m in model.config.modalities)
        if not self.modalities:
            raise ValueError(
                f"the model reads {list(model.config.modalities)} but was trained on a store holding {list(modalities)}: nothing to feed it"
            )
        self.clip_max_s = float(clip_max_s)
        self.clip_window_s = float(clip_window_s)
        self.batch_size = batch_size
        self.n_thumbnails = n_thumbnails
        self.min_face_ratio = min_face_ratio
        self.source = source
        self.speaker_norm = speaker_norm  # trained with per-speaker statistics: predict_files takes its files as one speaker
        encoder = feature_config.audio_encoder
        if "audio" in self.modalities and not encoder.is_log_mel:
            from features.audio_encoders.stage import check_encoder_weights

            check_encoder_weights(encoder)  # one-line WeightsError (package to install, checkpoint changed) before any file
        self._detector: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], device: str | torch.device = "auto", source: str = "", **kwargs: Any) -> Predictor:
        """Build from a loaded checkpoint dict (``modeling.training.checkpoint.load_checkpoint``)."""
        from modeling.training.checkpoint import model_from_checkpoint
        from modeling.training.train_loop import resolve_device

        resolved = resolve_device(device) if isinstance(device, str) else device
        model = model_from_checkpoint(payload, resolved, source)
        label_names = list(payload["label_names"])
        train_config = payload.get("train_config") or {}
        kwargs.setdefault("modalities", payload.get("modalities") or train_config.get("modalities") or MODALITIES)
        crop_s = float(train_config.get("max_duration_s") or DEFAULT_CROP_S)
        kwargs.setdefault("clip_window_s", crop_s)
        kwargs.setdefault("clip_max_s", WHOLE_CLIP_FACTOR * crop_s)
        kwargs.setdefault("speaker_norm", bool(train_config.get("speaker_norm", False)))
        return cls(model, FeatureConfig.from_dict(payload["feature_config"]), label_names, resolved, source=source, **kwargs)

    def detector(self) -> Any:
        """The FaceDetector, created on first use and shared by all files (MTCNN loads once).
        None for blendshape models: extraction runs MediaPipe's FaceLandmarker instead (features.extract)."""
        if self.feature_config.face.representation != "crops":
            return None
        with self._lock:
            if self._detector is None:
                from features.faces import FaceDetector

                self._detector = FaceDetector(self.feature_config.face, device=self.device)
            return self._detector

    def predict_file(self, path: str | Path, window_s: float = 2.0, hop_s: float = 0.5) -> FilePrediction:
        """Predict one media file. Raises ClipError (a ValueError) naming the file when it
        cannot be used; :func:`predict_files` turns that into the file's ``error``."""
        check_window(window_s, hop_s)  # before decoding anything
        features, warnings = self.extract(path)
        return self.predict_features(features, str(path), window_s, hop_s, warnings)

    def extract(self, path: str | Path) -> tuple[ClipFeatures, list[str]]:
        """The file's features in the model's feature config, with warnings for the user."""
        from features.extract import extract_clip

        record, notes, info = inspect_file(path, use_audio="audio" in self.modalities, use_video="video" in self.modalities)
        detector = self.detector() if record.has_video else None
        features = extract_clip(record, self.feature_config, detector=detector, probed={info.path: info})  # the path as the record holds it
        warnings = notes + list(features.notes)
        if record.has_video and not features.has_video:
            warnings.append("no face found in the video: the prediction uses the audio only")
        if not features.has_audio and not features.has_video:
            raise ClipError(f"{path}: nothing usable after extraction ({'; '.join(warnings) or 'no audio, no face'})")
        return features, warnings

    @torch.no_grad()
    def predict_features(
        self,
        features: ClipFeatures,
        path: str = "",
        window_s: float = 2.0,
        hop_s: float = 0.5,
        warnings: Sequence[str] = (),
    ) -> FilePrediction:
        """Clip-level prediction and timeline for already extracted features."""
        warnings = list(warnings)
        if "video" not in self.modalities:
            features = replace(features, **dict.fromkeys(_VIDEO_FIELDS))
        if "audio" not in self.modalities:
            features = replace(features, logmel=None, audio_states=None, audio_times=None)
        if features.has_video and 0 < features.face_ratio < self.min_face_ratio:
            warnings.append(f"a face was found in only {features.face_ratio:.0%} of the video frames")
        duration = float(features.duration_s)
        timeline_windows = sliding_windows(duration, window_s, hop_s)
        if duration <= self.clip_max_s + _EPS:
            clip_windows, strategy = [(0.0, duration)], "whole clip"
        else:
            clip_windows = sliding_windows(duration, self.clip_window_s, self.clip_window_s / 2)
            strategy = f"mean of {len(clip_windows)} windows of {self.clip_window_s:g} s"
        probs = self.window_probabilities(features, clip_windows + timeline_windows)  # (Nc + Nt, C)
        clip_probs = np.nanmean(probs[: len(clip_windows)], axis=0)  # (C,)
        if not np.all(np.isfinite(clip_probs)):
            raise ClipError(f"{path}: no window holds an audio frame or a face")
        timeline = []
        for (t0, t1), p in zip(timeline_windows, probs[len(clip_windows) :], strict=False):
            end = _OPEN_END if t1 >= duration - _EPS else t1
            timeline.append(
                WindowPrediction(
                    start_s=t0,
                    end_s=t1,
                    probabilities=None if np.isnan(p).any() else self._as_dict(p),
                    n_audio_frames=_frame_count(features.audio_times, None, t0, end),
                    n_face_frames=_frame_count(features.video_times, features.face_mask, t0, end),
                )
            )
        empty = sum(w.probabilities is None for w in timeline)
        if empty:
            warnings.append(f"{empty} of {len(timeline)} timeline windows hold no audio frame and no face: left empty")
        return FilePrediction(
            path=path,
            label=self.label_names[int(np.argmax(clip_probs))],
            probabilities=self._as_dict(clip_probs),
            timeline=timeline,
            modalities=[m for m, ok in (("audio", features.has_audio), ("video", features.has_video)) if ok],
            duration_s=duration,
            clip_strategy=strategy,
            warnings=warnings,
            thumbnails=pick_thumbnails(features, self.n_thumbnails),
            face_trace=face_trace(features) if features.has_video else None,
        )

    @torch.no_grad()
    def window_probabilities(self, features: ClipFeatures, windows: Sequence[tuple[float, float]]) -> np.ndarray:
        """Class probabilities (N, C) of [t0, t1) windows of one clip, ``batch_size`` per forward
        pass. A window ending at the clip's end keeps every frame up to the last one; a
        window without any audio frame or face gets NaN."""
        duration = float(features.duration_s)
        out = np.full((len(windows), len(self.label_names)), np.nan, dtype=np.float64)
        todo: list[int] = []
        examples = []
        for i, (t0, t1) in enumerate(windows):
            example = features_to_example(features, self.feature_config, -1, (t0, _OPEN_END if t1 >= duration - _EPS else t1))
            if example.audio.shape[0] == 0 and not bool(example.face_mask.any()):
                continue
            todo.append(i)
            examples.append(example)
            if len(examples) == self.batch_size:
                out[todo] = self._forward(examples)
                todo, examples = [], []
        if examples:
            out[todo] = self._forward(examples)
        return out

    def _forward(self, examples: list) -> np.ndarray:
        batch = collate(examples).to(self.device)
        with autocast(self.device):  # bf16 on CUDA as in training; CPU stays fp32
            logits = self.model(batch).logits.float()  # (B, C)
        return torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float64)

    def _as_dict(self, probs: np.ndarray) -> dict[str, float]:
        return {name: float(p) for name, p in zip(self.label_names, probs, strict=False)}


def load_predictor(model: str | Path, device: str = "auto", tracking_uri: str | None = None, **kwargs: Any) -> Predictor:
    """Load a checkpoint path or MLflow model URI into a Predictor.

    Raises FileNotFoundError for a path that does not exist and ValueError for an
    MLflow URI that does not resolve or holds no checkpoint (both name ``model``).
    ``kwargs`` go to :class:`Predictor` (batch_size, clip_max_s, n_thumbnails...).
    """
    from modeling.training.checkpoint import load_checkpoint

    with resolve_checkpoint(str(model), tracking_uri) as checkpoint_path:
        payload = load_checkpoint(checkpoint_path, map_location="cpu")
    return Predictor.from_checkpoint(payload, device=device, source=str(model), **kwargs)


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | Path],
    window_s: float = 2.0,
    hop_s: float = 0.5,
    on_result: Callable[[FilePrediction, int, int], None] | None = None,
) -> list[FilePrediction]:
    """Predict every path; a file that cannot be used gets ``error`` and the rest go on.

    ``on_result(prediction, index, total)`` is called after each file (progress bars).
    """
    if predictor.speaker_norm:
        return _predict_one_speaker(predictor, paths, window_s, hop_s, on_result)
    out: list[FilePrediction] = []
    for i, path in enumerate(paths):
        try:
            pred = predictor.predict_file(path, window_s, hop_s)
        except (ClipError, OSError) as err:  # the file's fault: recorded, the batch goes on
            pred = FilePrediction(path=str(path), error=str(err))
        except (RuntimeError, ValueError) as err:  # e.g. out of memory on a huge file
            pred = FilePrediction(path=str(path), error=f"{type(err).__name__}: {err}")
        out.append(pred)
        if on_result is not None:
            on_result(pred, i, len(paths))
    return out


MIN_SPEAKER_FILES = 10  # below this, a speaker's statistics are noisy (training saw ~60 clips per speaker)


def _predict_one_speaker(
    predictor: Predictor, paths: Sequence[str | Path], window_s: float, hop_s: float, on_result
) -> list[FilePrediction]:
    """Transductive prediction for a model trained with per-speaker normalisation: every
    file is taken to be one speaker, whose audio statistics come from all the files."""
    from modeling.data.examples import audio_statistics, speaker_normalised

    check_window(window_s, hop_s)
    extracted: list[tuple[ClipFeatures, list[str]] | FilePrediction] = []
    for path in paths:
        try:
            extracted.append(predictor.extract(path))
        except (ClipError, OSError) as err:
            extracted.append(FilePrediction(path=str(path), error=str(err)))
        except (RuntimeError, ValueError) as err:
            extracted.append(FilePrediction(path=str(path), error=f"{type(err).__name__}: {err}"))
    usable = [item[0] for item in extracted if isinstance(item, tuple)]
    stats = audio_statistics(usable)
    note = f"speaker normalisation (transductive): all {len(usable)} files are taken as one speaker"
    if len(usable) < MIN_SPEAKER_FILES:
        note += f"; fewer than {MIN_SPEAKER_FILES} files make noisy statistics"
    out: list[FilePrediction] = []
    for i, (path, item) in enumerate(zip(paths, extracted, strict=False)):
        pred = (
            item
            if isinstance(item, FilePrediction)
            else predictor.predict_features(speaker_normalised(item[0], stats), str(path), window_s, hop_s, [*item[1], note])
        )
        out.append(pred)
        if on_result is not None:
            on_result(pred, i, len(paths))
    return out
