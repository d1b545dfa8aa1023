"""Speed-perturbed copies: factor checks, copy records, the resampling itself."""

from __future__ import annotations

import numpy as np
import pytest

from features.manifest import ClipRecord
from features.speed import check_speed_factors, parse_speed_factors, speed_copy, speed_perturb, with_speed_copies


def _record(clip_id: str = "a-01") -> ClipRecord:
    return ClipRecord(clip_id=clip_id, dataset="ravdess", speaker="01", label="sad", audio_path="/x/a.wav", video_path=None)


def test_factors_parse_sorted_and_checked() -> None:
    assert parse_speed_factors("1.1, 0.9") == (0.9, 1.1)
    assert parse_speed_factors(None) == () and parse_speed_factors(" ") == ()
    with pytest.raises(ValueError, match="'fast' is not a number"):
        parse_speed_factors("0.9,fast")
    with pytest.raises(ValueError, match=r"3.0 is outside \[0.5, 2.0\]"):
        check_speed_factors([3.0])
    with pytest.raises(ValueError, match="factor 1 is the clip itself"):
        check_speed_factors([1.0])
    with pytest.raises(ValueError, match="more than two decimals"):
        check_speed_factors([0.905])
    with pytest.raises(ValueError, match="repeat"):
        check_speed_factors([0.9, 0.90])


def test_copies_are_records_of_their_own_after_the_recordings() -> None:
    a, b = _record("a"), _record("b")
    copy = speed_copy(a, 0.9)
    assert (copy.clip_id, copy.source_clip_id, copy.speed, copy.speed_factor) == ("a_sp0.9", "a", "0.9", 0.9)
    assert (copy.speaker, copy.label, copy.audio_path) == (a.speaker, a.label, a.audio_path)
    assert a.speed_factor == 1.0 and a.source_clip_id is None
    assert [r.clip_id for r in with_speed_copies([a, b], (0.9, 1.15))] == ["a", "b", "a_sp0.9", "b_sp0.9", "a_sp1.15", "b_sp1.15"]
    with pytest.raises(ValueError, match="already a speed copy"):
        speed_copy(copy, 1.1)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_perturbed_wave_is_shorter_or_longer_and_higher_or_lower(factor: float) -> None:
    sr, n = 16_000, 16_000
    tone = np.sin(2 * np.pi * 440.0 * np.arange(n) / sr).astype(np.float32)
    out = speed_perturb(tone, factor)
    assert out.dtype == np.float32 and abs(len(out) - n / factor) <= 1
    spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
    peak_hz = np.argmax(spectrum) * sr / (len(out) - 2000)
    assert peak_hz == pytest.approx(440.0 * factor, rel=0.01)  # played faster: higher in pitch
    assert np.abs(out).max() == pytest.approx(1.0, abs=0.02)  # the level is kept
    with pytest.raises(ValueError, match="mono"):
        speed_perturb(np.zeros((2, 100), np.float32), factor)


def test_a_copy_that_would_take_a_recordings_id_is_refused() -> None:
    from features.speed import plan_speed_copies

    a, clash = _record("a"), _record("a_sp0.9")
    copies, refused = plan_speed_copies([a, clash], (0.9,))
    assert [c.clip_id for c in copies] == ["a_sp0.9_sp0.9"]
    assert len(refused) == 1 and "'a_sp0.9' would take the id of a recording" in refused[0].reason


def test_a_copy_whose_id_would_be_too_long_for_the_store_is_refused() -> None:
    from features.speed import plan_speed_copies

    long_id = "x" * 146  # a valid id (<= 150); with "_sp0.9" it would be 152
    copies, refused = plan_speed_copies([_record(long_id), _record("b")], (0.9,))
    assert [c.clip_id for c in copies] == ["b_sp0.9"]
    assert len(refused) == 1 and "152 characters, over the store's 150" in refused[0].reason
    copies, refused = plan_speed_copies([_record("a b")], (0.9,))  # a record built in code with an id the store refuses
    assert copies == [] and "its id 'a b' is not a safe path component" in refused[0].reason
