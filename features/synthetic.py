"""Real synthetic media for tests and the demo: a photographed face that moves and talks.

Video: the astronaut photograph from scikit-image (a real face MTCNN finds), pasted on a
plain background and moved smoothly; its mouth opens with the syllables of the audio.
Audio: a voiced harmonic tone with an f0 contour and syllable-like amplitude bursts.
Encoding goes through ffmpeg (rawvideo pipe -> libx264 yuv420p, AAC or PCM audio).

In a dataset, the class sets both the voice (f0 level/contour, syllable rate, brightness)
and the face (tint, mouth dynamics, motion pattern); speakers differ in background,
face scale/position and base pitch, so labels are learnable from either modality.

One module of ~330 lines because the talking-face renderer and its audio are generated together so that their events stay synchronous.
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import ffmpeg
import numpy as np
from PIL import Image
from skimage import data as skdata

# Rows/cols of skimage.data.astronaut() (512x512) framing the face so that the face's
# centre lies at the centre of the patch (within ~2 px).
FACE_ROWS = (0, 230)
FACE_COLS = (130, 320)
# Mouth centre and width as fractions of the patch (from the photograph's landmarks).
MOUTH_CENTRE = (0.495, 0.625)
MOUTH_WIDTH = 0.22


@dataclass(frozen=True)
class SpeakerStyle:
    background: tuple[int, int, int] = (40, 90, 160)
    face_height: float = 0.6  # patch height as a fraction of the frame height
    position: tuple[float, float] = (0.5, 0.5)  # mean face centre as fractions of (width, height)
    base_f0: float = 140.0  # Hz


@dataclass(frozen=True)
class ClassStyle:
    f0_ratio: float = 1.0  # voice level relative to the speaker's base f0
    f0_swing: float = 0.05  # depth of the slow f0 wave (fraction of f0)
    f0_slope: float = 0.0  # rise (+) or fall (-) over the clip (fraction of f0)
    syllable_rate: float = 4.0  # bursts per second
    tilt: float = 1.2  # harmonic k has amplitude k**-tilt (lower = brighter voice)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # RGB gain on the face
    mouth_open: float = 0.045  # maximum mouth opening, fraction of the patch height
    motion: tuple[float, float, float] = (0.02, 0.01, 0.3)  # x amp, y amp (fractions of frame), Hz


CLASS_STYLES: dict[str, ClassStyle] = {
    "neutral": ClassStyle(),
    "happy": ClassStyle(1.35, 0.15, 0.10, 5.0, 1.0, (1.12, 1.02, 0.85), 0.06, (0.02, 0.05, 2.0)),
    "sad": ClassStyle(0.85, 0.03, -0.20, 2.5, 1.8, (0.85, 0.92, 1.15), 0.03, (0.01, 0.02, 0.25)),
    "angry": ClassStyle(1.15, 0.08, 0.0, 6.5, 0.7, (1.18, 0.85, 0.85), 0.07, (0.05, 0.01, 3.0)),
}


def class_style(label: str, index: int = 0) -> ClassStyle:
    """The preset for a known label; otherwise a distinct style derived from the class index."""
    if label in CLASS_STYLES:
        return CLASS_STYLES[label]
    rng = np.random.default_rng(1000 + index)
    return ClassStyle(
        f0_ratio=0.8 + 0.15 * (index % 5),
        f0_swing=float(rng.uniform(0.02, 0.15)),
        f0_slope=float(rng.uniform(-0.2, 0.2)),
        syllable_rate=2.5 + 1.0 * (index % 5),
        tilt=float(rng.uniform(0.7, 1.8)),
        tint=tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)),
        mouth_open=float(rng.uniform(0.03, 0.07)),
        motion=(float(rng.uniform(0.01, 0.05)), float(rng.uniform(0.01, 0.05)), float(rng.uniform(0.3, 3.0))),
    )


def speaker_style(index: int, seed: int = 0) -> SpeakerStyle:
    rng = np.random.default_rng([seed, index])
    return SpeakerStyle(
        background=tuple(int(v) for v in rng.integers(20, 236, 3)),
        face_height=float(rng.uniform(0.5, 0.7)),
        position=(float(rng.uniform(0.38, 0.62)), float(rng.uniform(0.45, 0.55))),
        base_f0=float(rng.uniform(100.0, 220.0)),
    )


@dataclass
class SyntheticClip:
    path: Path
    fps: Fraction
    n_frames: int  # 0 without video
    duration_s: float
    face_centers: np.ndarray = field(repr=False)  # (n_frames, 2) x, y pixel centre of the face; NaN when not drawn
    face_height: float = 0.0  # pasted patch height in pixels


@lru_cache(maxsize=1)
def _face_patch() -> np.ndarray:
    img = skdata.astronaut()  # (512, 512, 3) uint8, bundled with scikit-image
    return np.ascontiguousarray(img[FACE_ROWS[0] : FACE_ROWS[1], FACE_COLS[0] : FACE_COLS[1]])


def syllable_envelope(n: int, rate_hz: float, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) envelope in [0, 1]: raised-cosine bursts ~rate_hz per second with jittered spacing."""
    env = np.zeros(n, np.float64)
    t = float(rng.uniform(0.05, 0.15))
    duration = n / sample_rate
    while t < duration:
        length = float(rng.uniform(0.45, 0.7)) / rate_hz
        start, stop = int(t * sample_rate), min(n, int((t + length) * sample_rate))
        if stop > start:
            phase = np.linspace(0.0, 1.0, stop - start, endpoint=False)
            env[start:stop] = np.maximum(env[start:stop], float(rng.uniform(0.6, 1.0)) * np.sin(np.pi * phase) ** 2)
        t += float(rng.uniform(0.8, 1.25)) / rate_hz
    return env


