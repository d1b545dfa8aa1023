"""A local Hugging Face speech-encoder checkpoint (``--audio-encoder hf:/dir``) as a feature stage.

Supported ``model_type``s: whisper (encoder only), wav2vec2, hubert, wavlm. The directory must
hold ``config.json`` and one ``model.safetensors``; weights only in pickle formats
(``pytorch_model.bin``, ``*.pt``...) are refused, and nothing in the directory is ever unpickled
(``use_safetensors=True``, ``local_files_only=True``, no remote code).

Identity: the sha256 of ``model.safetensors`` (cached per path, inode, size and mtime), the
model type, the number of layers and the width; ``AudioEncoderConfig`` records them at creation,
and every load compares the file with the recorded sha256.

Whisper checkpoints are loaded with ``transformers`` and their encoder weights handed to msata's
own port (``whisper.WhisperEncoder``), which runs on the clip as it is: Hugging Face's
``WhisperEncoder`` insists on 3000 mel frames (30 s, padded), and its states then depend on
how much padding the clip got. wav2vec2, HuBERT and WavLM run through ``transformers`` on the
raw 16 kHz wave. The top of this module is torch-free (``features.config`` imports it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.audio_encoders.checksums import WeightsError, sha256_of

SUPPORTED_TYPES = ("whisper", "wav2vec2", "hubert", "wavlm")
WAV2VEC2_FAMILY = ("wav2vec2", "hubert", "wavlm")
SAMPLE_RATE = 16_000
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(WeightsError, ValueError):
    """A checkpoint directory msata will not use; a ValueError too, so the CLI prints it as one line."""


@dataclass(frozen=True)
class CheckpointInfo:
    model_type: str
    n_layers: int  # transformer blocks; n_layers + 1 hidden states, the embedding first
    width: int
    sha256: str  # of model.safetensors


def checkpoint_weights(directory: str | Path) -> Path:
    """``directory/model.safetensors``, after checking the directory is a usable checkpoint."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory {root} does not exist (or is not a directory)")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} is not a Hugging Face checkpoint: it has no config.json")
    weights = root / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{root} holds its weights only as pickle ({', '.join(pickles)}), which msata never loads (it can run code): "
            f"re-save it with `model.save_pretrained(dir, safe_serialization=True)` to get {WEIGHTS_FILE}"
        )
    if (root / f"{WEIGHTS_FILE}.index.json").is_file():
        raise CheckpointError(f"{root} holds sharded safetensors; msata needs one {WEIGHTS_FILE} (re-save with a larger max_shard_size)")
    raise CheckpointError(f"{root} has no {WEIGHTS_FILE}")


_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}


def weights_sha256(path: Path) -> str:
    """sha256 of ``path``, remembered per (path, inode, size, mtime): hashing a 1 GB file takes seconds."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_of([path])
    return _SHA_CACHE[key]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_checkpoint(directory: str | Path) -> CheckpointInfo:
    """The identity of the checkpoint in ``directory`` (reads config.json, hashes the weights)."""
    weights = checkpoint_weights(directory)
    config = read_json(Path(directory) / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{directory}: model_type {model_type!r} is not a supported speech encoder; expected one of {list(SUPPORTED_TYPES)}"
        )
    if model_type == "whisper":
        n_layers, width = config.get("encoder_layers", 6), config.get("d_model", 384)  # WhisperConfig's defaults
    else:
        n_layers, width = config.get("num_hidden_layers", 12), config.get("hidden_size", 768)
    return CheckpointInfo(model_type=model_type, n_layers=int(n_layers), width=int(width), sha256=weights_sha256(weights))


def verified_weights(directory: str | Path, expected_sha256: str) -> Path:
    """The weights file, if it is still the one whose sha256 was recorded; CheckpointError otherwise."""
    weights = checkpoint_weights(directory)
    actual = weights_sha256(weights)
    if actual != expected_sha256:
        raise CheckpointError(
            f"{weights} has sha256 {actual[:12]}..., but these features were defined with {expected_sha256[:12]}...: "
            "the checkpoint changed since; restore it or build a new store and model"
        )
    return weights


@dataclass(frozen=True)
class FrameGeometry:
    """Where the frames of a stack of unpadded strided convolutions sit, in samples."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def receptive_field(self) -> int:
        field, jump = 1, 1
        for kernel, stride in zip(self.kernels, self.strides, strict=False):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    def n_frames(self, n_samples: int) -> int:
        n = n_samples
        for kernel, stride in zip(self.kernels, self.strides, strict=False):
            if n < kernel:
                return 0
            n = (n - kernel) // stride + 1
        return n

    def times(self, n_frames: int, offset_samples: int = 0) -> np.ndarray:
        """Centre of each frame's receptive field, seconds from the wave's first sample. (T,) float64"""
        first = offset_samples + (self.receptive_field - 1) / 2
        return (first + self.hop * np.arange(n_frames, dtype=np.float64)) / SAMPLE_RATE


