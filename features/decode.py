"""Media decoding with ffmpeg: probe, 16 kHz mono audio, and streamed RGB frames with real timestamps.

Everything here shells out to the ffmpeg/ffprobe binaries (via ffmpeg-python for
command building) and raises :class:`features.clip.ClipError` naming the file and
the reason (with the tail of ffmpeg's stderr) for anything unusable.

Video timestamps are read from the decoder itself: a ``showinfo`` filter at the
end of the filter graph logs every frame's integer pts on stderr, and a reader
thread pairs them with the frames that arrive on stdout. Since the filter graph
runs with ``-fps_mode passthrough`` no frame is duplicated or dropped after
``showinfo``, so the k-th log line belongs to the k-th frame on the pipe.

:func:`decode_audio_video` runs both decoders as the two outputs of one ffmpeg process
(one process start less per clip: that start, mostly the dynamic loader, is ~0.1 CPU s,
as much as a whole ffprobe call). ffprobe itself stays: the stream facts the features
depend on exactly (per-stream durations and start times, the average frame rate) are in
no ffmpeg log at full precision.

One module of ~430 lines because probing, audio decoding and the framed video pipe share ffmpeg's timestamp conventions, which must stay in one place.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import ffmpeg
import numpy as np

from features.clip import ClipError

T = TypeVar("T")

_STDERR_TAIL_LINES = 12
# A decode that covers less than this fraction of the container's duration (beyond a
# small absolute slack for codec padding) is treated as a truncated file.
_MIN_COVERAGE = 0.9
_COVERAGE_SLACK_S = 0.15

# A chunk of frames holds at most this many bytes (chunk is lowered for large frames): two
# chunks are alive while the consumer works on one, which for 32 frames of 1080p was 400 MB.
MAX_CHUNK_BYTES = 64 * 2**20

# "(?:\[info\] )?": the level tag ffmpeg writes after the context with ``-loglevel level+info`` (decode_audio_video).
_SHOWINFO_FRAME = re.compile(r"\[Parsed_showinfo_\d+ @ [^\]]+\] (?:\[info\] )?n:\s*(\d+) pts:\s*(-?\d+) ")
_SHOWINFO_TB = re.compile(r"\[Parsed_showinfo_\d+ @ [^\]]+\] (?:\[info\] )?config in time_base: (\d+)/(\d+)")
_ERROR_LEVEL = re.compile(r"\[(?:error|fatal|panic)\] ")


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file; only the first real audio and video streams count.

    Cover art (``attached_pic``) is not a video stream. ``width``/``height`` are the
    displayed size, i.e. after the rotation ffmpeg applies when decoding.
    """

    path: str
    duration_s: float
    has_audio: bool
    has_video: bool
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    n_frames: int | None = None
    audio_sample_rate: int | None = None
    audio_channels: int | None = None
    video_stream_index: int | None = None
    audio_stream_index: int | None = None
    video_duration_s: float | None = None
    audio_duration_s: float | None = None
    # Stream start times in the container's clock. Decoded times are relative to each
    # stream's own first sample/frame; these give the offset between the two if needed.
    video_start_s: float | None = None
    audio_start_s: float | None = None


def _tail(stderr: bytes | str, n: int = _STDERR_TAIL_LINES) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) if lines else "(no ffmpeg output)"


