"""Local Hugging Face checkpoints as the audio encoder (``hf:/dir``), on tiny randomly initialised
models that each test module saves to a temporary folder: shapes, frame counts and times from the
conv stack, identity in the config hash, refusals (pickle, changed weights, bad layers), and the
path msata preprocess and msata predict take."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from features.audio_encoders import hf_checkpoint
from features.audio_encoders.hf_checkpoint import CheckpointError
from features.audio_encoders.stage import check_encoder_weights, encode_wave, load_checkpoint_encoder
from features.audio_encoders.whisper import whisper_log_mel
from features.config import AudioEncoderConfig, FeatureConfig
from features.manifest import ClipRecord

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}  # fmt: skip
STANDARD_STACK = {"conv_dim": (8,) * 7}  # wav2vec2's kernels (10,3,3,3,3,2,2) and strides (5,2,2,2,2,2,2): 320-sample hop
HALF_HOP_STACK = {"conv_dim": (8,) * 6, "conv_kernel": (10, 3, 3, 3, 3, 2), "conv_stride": (5, 2, 2, 2, 2, 2)}  # 160-sample hop


def _save(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _make(kind: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    if kind == "wav2vec2":
        return _save(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY, **STANDARD_STACK)), directory)
    if kind == "hubert":
        return _save(transformers.HubertModel(transformers.HubertConfig(**TINY, **HALF_HOP_STACK)), directory)
    if kind == "wavlm":
        return _save(
            transformers.WavLMModel(transformers.WavLMConfig(**TINY, **STANDARD_STACK, num_buckets=16, max_bucket_distance=64)), directory
        )
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=64, vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return _save(transformers.WhisperModel(config), directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: _make(kind, root / kind) for kind in ("wav2vec2", "hubert", "wavlm", "whisper")}


def _wave(n: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


N = 16_037  # 1 s and a bit: the trailing samples make no whole frame
# (frames, first frame's centre in s, hop in s) for N samples, worked out by hand from each conv stack:
# 320-sample hop, 400-sample receptive field: (N - 400) // 320 + 1 = 49 frames, centred at (399 / 2 + 320 j) / 16 kHz;
# 160-sample hop, 240-sample receptive field: (N - 240) // 160 + 1 = 99 frames; Whisper: ceil((N // 160) / 2) = 50 at 0.02 j.
EXPECTED = {
    "wav2vec2": (49, 199.5 / 16_000, 0.02),
    "hubert": (99, 119.5 / 16_000, 0.01),
    "wavlm": (49, 199.5 / 16_000, 0.02),
    "whisper": (50, 0.0, 0.02),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_states_shape_frames_times_and_determinism(checkpoints: dict[str, Path], kind: str) -> None:
    config = AudioEncoderConfig(name=f"hf:{checkpoints[kind]}")
    assert (config.model_type, config.n_layers, config.width, config.state_shape()) == (kind, 2, 32, (3, 32))
    wave = _wave(N)
    states, times = encode_wave(wave, config, "cpu")
    frames, first, hop = EXPECTED[kind]
    assert states.shape == (frames, 3, 32) and states.dtype == np.float16 and times.dtype == np.float64
    assert np.allclose(times, first + hop * np.arange(frames))
    again, _ = encode_wave(wave, config, "cpu")
    assert np.array_equal(states, again)
    assert np.isfinite(states.astype(np.float32)).all() and states.std() > 0


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm"])
def test_wav2vec2_family_states_are_the_transformers_models_hidden_states(checkpoints: dict[str, Path], kind: str) -> None:
    config = AudioEncoderConfig(name=f"hf:{checkpoints[kind]}", layers=(0, 2))
    wave = _wave(8_000, seed=1)
    states, _ = encode_wave(wave, config, "cpu")
    model = transformers.AutoModel.from_pretrained(checkpoints[kind], use_safetensors=True).eval()
    normalised = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)  # no preprocessor_config.json: do_normalize defaults to True
    with torch.inference_mode():
        hidden = model(torch.from_numpy(normalised)[None], output_hidden_states=True).hidden_states
    expected = torch.stack([hidden[0][0], hidden[2][0]], dim=1).to(torch.float16).numpy()
    assert np.array_equal(states, expected)


def test_whisper_checkpoint_runs_unpadded_on_msata_port_which_matches_transformers_at_30_s(checkpoints: dict[str, Path]) -> None:
    config = AudioEncoderConfig(name=f"hf:{checkpoints['whisper']}")
    port = load_checkpoint_encoder(str(checkpoints["whisper"]), config.weights_sha256, "cpu")
    model = transformers.AutoModel.from_pretrained(checkpoints["whisper"], use_safetensors=True).eval()
    mel = whisper_log_mel(torch.from_numpy(_wave(480_000, seed=2)))[None]  # the 3000 mel frames transformers insists on
    with torch.inference_mode():
        ours, theirs = port(mel), model.encoder(mel, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=False):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_long_waves_are_encoded_in_windows_on_one_hop_grid(checkpoints: dict[str, Path]) -> None:
    whole = AudioEncoderConfig(name=f"hf:{checkpoints['wav2vec2']}")
    windowed = AudioEncoderConfig(name=f"hf:{checkpoints['wav2vec2']}", window_s=0.5)
    wave = _wave(16_000 * 2 + 123)
    states, times = encode_wave(wave, windowed, "cpu")
    reference, reference_times = encode_wave(wave, whole, "cpu")
    assert states.shape == reference.shape and np.allclose(times, reference_times)  # no gap, no overlap at window edges
    assert np.allclose(np.diff(times), 0.02)


def test_too_short_a_wave_gives_no_frame(checkpoints: dict[str, Path]) -> None:
    for kind in ("wav2vec2", "whisper"):
        states, times = encode_wave(_wave(300), AudioEncoderConfig(name=f"hf:{checkpoints[kind]}"), "cpu")
        assert states.shape == (0, 3, 32) and times.shape == (0,)


def test_frame_geometry_matches_transformers_own_output_lengths(checkpoints: dict[str, Path]) -> None:
    for kind in ("wav2vec2", "hubert"):
        model = transformers.AutoModel.from_pretrained(checkpoints[kind], use_safetensors=True)
        geometry = hf_checkpoint.conv_geometry(checkpoints[kind])
        for n in (400, 999, 16_000, 48_321):
            assert geometry.n_frames(n) == int(model._get_feat_extract_output_lengths(torch.tensor(n)))


def test_pickle_only_or_incomplete_directories_are_refused(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(checkpoints["wav2vec2"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(ValueError, match=r"only as pickle \(pytorch_model.bin\), which msata never loads") as err:
        AudioEncoderConfig(name=f"hf:{pickled}")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        AudioEncoderConfig(name=f"hf:{tmp_path / 'nowhere'}")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 'bert' is not a supported speech encoder"):
        AudioEncoderConfig(name=f"hf:{bert}")


def test_layers_out_of_range_are_one_line_value_errors(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"layers \[0, 3\] .* in 0\.\.2") as err:
        AudioEncoderConfig(name=f"hf:{checkpoints['hubert']}", layers=(0, 3))
    assert "\n" not in str(err.value)
    assert AudioEncoderConfig(name=f"hf:{checkpoints['hubert']}", layers=(2,)).state_shape() == (1, 32)


def test_identity_enters_the_hash_and_a_changed_checkpoint_is_refused(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    from storage import FeatureStore, StoreError

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["wav2vec2"], directory)
    before = FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{directory}"))
    store = FeatureStore.create(tmp_path / "store", before)
    assert FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{directory}")).config_hash() == before.config_hash()  # stable
    _make("wav2vec2", directory, seed=1)  # same architecture, other weights, same path
    after = FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{directory}"))
    assert after.audio_encoder.weights_sha256 != before.audio_encoder.weights_sha256 and after.config_hash() != before.config_hash()
    with pytest.raises(StoreError, match="refusing to add features"):
        FeatureStore.create(store.url, after)
    with pytest.raises(CheckpointError, match="sha256 .* the checkpoint changed") as err:
        encode_wave(_wave(4_000), before.audio_encoder, "cpu")  # a model's recorded config against the changed file
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="the checkpoint changed"):
        check_encoder_weights(before.audio_encoder)
    other_kind = FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{checkpoints['hubert']}"))
    assert len({before.config_hash(), after.config_hash(), other_kind.config_hash(), FeatureConfig().config_hash()}) == 4


def test_a_recorded_config_needs_no_checkpoint(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    from modeling.data.examples import model_input_settings

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["hubert"], directory)
    config = FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{directory}", layers=(1, 2)))
    recorded = config.to_dict()
    shutil.rmtree(directory)  # a training worker without the checkpoint reads the store's config
    again = FeatureConfig.from_dict(recorded)
    assert again == config and again.config_hash() == config.config_hash()
    assert model_input_settings(again)["audio_layers"] == 2 and model_input_settings(again)["audio_width"] == 32
    with pytest.raises(CheckpointError, match="does not exist"):
        encode_wave(_wave(4_000), again.audio_encoder, "cpu")


def test_packaged_encoder_configs_keep_their_hash_keys() -> None:
    data = FeatureConfig(audio_encoder=AudioEncoderConfig(name="whisper-tiny.en")).to_dict()["audio_encoder"]
    assert set(data) == {"name", "layers", "weights_sha256", "window_s"}  # stores built before hf: checkpoints keep their hash
    with pytest.raises(ValueError, match="for hf: checkpoints only"):
        AudioEncoderConfig(name="whisper-tiny.en", n_layers=4)


def _write_clips(root: Path, n: int = 2) -> list[ClipRecord]:
    records = []
    for i in range(n):
        path = root / f"clip{i}.wav"
        t = np.arange(int(16_000 * (0.8 + 0.3 * i))) / 16_000
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * (180 + 60 * i) * t)).astype(np.float32), 16_000)
        records.append(
            ClipRecord(clip_id=f"c{i}", dataset="folder", speaker=f"s{i}", label=("happy", "sad")[i], audio_path=str(path), video_path=None)
        )
    return records


def test_preprocess_and_predict_with_a_checkpoint(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """The code msata preprocess runs per clip (flows.preprocess.process_clip), the store read back,
    then msata predict's Predictor recomputing the states from the recorded feature config."""
    from flows.preprocess import process_clip
    from modeling.data.examples import model_input_settings
    from modeling.inference.predictor import Predictor, predict_files
    from modeling.network.encoder import MsataConfig, MsataModel
    from storage import FeatureStore

    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["wavlm"], directory)
    config = FeatureConfig(audio_encoder=AudioEncoderConfig(name=f"hf:{directory}"))
    records = _write_clips(tmp_path)
    outcomes = [process_clip(record, str(tmp_path / "store"), config) for record in records]
    assert [o.status for o in outcomes] == ["done", "done"], outcomes
    store = FeatureStore.open(tmp_path / "store")
    assert store.config == config
    for record, seconds in zip(records, (0.8, 1.1), strict=False):
        clip = store.read(record.clip_id)
        frames = (int(16_000 * seconds) - 400) // 320 + 1
        assert clip.logmel is None and clip.audio_states.shape == (frames, 3, 32) and clip.audio_states.dtype == np.float16
        assert np.allclose(clip.audio_times, 199.5 / 16_000 + 0.02 * np.arange(frames))

    torch.manual_seed(0)
    settings = model_input_settings(config)
    model = MsataModel(MsataConfig(n_classes=2, d_model=32, n_heads=2, n_layers=1, video_channels=[8, 16], ctm_dim=16, **settings))
    recorded = FeatureConfig.from_dict(config.to_dict())  # as a checkpoint's feature config comes back
    predictor = Predictor(model, recorded, ["happy", "sad"], torch.device("cpu"), modalities=("audio",))
    predictions = predict_files(predictor, [r.audio_path for r in records])
    assert all(p.error is None and p.label in ("happy", "sad") and p.modalities == ["audio"] for p in predictions), predictions
    _make("wavlm", directory, seed=3)  # the checkpoint changes under the model
    changed = predict_files(predictor, [records[0].audio_path])
    assert changed[0].error is not None and "the checkpoint changed" in changed[0].error