def conv_geometry(directory: str | Path) -> FrameGeometry:
    config = read_json(Path(directory) / "config.json")
    kernels = tuple(int(k) for k in config.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2)))
    strides = tuple(int(s) for s in config.get("conv_stride", (5, 2, 2, 2, 2, 2, 2)))
    if len(kernels) != len(strides) or not kernels:
        raise CheckpointError(f"{directory}/config.json: conv_kernel {kernels} and conv_stride {strides} differ in length")
    return FrameGeometry(kernels, strides)


def normalises_wave(directory: str | Path) -> bool:
    """Whether the checkpoint's feature extractor standardises each input (``do_normalize``).

    Without a preprocessor_config.json, Wav2Vec2FeatureExtractor's default (True) applies."""
    path = Path(directory) / "preprocessor_config.json"
    return bool(read_json(path).get("do_normalize", True)) if path.is_file() else True


def load_model(directory: str | Path, expected_sha256: str, device: str = "cpu") -> Any:
    """The checkpoint's base model through ``transformers`` (safetensors only, nothing fetched), eval mode."""
    verified_weights(directory, expected_sha256)
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.utils.logging.disable_progress_bar()  # no per-clip tqdm bars in preprocessing logs
    config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    if config.model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{directory}: model_type {config.model_type!r} is not a supported speech encoder; expected one of {list(SUPPORTED_TYPES)}"
        )
    # AutoModel gives the base model (WhisperModel, Wav2Vec2Model...), dropping a CTC or seq2seq head.
    model = AutoModel.from_pretrained(
        directory, config=config, use_safetensors=True, local_files_only=True, trust_remote_code=False, dtype="float32"
    )
    return model.to(device).eval()