def voice(
    duration_s: float, sample_rate: int, speaker: SpeakerStyle, style: ClassStyle, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Voiced synthetic speech: (wave (N,) float32, envelope (N,) float64)."""
    n = int(round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate
    phi = rng.uniform(0, 2 * np.pi)
    rel = t / max(duration_s, 1e-9) - 0.5
    f0 = speaker.base_f0 * style.f0_ratio * (1 + style.f0_swing * np.sin(2 * np.pi * 0.8 * t + phi) + style.f0_slope * rel)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate  # (N,)
    n_harm = max(1, min(30, int(0.45 * sample_rate / f0.max())))
    k = np.arange(1, n_harm + 1)
    amps = k ** (-style.tilt)
    tone = (amps[:, None] * np.sin(k[:, None] * phase[None, :])).sum(0) / amps.sum()  # (N,)
    env = syllable_envelope(n, style.syllable_rate, sample_rate, rng)
    wave = env * tone + 0.01 * rng.standard_normal(n)
    wave = 0.6 * wave / max(1e-6, float(np.abs(wave).max()))
    return wave.astype(np.float32), env


def _as_fraction(fps: float | Fraction | str) -> Fraction:
    out = Fraction(fps).limit_denominator(100_000) if not isinstance(fps, str) else Fraction(fps)
    if out <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return out


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx - cx) / max(rx, 1e-6)) ** 2 + ((yy - cy) / max(ry, 1e-6)) ** 2 <= 1.0


def make_talking_face_clip(
    path: str | Path,
    duration_s: float = 2.0,
    fps: float | Fraction | str = 25,
    width: int = 320,
    height: int = 240,
    *,
    label: str = "neutral",
    speaker: SpeakerStyle | None = None,
    style: ClassStyle | None = None,
    with_audio: bool = True,
    with_video: bool = True,
    blank_frames: tuple[int, ...] | range = (),
    sample_rate: int = 16_000,
    audio_codec: str = "aac",
    seed: int = 0,
) -> SyntheticClip:
    """Encode one clip with ffmpeg and return where the face is in every frame.

    ``blank_frames`` are drawn without the face (background only). ``fps`` may be a
    rational like "30000/1001". The face centre of frame k is returned exactly
    (integer paste position + patch centre), for checking detections.
    """
    if not (with_audio or with_video):
        raise ValueError("a clip needs audio, video or both")
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = _as_fraction(fps)
    speaker = speaker or SpeakerStyle()
    style = style or class_style(label)
    rng = np.random.default_rng(seed)
    wave, env = voice(duration_s, sample_rate, speaker, style, rng)
    n_frames = int(round(duration_s * rate)) if with_video else 0
    centres = np.full((n_frames, 2), np.nan)
    patch_h = 0
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inputs = []
        if with_video:
            vin = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=str(rate))
            inputs.append(vin.video)
        if with_audio:
            raw = Path(tmp) / "voice.f32"
            wave.astype("<f4").tofile(raw)
            inputs.append(ffmpeg.input(str(raw), format="f32le", ar=sample_rate, ac=1).audio)
        out_args: dict[str, object] = {}
        if with_video:
            out_args.update(vcodec="libx264", preset="veryfast", crf=20, pix_fmt="yuv420p", r=str(rate))
            if path.suffix.lower() in (".mp4", ".m4v", ".mov"):
                out_args["movflags"] = "+faststart"
        if with_audio:
            out_args.update(acodec=audio_codec, ar=sample_rate)
            if audio_codec == "aac":
                out_args["audio_bitrate"] = "96k"
        cmd = (
            ffmpeg.output(*inputs, str(path), **out_args)
            .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
            .overwrite_output()
            .compile()
        )
        if with_video:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                patch_h, centres = _write_frames(
                    proc, n_frames, rate, width, height, speaker, style, env, sample_rate, set(blank_frames), rng
                )
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:
                pass  # ffmpeg exited early; its stderr below says why
            stderr = proc.stderr.read() if proc.stderr else b""
            code = proc.wait()
            if code == 0 and n_frames and np.isnan(centres).all() and not blank_frames:
                raise RuntimeError(f"no frame was written to {path}")
        else:
            done = subprocess.run(cmd, capture_output=True, check=False)
            code, stderr = done.returncode, done.stderr
    if code != 0:
        raise RuntimeError(f"ffmpeg failed to encode {path}: {stderr.decode('utf-8', 'replace')[-2000:]}")
    return SyntheticClip(path, rate, n_frames, float(duration_s), centres, float(patch_h))


def _write_frames(
    proc: subprocess.Popen,
    n_frames: int,
    rate: Fraction,
    width: int,
    height: int,
    speaker: SpeakerStyle,
    style: ClassStyle,
    env: np.ndarray,
    sample_rate: int,
    blank: set[int],
    rng: np.random.Generator,
) -> tuple[int, np.ndarray]:
    src = _face_patch()
    ph = max(24, int(round(speaker.face_height * height)))
    pw = max(20, int(round(ph * src.shape[1] / src.shape[0])))
    face = np.asarray(Image.fromarray(src).resize((pw, ph), Image.BILINEAR), np.float32)
    face = np.clip(face * np.asarray(style.tint, np.float32), 0, 255).astype(np.uint8)  # (ph, pw, 3)
    mouth_cx, mouth_cy = MOUTH_CENTRE[0] * pw, MOUTH_CENTRE[1] * ph
    # Background: the speaker's colour with a gentle vertical gradient (something for the encoder to code).
    grad = np.linspace(0.85, 1.15, height, dtype=np.float32)[:, None, None]
    background = np.clip(np.asarray(speaker.background, np.float32) * grad, 0, 255).astype(np.uint8)
    background = np.broadcast_to(background, (height, width, 3)).copy()  # (H, W, 3)
    ax, ay, freq = style.motion
    phx, phy = rng.uniform(0, 2 * np.pi, 2)
    centres = np.full((n_frames, 2), np.nan)
    assert proc.stdin is not None
    for k in range(n_frames):
        t = float(k / rate)
        cx = speaker.position[0] * width + ax * width * np.sin(2 * np.pi * freq * t + phx)
        cy = speaker.position[1] * height + ay * height * np.sin(2 * np.pi * freq * t + phy)
        frame = background.copy()
        if k not in blank:
            x0, y0 = int(round(cx - pw / 2)), int(round(cy - ph / 2))
            patch = face.copy()
            opening = style.mouth_open * ph * float(env[min(len(env) - 1, int(t * sample_rate))])
            if opening >= 1.0:
                mask = _ellipse(ph, pw, mouth_cx, mouth_cy, MOUTH_WIDTH * pw / 2, opening / 2)
                patch[mask] = (95, 35, 40)
            _paste(frame, patch, x0, y0)
            centres[k] = (x0 + pw / 2, y0 + ph / 2)
        proc.stdin.write(frame.tobytes())
    return ph, centres


def _paste(frame: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    h, w = frame.shape[:2]
    ph, pw = patch.shape[:2]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph)
    if fx1 > fx0 and fy1 > fy0:
        frame[fy0:fy1, fx0:fx1] = patch[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]


def make_synthetic_dataset(
    root: str | Path,
    n_speakers: int = 4,
    clips_per_class: int = 3,
    classes: tuple[str, ...] = ("neutral", "happy", "sad", "angry"),
    duration_s: float = 2.0,
    fps: float | Fraction | str = 25,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write ``n_speakers * len(classes) * clips_per_class`` clips under ``root/clips`` and
    ``root/labels.csv`` (columns path,label,speaker; paths relative to ``root``).

    ``clips_per_class`` is per speaker. Returns ``root``. The media are deterministic for
    a given seed; ``workers`` clips are encoded at once (default: up to 4, one per core).
    """
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, str, dict[str, Any]]] = []
    for s in range(n_speakers):
        spk = speaker_style(s, seed)
        for c, label in enumerate(classes):
            style = class_style(label, c)
            for i in range(clips_per_class):
                rel = f"clips/spk{s:02d}_{label}_{i:02d}.mp4"
                kwargs = dict(
                    duration_s=duration_s,
                    fps=fps,
                    width=size[0],
                    height=size[1],
                    label=label,
                    speaker=spk,
                    style=style,
                    seed=seed * 1_000_003 + s * 10_007 + c * 101 + i,
                )
                jobs.append((rel, label, f"spk{s:02d}", kwargs))
    # Encoding runs in ffmpeg subprocesses, so threads overlap it with the numpy rendering.
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        list(pool.map(lambda job: make_talking_face_clip(root / job[0], **job[3]), jobs))
    rows = [(rel, label, speaker) for rel, label, speaker, _ in jobs]
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "speaker"])
        writer.writerows(rows)
    return root