@pytest.mark.slow
def test_cli_preprocess_with_a_checkpoint(tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "flows"))  # the CLI tests' helpers
    from flow_servers import MSATA, REPO, clean_env

    from storage import FeatureStore

    root = tmp_path / "corpus"
    root.mkdir()
    records = _write_clips(root)
    (root / "labels.csv").write_text(
        "path,label,speaker\n" + "".join(f"{Path(r.audio_path).name},{r.label},{r.speaker}\n" for r in records)
    )
    args = [
        "preprocess",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--store",
        str(tmp_path / "store"),
        "--audio-encoder",
        f"hf:{checkpoints['hubert']}",
    ]
    done = subprocess.run(
        [MSATA, *args], env=clean_env(tmp_path) | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = FeatureStore.open(tmp_path / "store")
    assert store.config.audio_encoder.model_type == "hubert" and len(store.clip_ids()) == 2
    assert store.read(store.clip_ids()[0]).audio_states.shape[1:] == (3, 32)
    bad = subprocess.run(
        [MSATA, *args[:-1], f"hf:{tmp_path / 'nowhere'}"], env=clean_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "does not exist" in bad.stdout + bad.stderr and "Traceback" not in bad.stdout + bad.stderr


def test_checkpoints_with_a_head_give_their_base_models_states(tmp_path: Path) -> None:
    """A fine-tuned ...ForCTC or WhisperForConditionalGeneration directory: AutoModel takes its base model."""
    torch.manual_seed(0)
    ctc = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**TINY, **STANDARD_STACK, vocab_size=8))
    _save(ctc, tmp_path / "ctc")
    states, _ = encode_wave(_wave(4_000), AudioEncoderConfig(name=f"hf:{tmp_path / 'ctc'}"), "cpu")
    _save(ctc.wav2vec2, tmp_path / "base")
    assert np.array_equal(states, encode_wave(_wave(4_000), AudioEncoderConfig(name=f"hf:{tmp_path / 'base'}"), "cpu")[0])
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=64, vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    ))  # fmt: skip
    _save(whisper, tmp_path / "asr")
    states, _ = encode_wave(_wave(4_000), AudioEncoderConfig(name=f"hf:{tmp_path / 'asr'}"), "cpu")
    _save(whisper.model, tmp_path / "asr-base")
    assert np.array_equal(states, encode_wave(_wave(4_000), AudioEncoderConfig(name=f"hf:{tmp_path / 'asr-base'}"), "cpu")[0])