def whisper_port(model: Any) -> Any:
    """msata's ``WhisperEncoder`` with the weights of a transformers ``WhisperModel``'s encoder.

    The tensors are renamed to the CTranslate2 layout that ``WhisperEncoder.from_ct2`` reads
    (fused q/k/v; Whisper's k projection has no bias, CTranslate2 stores zeros)."""
    from features.audio_encoders.whisper import MAX_FRAMES, N_MELS, WhisperEncoder

    config = model.config
    if config.num_mel_bins != N_MELS or config.max_source_positions != MAX_FRAMES:
        raise CheckpointError(
            f"Whisper checkpoint with {config.num_mel_bins} mel bins and {config.max_source_positions} positions: "
            f"msata's Whisper front-end supports {N_MELS} and {MAX_FRAMES} (large-v3's 128 mel bins are not supported)"
        )
    if config.activation_function != "gelu" or config.encoder_ffn_dim != 4 * config.d_model or getattr(config, "scale_embedding", False):
        raise CheckpointError(
            f"Whisper checkpoint with activation {config.activation_function!r}, FFN {config.encoder_ffn_dim} for width {config.d_model} "
            f"or scaled embeddings: msata's port has Whisper's GELU, FFN of 4 x width and no scaling"
        )
    hf = {k: v.detach().float().cpu().numpy() for k, v in model.encoder.state_dict().items()}
    ct2 = {
        "encoder/num_heads": np.array(config.encoder_attention_heads, np.int32),
        "encoder/conv1/weight": hf["conv1.weight"], "encoder/conv1/bias": hf["conv1.bias"],
        "encoder/conv2/weight": hf["conv2.weight"], "encoder/conv2/bias": hf["conv2.bias"],
        "encoder/position_encodings/encodings": hf["embed_positions.weight"],
        "encoder/layer_norm/gamma": hf["layer_norm.weight"], "encoder/layer_norm/beta": hf["layer_norm.bias"],
    }  # fmt: skip
    for i in range(config.encoder_layers):
        hf_i, ct = f"layers.{i}.", f"encoder/layer_{i}/"
        attn = hf_i + "self_attn."
        ct2.update({
            ct + "self_attention/layer_norm/gamma": hf[hf_i + "self_attn_layer_norm.weight"],
            ct + "self_attention/layer_norm/beta": hf[hf_i + "self_attn_layer_norm.bias"],
            ct + "self_attention/linear_0/weight": np.concatenate([hf[attn + p + "_proj.weight"] for p in "qkv"]),
            ct + "self_attention/linear_0/bias": np.concatenate(
                [hf[attn + "q_proj.bias"], np.zeros_like(hf[attn + "q_proj.bias"]), hf[attn + "v_proj.bias"]]
            ),
            ct + "self_attention/linear_1/weight": hf[attn + "out_proj.weight"],
            ct + "self_attention/linear_1/bias": hf[attn + "out_proj.bias"],
            ct + "ffn/layer_norm/gamma": hf[hf_i + "final_layer_norm.weight"],
            ct + "ffn/layer_norm/beta": hf[hf_i + "final_layer_norm.bias"],
            ct + "ffn/linear_0/weight": hf[hf_i + "fc1.weight"], ct + "ffn/linear_0/bias": hf[hf_i + "fc1.bias"],
            ct + "ffn/linear_1/weight": hf[hf_i + "fc2.weight"], ct + "ffn/linear_1/bias": hf[hf_i + "fc2.bias"],
        })  # fmt: skip
    return WhisperEncoder.from_ct2(ct2)


def encode_wav2vec2_family(
    model: Any, wave: np.ndarray, geometry: FrameGeometry, layers: list[int], window_samples: int, normalise: bool, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    """States (T, L, D) float16 and frame-centre times (T,) of a wav2vec2 / HuBERT / WavLM model.

    Long waves are encoded in windows of ``window_samples`` that advance by whole frames
    (``frames_per_window * hop``), so frames of consecutive windows continue the same hop grid
    with neither gap nor overlap. Each window is standardised on its own when the checkpoint's
    feature extractor does so (``do_normalize``). A trailing piece shorter than one receptive
    field (400 samples, 25 ms, for the usual stack) has no frame and is dropped.
    """
    import torch

    per_window = geometry.n_frames(window_samples)
    if per_window < 1:
        raise ValueError(f"an encoder window of {window_samples} samples is shorter than one frame ({geometry.receptive_field} samples)")
    step = per_window * geometry.hop
    pieces, times = [], []
    for start in range(0, wave.shape[0], step):
        piece = np.ascontiguousarray(wave[start : start + window_samples], dtype=np.float32)
        n = geometry.n_frames(piece.shape[0])
        if n == 0:
            break
        if normalise:  # as Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
            piece = (piece - piece.mean()) / np.sqrt(piece.var() + 1e-7)
        with torch.inference_mode():
            out = model(torch.from_numpy(piece)[None].to(device), output_hidden_states=True)
            chosen = torch.stack([out.hidden_states[i][0] for i in layers], dim=1)  # (T_w, L, D)
        if chosen.shape[0] != n:
            raise RuntimeError(f"the model gave {chosen.shape[0]} frames for {piece.shape[0]} samples, its conv stack predicts {n}")
        pieces.append(chosen.to(torch.float16).cpu().numpy())
        times.append(geometry.times(n, offset_samples=start))
        if start + window_samples >= wave.shape[0]:
            break
    if not pieces:
        return np.zeros((0, len(layers), model.config.hidden_size), np.float16), np.zeros(0, np.float64)
    return np.concatenate(pieces), np.concatenate(times)


def absolute_directory(spec: str) -> str:
    """``spec`` (a path, perhaps relative or with ~) as an absolute, normalised path string."""
    return os.path.abspath(os.path.expanduser(spec))
