"""One clip in, its timestamped features out: probe, decode, log-mel, faces."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from features.audio import log_mel
from features.clip import TIMED_ARRAYS, ClipError, ClipFeatures
from features.config import FeatureConfig
from features.decode import MediaInfo, decode_audio, decode_audio_video, iter_video_frames, probe
from features.faces import FaceDetector
from features.manifest import ClipRecord
from features.speed import speed_perturb

# Audio and video of a clip from one ffmpeg process when both are used (saves one process start, ~0.1
# CPU s per clip; same features bit for bit, tests/features/test_extract.py). Off by default since
# tests/flows/test_cli_stop.py's Ctrl-C case failed in two full-suite runs with it on. Session 7 found the
# same failure with it off, and its cause in the test runs themselves: started as background jobs, they
# ran with SIGINT ignored, which msata inherited (docs/benchmarks.md). Turning it on again waits for a
# full-suite run with it on and the corrected test.
COMBINED_DECODE = False
FACE_ARRAYS = TIMED_ARRAYS["video_times"]  # a clip's per-frame face arrays (its video times apart)


def extract_clip(
    record: ClipRecord,
    config: FeatureConfig,
    detector: FaceDetector | None = None,
    chunk: int = 32,
    device: str | None = None,
    spill_dir: str | None = None,
    probed: Mapping[str, MediaInfo] | None = None,
    source_faces: ClipFeatures | None = None,
) -> ClipFeatures:
    """Extract the features of ``record`` (see ClipFeatures for shapes and units).

    Every file is probed before anything is decoded, so a broken file fails fast.
    A missing stream only drops that modality (with a note); a file that cannot be
    read, is empty or truncated, or a clip left with no usable modality raises
    ClipError. A video without a face in any frame is kept audio-only with a note.
    Frames are streamed ``chunk`` at a time into the detector, so memory does not
    grow with the clip's length; nor do the face crops and Whisper encoder states kept: past
    features.spill.SPILL_BYTES they go to a nameless file in ``spill_dir`` (default $TMPDIR)
    and ``face_crops`` / ``audio_states`` is a read-only memmap over it. Pass a shared
    ``detector`` to avoid reloading MTCNN.
    ``probed``: ffprobe results the caller already has, by path (``msata predict`` probes a file to build
    its record); other paths are probed here.
    ``device`` (a torch device string) runs MTCNN and the audio encoder there; None: MTCNN
    on the CPU (or the ``detector``'s device), the encoder on CUDA when present.
    A speed copy (``record.speed``, features/speed.py) is its source recording resampled: the
    wave is played ``speed`` times as fast and every timestamp is the source's divided by it.
    Its faces are the recording's frames, sooner: ``source_faces`` (the recording's stored video
    arrays, when the caller has them and they hold faces) are taken as they are, their times
    divided by the speed, instead of decoding and detecting the same frames again. Without them
    the frames are decoded and detected here; both give the same arrays bit for bit (tested).
    When both audio and video are used, one ffmpeg process decodes both
    (decode_audio_video); whatever it refuses is decoded again by the separate
    decoders, so features, notes and errors are theirs, bit for bit.
    """
    if record.audio_path is None and record.video_path is None:
        raise ClipError(f"clip {record.clip_id!r}: the record has neither an audio nor a video path")
    if source_faces is not None and (
        record.source_clip_id is None or record.source_clip_id != source_faces.clip_id or not source_faces.has_video
    ):
        raise ValueError(
            f"clip {record.clip_id!r} given the faces of {source_faces.clip_id!r}: only a speed copy takes faces, "
            "its own recording's, and only when that recording has some"
        )
    if detector is not None and detector.config != config.face:
        raise ValueError(f"detector config {detector.config} differs from the feature config {config.face}")
    infos: dict[str, MediaInfo] = {}
    for path in (record.audio_path, record.video_path):
        if path is not None and path not in infos:
            infos[path] = probed[path] if probed is not None and path in probed else probe(path)
    a_info = infos[record.audio_path] if record.audio_path is not None else None
    v_info = infos[record.video_path] if record.video_path is not None else None

    notes: list[str] = []
    use_audio = a_info is not None and a_info.has_audio
    use_video = v_info is not None and v_info.has_video
    if a_info is not None and not a_info.has_audio:
        notes.append(f"no audio stream in {a_info.path}: kept video-only")
    if v_info is not None and not v_info.has_video:
        notes.append(f"no video stream in {v_info.path}: kept audio-only")
    if not use_audio and not use_video:
        paths = ", ".join(sorted(infos))
        raise ClipError(f"{paths}: no usable audio or video stream (clip {record.clip_id!r})")

    features = ClipFeatures(clip_id=record.clip_id, duration_s=0.0, notes=notes)

    def face_track(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Any:  # FaceTrack or BlendshapeTrack
        nonlocal detector
        if config.face.representation == "blendshapes":
            return _blendshape_extractor().track(chunks)
        detector = detector or FaceDetector(config.face, device=device or "cpu")
        return detector.track(chunks, spill_dir=spill_dir)

    speed = record.speed_factor  # a speed copy (features/speed.py): every time is the source's / speed
    wave, track = None, None
    if use_audio and use_video and COMBINED_DECODE and speed == 1.0:
        assert a_info is not None and v_info is not None
        try:  # one ffmpeg for both streams: the same samples and frames as the separate decoders below
            wave, track = decode_audio_video(a_info, v_info, face_track, config.audio.sample_rate, chunk)
        except ClipError:
            wave, track = None, None  # decoded again separately below, which names what is wrong as it always has
        except Exception:
            # The separate decoders read the audio first: a bad audio stream is still the error reported.
            decode_audio(a_info.path, config.audio.sample_rate, info=a_info)
            raise

    spans: list[float] = []
    if use_audio:
        assert a_info is not None
        if wave is None:
            wave = decode_audio(a_info.path, config.audio.sample_rate, info=a_info)  # (N,)
        if speed != 1.0:
            wave = speed_perturb(wave, speed)  # (about N / speed,)
        spans.append(wave.shape[0] / config.audio.sample_rate)
        if config.audio_encoder.is_log_mel:
            logmel, times = log_mel(wave, config.audio)  # (Ta, F), (Ta,)
            frame_ms = config.audio.hop_length_s * 1000
            if len(logmel):
                features.logmel, features.audio_times = logmel, times
        else:
            states, times = _encoder_states(wave, config, device, spill_dir)  # (Ta, L, D), (Ta,)
            frame_ms = 20.0  # Whisper: 10 ms mel hop, stride-2 convolution; wav2vec2 family: 25 ms receptive field, 20 ms hop
            if len(states):
                features.audio_states, features.audio_times = states, times
        if features.audio_times is None:
            notes.append(f"audio of {a_info.path} is shorter than one frame of the audio encoder (about {frame_ms:.0f} ms)")
    wave = None  # not needed past this point: 38 MB for 10 minutes at 16 kHz, not held through the video pass

    # Both streams from one container (format 2 on): their times go onto its clock (_to_container_clock).
    shared_clock = config.format_version >= 2 and use_audio and use_video and record.audio_path == record.video_path
    if use_video and speed != 1.0:  # a copy: its recording's faces (on the recording's clock), each frame sooner
        assert v_info is not None
        frame_s = 1.0 / v_info.fps if v_info.fps else 0.0
        shift = _stream_starts(a_info)[1] if shared_clock and a_info is not None else 0.0  # what the recording's clock adds
        faces, last = source_faces, None
        if faces is None:
            track = face_track(iter_video_frames(v_info.path, chunk=chunk, info=v_info))
            faces = _faces_on_recording_clock(track, config, shift)
            last = float(track.times[-1]) + shift if len(track.times) else None
        if faces.has_video:
            for name in FACE_ARRAYS:
                setattr(features, name, getattr(faces, name))
            features.video_times = faces.video_times / speed
            last = float(faces.video_times[-1])
        else:
            notes.append(f"no face in any of the {len(track.mask)} frames of {v_info.path}: kept audio-only")
        spans.append((last + frame_s) / speed if last is not None else shift / speed)
    elif use_video:
        assert v_info is not None
        if track is None:
            track = face_track(iter_video_frames(v_info.path, chunk=chunk, info=v_info))
        frame_s = 1.0 / v_info.fps if v_info.fps else 0.0
        if config.face.representation == "blendshapes":
            spans.append((float(track.times[-1]) + frame_s) / speed if len(track.times) else 0.0)
            if track.mask.any():
                features.face_blendshapes, features.video_times, features.face_mask = track.blendshapes, track.times / speed, track.mask
            else:
                notes.append(f"no face in any of the {len(track.mask)} frames of {v_info.path}: kept audio-only")
        else:
            spans.append((float(track.times[-1]) + frame_s) / speed)
            if track.mask.any():
                features.face_crops = track.crops
                features.video_times = track.times / speed
                features.face_mask = track.mask
                features.face_boxes = track.boxes
                features.face_landmarks = track.landmarks
                features.face_probs = track.probs
            else:
                notes.append(f"no face in any of the {len(track.mask)} frames of {v_info.path}: kept audio-only")

    if shared_clock:
        spans = _to_container_clock(features, a_info, spans, speed, video=speed == 1.0)  # a copy's faces are shifted already

    if not features.has_audio and not features.has_video:
        raise ClipError(f"{', '.join(sorted(infos))}: nothing usable: {'; '.join(notes)}")
    features.duration_s = max(spans)
    return features


@functools.cache
def _blendshape_extractor():  # -> BlendshapeExtractor; one per process: the bundle is read and sha256-checked once
    from features.face_landmarks import BlendshapeExtractor

    return BlendshapeExtractor()


def _encoder_states(wave: np.ndarray, config: FeatureConfig, device: str | None, spill_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Imported here so that log-mel preprocessing never loads the encoder code or weights."""
    from features.audio_encoders.stage import encode_wave

    return encode_wave(wave, config.audio_encoder, device, spill_dir)