def _check_file(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise ClipError(f"{p}: file not found")
    if not p.is_file():
        raise ClipError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise ClipError(f"{p}: zero-length file")
    return str(p)


def _rate(value: str | None) -> float | None:
    """'30000/1001' -> 29.97; None for missing or degenerate rates such as '0/0'."""
    if not value or "/" not in value:
        return None
    num, den = value.split("/", 1)
    try:
        n, d = int(num), int(den)
    except ValueError:
        return None
    return n / d if n > 0 and d > 0 else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _rotation(stream: dict[str, Any]) -> int:
    rot = stream.get("tags", {}).get("rotate")
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            rot = side["rotation"]
    try:
        return int(float(rot)) % 360 if rot is not None else 0
    except ValueError:
        return 0


def probe(path: str | Path) -> MediaInfo:
    """Probe ``path`` with ffprobe; raises ClipError when it is missing, empty or unreadable."""
    spath = _check_file(path)
    try:
        data = ffmpeg.probe(spath, v="error")
    except ffmpeg.Error as err:
        raise ClipError(f"{spath}: ffprobe cannot read it: {_tail(err.stderr or b'')}") from err
    streams = data.get("streams", [])
    video = next(
        (s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic", 0)),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    fmt_duration = _float(data.get("format", {}).get("duration"))
    v_dur = _float(video.get("duration")) if video else None
    a_dur = _float(audio.get("duration")) if audio else None
    durations = [d for d in (fmt_duration, v_dur, a_dur) if d is not None]
    duration = fmt_duration if fmt_duration is not None else (max(durations) if durations else 0.0)

    width = height = n_frames = None
    fps = None
    if video is not None:
        width, height = int(video.get("width", 0)) or None, int(video.get("height", 0)) or None
        if _rotation(video) in (90, 270) and width and height:
            width, height = height, width
        fps = _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate"))
        nb = video.get("nb_frames")
        n_frames = int(nb) if nb not in (None, "N/A") and str(nb).isdigit() and int(nb) > 0 else None
    return MediaInfo(
        path=spath,
        duration_s=float(duration),
        has_audio=audio is not None,
        has_video=video is not None and bool(width) and bool(height),
        width=width,
        height=height,
        fps=fps,
        video_codec=video.get("codec_name") if video else None,
        audio_codec=audio.get("codec_name") if audio else None,
        n_frames=n_frames,
        audio_sample_rate=int(audio["sample_rate"]) if audio and audio.get("sample_rate") else None,
        audio_channels=int(audio["channels"]) if audio and audio.get("channels") else None,
        video_stream_index=int(video["index"]) if video else None,
        audio_stream_index=int(audio["index"]) if audio else None,
        video_duration_s=v_dur,
        audio_duration_s=a_dur,
        video_start_s=_float(video.get("start_time")) if video else None,
        audio_start_s=_float(audio.get("start_time")) if audio else None,
    )


def _expected_duration(stream_s: float | None, container_s: float) -> float:
    return stream_s if stream_s is not None and stream_s > 0 else container_s


def _check_coverage(path: str, what: str, covered_s: float, expected_s: float) -> None:
    if expected_s > 0 and covered_s < _MIN_COVERAGE * expected_s - _COVERAGE_SLACK_S:
        raise ClipError(f"{path}: truncated or corrupt {what}: decoded {covered_s:.3f} s of the {expected_s:.3f} s the container declares")


def decode_audio(path: str | Path, sample_rate: int = 16_000, info: MediaInfo | None = None) -> np.ndarray:
    """Decode the first audio stream to float32 mono at ``sample_rate``: shape (N,).

    The result is cut to the stream's declared duration when the container gives
    one (codec padding at the end is not signal). ``info`` (from :func:`probe`)
    saves a second ffprobe call. Raises ClipError for a file without audio, a
    failing decode, an empty result, or a decode far shorter than the declared
    duration (truncated file).
    """
    info = info or probe(path)
    if not info.has_audio or info.audio_stream_index is None:
        raise ClipError(f"{info.path}: no audio stream")
    cmd = (
        ffmpeg.input(info.path)
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate, map=f"0:{info.audio_stream_index}")
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
        .compile()
    )
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ClipError(f"{info.path}: audio decode failed (ffmpeg exit {proc.returncode}): {_tail(proc.stderr)}")
    return _finish_audio(info, proc.stdout, sample_rate, _tail(proc.stderr))


def _finish_audio(info: MediaInfo, raw: bytes | bytearray, sample_rate: int, tail: str) -> np.ndarray:
    """f32le bytes from ffmpeg -> (N,) float32, cut at the declared duration and checked for coverage."""
    wave = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # (N,) copy: writable
    if info.audio_duration_s is not None and info.audio_duration_s > 0:
        # Codecs pad their last frame (AAC: up to 1024 samples of silence); the
        # container's stream duration says where the real signal ends.
        wave = wave[: int(round(info.audio_duration_s * sample_rate))]
    if wave.size == 0:
        raise ClipError(f"{info.path}: audio stream decoded to zero samples: {tail}")
    _check_coverage(info.path, "audio", wave.size / sample_rate, _expected_duration(info.audio_duration_s, info.duration_s))
    return wave


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) after shrinking so that the longest side is at most ``max_side`` (never enlarged)."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class _StderrReader(threading.Thread):
    """Drains ffmpeg's stderr: frame pts go to a queue, everything else to a short tail."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self.times: queue.Queue[int | None] = queue.Queue()
        self.time_base: Fraction | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self.n_errors = 0  # lines logged at error level or worse (seen only with ``-loglevel level+...``)

    def run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            frame = _SHOWINFO_FRAME.search(line)
            if frame:
                self.times.put(int(frame.group(2)))
                continue
            tb = _SHOWINFO_TB.search(line)
            if tb and int(tb.group(2)) > 0:
                self.time_base = Fraction(int(tb.group(1)), int(tb.group(2)))
            elif "Parsed_showinfo" not in line and line.strip():
                self.tail.append(line)
                self.n_errors += bool(_ERROR_LEVEL.search(line))
        self.times.put(None)  # end of stream

    def next_pts(self) -> int | None:
        return self.times.get()

    def tail_text(self) -> str:
        return _tail("\n".join(self.tail))


def iter_video_frames(
    path: str | Path,
    max_side: int | None = None,
    chunk: int = 32,
    info: MediaInfo | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream the first video stream as RGB chunks with presentation times.

    Yields ``(frames, times)``: frames (N, H, W, 3) uint8 RGB with N <= ``chunk``,
    times (N,) float64 seconds from the first frame (the stream's own pts, so a
    29.97 fps stream gives k * 1001/30000, and variable-rate streams stay exact).
    Frames are shrunk in ffmpeg when ``max_side`` is given. Only one chunk is held
    in memory at a time, and a chunk never exceeds MAX_CHUNK_BYTES (fewer frames per
    chunk for large frames). Raises ClipError when there is no video stream, ffmpeg
    fails, nothing decodes, or the decode stops far short of the declared duration.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    info = info or probe(path)
    if not info.has_video or info.video_stream_index is None or not info.width or not info.height:
        raise ClipError(f"{info.path}: no video stream")
    width, height = output_size(info.width, info.height, max_side)
    stream = ffmpeg.input(info.path)[str(info.video_stream_index)]
    if (width, height) != (info.width, info.height):
        stream = stream.filter("scale", width, height, flags="area")
    # checksum=0: the per-frame Adler-32 of every plane is never used (only pts are read), and
    # on 1080p it was a quarter of the video process's CPU.
    stream = stream.filter("showinfo", checksum=0)
    cmd = (
        stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")
        .global_args("-nostdin", "-hide_banner", "-loglevel", "info")
        .compile()
    )
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = _StderrReader(proc.stderr)
    reader.start()
    yield from _framed_video(proc, reader, info, width, height, chunk)


def _framed_video(
    proc: subprocess.Popen, reader: _StderrReader, info: MediaInfo, width: int, height: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """iter_video_frames' reading of a started ffmpeg (RGB frames on stdout, showinfo on stderr to ``reader``)."""
    frame_bytes = width * height * 3
    chunk = max(1, min(chunk, MAX_CHUNK_BYTES // frame_bytes))
    first_pts: int | None = None
    n_done = 0
    last_time = 0.0
    try:
        while True:
            frames = np.empty((chunk, height, width, 3), dtype=np.uint8)  # (chunk, H, W, 3)
            got = _read_into(proc.stdout, memoryview(frames).cast("B"))
            n = got // frame_bytes
            if n == 0:
                break
            times = np.empty(n, dtype=np.float64)  # (n,)
            for i in range(n):
                pts = reader.next_pts()
                if pts is None or reader.time_base is None:
                    raise ClipError(f"{info.path}: ffmpeg gave frame {n_done + i} without a timestamp: {reader.tail_text()}")
                first_pts = pts if first_pts is None else first_pts
                # Exact rational pts * time_base (showinfo's pts_time has only 6 significant digits).
                times[i] = float((pts - first_pts) * reader.time_base)
            n_done += n
            last_time = float(times[-1])
            yield frames[:n], times
            if got < chunk * frame_bytes:
                break
        proc.wait()
        reader.join(timeout=5)  # all stderr (the error tail) is in once the reader sees EOF
        if proc.returncode != 0:
            raise ClipError(f"{info.path}: video decode failed (ffmpeg exit {proc.returncode}): {reader.tail_text()}")
        if n_done == 0:
            raise ClipError(f"{info.path}: video stream decoded to zero frames: {reader.tail_text()}")
        frame_s = 1.0 / info.fps if info.fps else 0.0
        _check_coverage(info.path, "video", last_time + frame_s, _expected_duration(info.video_duration_s, info.duration_s))
    finally:
        if proc.poll() is None:  # the consumer stopped early or an error was raised
            proc.kill()
            proc.wait()
        reader.join(timeout=5)  # EOF follows the exit, so the reader ends before its pipe is closed
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def decode_audio_video(
    audio: MediaInfo,
    video: MediaInfo,
    consume: Callable[[Iterator[tuple[np.ndarray, np.ndarray]]], T],
    sample_rate: int = 16_000,
    chunk: int = 32,
) -> tuple[np.ndarray, T]:
    """decode_audio(audio) and ``consume(iter_video_frames(video))`` from one ffmpeg process: (wave (N,), result).

    The two outputs take the very options of the separate decoders (a second output of the
    same command line), so the samples, frames and times are the same; what is saved is one
    ffmpeg start (~0.1 CPU s, mostly the dynamic loader). ``audio`` and ``video`` may be one
    file or two. Strict: ClipError for anything the separate decoders would refuse, and also
    for any ffmpeg message at error level (ffmpeg's decode-error rate that decides its exit
    status is summed over the streams it decodes, so one process could pass where the audio
    alone fails) or a consumer that stops early. A caller that must keep the separate
    decoders' messages falls back to them on ClipError (features.extract does).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not audio.has_audio or audio.audio_stream_index is None:
        raise ClipError(f"{audio.path}: no audio stream")
    if not video.has_video or video.video_stream_index is None or not video.width or not video.height:
        raise ClipError(f"{video.path}: no video stream")
    inputs = [audio.path] if audio.path == video.path else [audio.path, video.path]
    v_input = len(inputs) - 1
    read_fd, write_fd = os.pipe()
    # Output 1 is iter_video_frames' (full size), output 2 decode_audio's, option for option.
    cmd = ["ffmpeg", *(arg for path in inputs for arg in ("-i", path))]
    cmd += ["-filter_complex", f"[{v_input}:{video.video_stream_index}]showinfo=checksum=0[s0]", "-map", "[s0]"]
    cmd += ["-f", "rawvideo", "-fps_mode", "passthrough", "-pix_fmt", "rgb24", "pipe:"]
    cmd += ["-f", "f32le", "-ac", "1", "-acodec", "pcm_f32le", "-ar", str(sample_rate)]
    cmd += ["-map", f"0:{audio.audio_stream_index}", f"pipe:{write_fd}"]
    cmd += ["-nostdin", "-hide_banner", "-loglevel", "level+info"]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds its copy; the reader sees EOF when the child exits
    samples = bytearray()

    def drain() -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while block := pipe.read(1 << 20):
                samples.extend(block)

    audio_reader = threading.Thread(target=drain, daemon=True)
    audio_reader.start()
    reader = _StderrReader(proc.stderr)
    reader.start()
    frames = _framed_video(proc, reader, video, video.width, video.height, chunk)
    try:
        result = consume(frames)
        if proc.returncode is None:  # the consumer left frames unread
            raise ClipError(f"{video.path}: the consumer stopped before the last frame")
    finally:
        frames.close()  # kills ffmpeg if it still runs, once a frame was asked for
        if proc.poll() is None:  # the consumer failed before asking for a frame
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        audio_reader.join()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if reader.n_errors:
        raise ClipError(f"{audio.path}: ffmpeg reported {reader.n_errors} error(s): {reader.tail_text()}")
    return _finish_audio(audio, samples, sample_rate, reader.tail_text()), result


def _read_into(pipe: Any, buf: memoryview) -> int:
    """Fill ``buf`` from ``pipe`` until full or EOF; returns the number of bytes read."""
    total = 0
    while total < len(buf):
        got = pipe.readinto(buf[total:])
        if not got:
            break
        total += got
    return total
