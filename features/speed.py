"""Speed perturbation: extra training copies of a clip, played faster or slower (pure functions).

As in Kaldi's and lhotse's speed perturbation, the recording is resampled, so tempo and pitch
change together: a copy at speed 1.1 is the clip played 10 % faster, 1/1.1 of its length, a
little higher in pitch. For speech emotion the nuisance that matters most is the speaker
(docs/results.md: standardising each speaker's features gains more than any model change), and
a pitch and tempo change makes a copy sound like another speaker saying the same thing with the
same emotion.

Copies are preprocessed once, like any clip: with a pretrained encoder that is the only way to
augment (its states cannot be perturbed after the fact). Each copy is a clip of its own in the
store, named ``<clip_id>_sp<factor>``, with ``source_clip_id`` and ``speed`` in its manifest row,
so training can give a fold's training speakers their copies and keep every copy out of
validation and test (``modeling.data.splits.split_speed_copies``). A copy's timestamps are the
source's divided by the factor, for both streams, so audio and faces stay in step.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np

from features.manifest import MAX_CLIP_ID, SAFE_ID, ClipRecord, Rejection

MIN_SPEED, MAX_SPEED = 0.5, 2.0  # beyond these a copy no longer sounds like speech
SPEED_DENOMINATOR = 100  # factors are exact to 0.01: the resampling ratio is a small fraction


def parse_speed_factors(text: str | None) -> tuple[float, ...]:
    """``"0.9,1.1"`` -> (0.9, 1.1), checked; None or "" -> (). Raises ValueError naming the bad value."""
    if text is None or not text.strip():
        return ()
    factors = []
    for part in text.split(","):
        try:
            factors.append(float(part))
        except ValueError:
            raise ValueError(f"speed factor {part.strip()!r} is not a number (expected e.g. 0.9,1.1)") from None
    return check_speed_factors(factors)


def check_speed_factors(factors: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Sorted, each in [0.5, 2.0], a multiple of 0.01, not 1 (the clip itself), no repeats."""
    out = []
    for factor in factors:
        factor = float(factor)
        if not MIN_SPEED <= factor <= MAX_SPEED:
            raise ValueError(f"speed factor {factor} is outside [{MIN_SPEED}, {MAX_SPEED}]")
        if abs(factor * SPEED_DENOMINATOR - round(factor * SPEED_DENOMINATOR)) > 1e-9:
            raise ValueError(f"speed factor {factor} has more than two decimals")
        if round(factor * SPEED_DENOMINATOR) == SPEED_DENOMINATOR:
            raise ValueError("speed factor 1 is the clip itself, not a copy")
        out.append(round(factor, 2))
    if len(set(out)) != len(out):
        raise ValueError(f"speed factors repeat: {sorted(out)}")
    return tuple(sorted(out))


def speed_label(factor: float) -> str:
    """The manifest's spelling of a factor: 0.9 -> "0.9", 1.15 -> "1.15"."""
    return f"{round(factor, 2):g}"


def copy_clip_id(clip_id: str, factor: float) -> str:
    """The id of a clip's copy at ``factor``: ``<clip_id>_sp<factor>``, e.g. ``a_sp0.9``."""
    return f"{clip_id}_sp{speed_label(factor)}"


def speed_copy(record: ClipRecord, factor: float) -> ClipRecord:
    """The record of ``record``'s copy at ``factor``: same files, speaker and label, its own id."""
    if record.source_clip_id is not None:
        raise ValueError(f"clip {record.clip_id!r} is already a speed copy of {record.source_clip_id!r}")
    return replace(record, clip_id=copy_clip_id(record.clip_id, factor), source_clip_id=record.clip_id, speed=speed_label(factor))


def plan_speed_copies(records: list[ClipRecord], factors: tuple[float, ...]) -> tuple[list[ClipRecord], list[Rejection]]:
    """(each record's copies, factor by factor; the copies refused). A copy whose id is already a
    recording's (a folder corpus holding both ``a.mp4`` and ``a_sp0.9.mp4``), or whose id the suffix
    makes too long for the store, is refused, with the reason."""
    taken = {r.clip_id for r in records}
    copies, refused = [], []
    for factor in factors:
        for record in records:
            copy = speed_copy(record, factor)
            path = record.audio_path or record.video_path or ""
            if copy.clip_id in taken:
                refused.append(Rejection(path, f"its speed copy {copy.clip_id!r} would take the id of a recording of the corpus"))
            elif len(copy.clip_id) > MAX_CLIP_ID:
                refused.append(
                    Rejection(
                        path,
                        f"its speed copy's id would be {len(copy.clip_id)} characters, over the store's {MAX_CLIP_ID} ({copy.clip_id!r})",
                    )
                )
            elif not SAFE_ID.match(copy.clip_id):  # the source's own id is not one the store accepts
                refused.append(Rejection(path, f"its id {record.clip_id!r} is not a safe path component ({SAFE_ID.pattern})"))
            else:
                copies.append(copy)
    return copies, refused


def with_speed_copies(records: list[ClipRecord], factors: tuple[float, ...]) -> list[ClipRecord]:
    """The records, then each one's copies (factor by factor), so recordings are processed first."""
    return list(records) + plan_speed_copies(records, factors)[0]


def speed_perturb(wave: np.ndarray, factor: float) -> np.ndarray:
    """(N,) -> (about N / factor,) float32: the wave played ``factor`` times as fast.

    Polyphase resampling by the exact ratio (e.g. 0.9 -> 10/9 as many samples), with its
    anti-aliasing filter, at the same sample rate: tempo and pitch scale together.
    """
    if wave.ndim != 1:
        raise ValueError(f"speed_perturb expects a mono (N,) wave, got shape {wave.shape}")
    from scipy.signal import resample_poly  # here: scipy.signal costs ~0.3 s to import, and only copies need it

    ratio = Fraction(round(factor * SPEED_DENOMINATOR), SPEED_DENOMINATOR)  # output samples = N * den / num
    if ratio == 1:
        return wave.astype(np.float32, copy=False)
    return resample_poly(wave.astype(np.float32, copy=False), ratio.denominator, ratio.numerator).astype(np.float32)