def _stream_starts(info: MediaInfo) -> tuple[float, float]:
    """(audio, video) start of one container's streams after the earlier of the two, in seconds; (0, 0) when the
    container does not say."""
    if info.audio_start_s is None or info.video_start_s is None:
        return 0.0, 0.0
    origin = min(info.audio_start_s, info.video_start_s)
    return info.audio_start_s - origin, info.video_start_s - origin


def _to_container_clock(features: ClipFeatures, info: MediaInfo, spans: list[float], speed: float = 1.0, video: bool = True) -> list[float]:
    """Shift both streams of one container onto its clock, origin at the earlier stream's start
    (the video only with ``video``: a speed copy's faces come shifted on the recording's clock).

    Each decoder counts from its own stream's first sample or frame, so an audio track
    that starts 27 ms after the picture (common in CREMA-D's .flv) would otherwise sit
    27 ms early against the faces: exactly the misalignment TaRoPE is meant to avoid.
    Streams from different files have no shared clock and are left as they are.
    """
    if info.audio_start_s is None or info.video_start_s is None:
        return spans
    audio_start, video_start = _stream_starts(info)
    audio_shift, video_shift = audio_start / speed, video_start / speed
    if features.audio_times is not None:
        features.audio_times = features.audio_times + audio_shift
    if not video:
        return [spans[0] + audio_shift, spans[1]]
    if features.video_times is not None:
        features.video_times = features.video_times + video_shift
    return [spans[0] + audio_shift, spans[1] + video_shift]


def _faces_on_recording_clock(track: Any, config: FeatureConfig, video_shift: float) -> ClipFeatures:
    """A face track's arrays as the recording's extraction stores them (times + ``video_shift``); no video arrays
    when no frame has a face. ``track``: a FaceTrack, or a BlendshapeTrack for the blendshapes representation."""
    faces = ClipFeatures(clip_id="", duration_s=0.0)
    if not track.mask.any():
        return faces
    faces.video_times, faces.face_mask = track.times + video_shift, track.mask  # (x / 1.0 + s / 1.0 is x + s exactly)
    if config.face.representation == "blendshapes":
        faces.face_blendshapes = track.blendshapes
    else:
        faces.face_crops, faces.face_boxes, faces.face_landmarks, faces.face_probs = track.crops, track.boxes, track.landmarks, track.probs
    return faces
