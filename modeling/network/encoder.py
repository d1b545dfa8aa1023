"""The msata model: one transformer over time-stamped audio and face tokens.

    audio log-mel (B, Ta, F) --AudioFrontend (1-D conv) or ConvAudioFrontend (2-D CNN)--> (B, Ta', D) + times
      or encoder states (B, Ta, L, D_in) --EncoderStatesFrontend (layer mix, projection)--> (B, Ta', D) + times
    face crops (B, Tv, S, S, 3) --VideoFrontend (CNN)--> (B, Tv, D) + times
      or blendshapes (B, Tv, 52) --BlendshapeFrontend (MLP)--> (B, Tv, D) + times
    [audio; video] + modality embeddings --N pre-norm blocks (rotary q/k)--> pooling (mean | attention) --> logits

Rotary positions are chosen once, here (:func:`rotary_positions`: ``rate * times`` for TaRoPE,
each token's index within its own stream for the index ablation, none at all); each encoder's
``Rotary`` turns them into one rotation per forward, and every attention layer applies it with
the pure ``rotate`` (``modeling.network.tarope``). ``fusion="late"`` is the
ablation without cross-modal attention: one encoder per modality, each pooled,
concatenated, classified.

One module of ~330 lines because it reads top to bottom like nanoGPT's model.py: config, attention, blocks, pooling, the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from features.config_keys import reject_unknown_keys
from features.face_landmarks import N_BLENDSHAPES
from modeling.network.batch import Batch
from modeling.network.frontends import (
    LAYER_MIXES,
    UTTERANCE_NORMS,
    AudioFrontend,
    BlendshapeFrontend,
    ConvAudioFrontend,
    EncoderStatesFrontend,
    Tokens,
    VideoFrontend,
)
from modeling.network.pooled_probe import PooledProbe
from modeling.network.tarope import (
    DEFAULT_BASE,
    DEFAULT_RATE,
    POSITION_KINDS,
    Rotary,
    Rotation,
    index_positions,
    rotate,
    time_positions,
)

FUSION_KINDS = ("joint", "late")
POOLING_KINDS = ("mean", "attention", "stats")
# Which tokens the CTM loss compares (docs/method.md, "CTM"): "frontend" = each modality's
# front-end tokens before fusion (the default: no attention path lets them agree by position);
# "encoder" = the joint encoder's outputs (the first form, kept for comparison).
CTM_ON_KINDS = ("frontend", "encoder")
# The video input, set from the store's face representation (modeling.data.examples.model_input_settings):
# MTCNN face crops through a small CNN, or MediaPipe blendshape scores through an MLP.
VIDEO_INPUTS = ("crops", "blendshapes")
MODALITY_KINDS = ("audio", "video")
# The log-mel front-end: per-frame 1-D convolutions over all mel channels, or a 2-D CNN over
# time x frequency (ConvAudioFrontend). Encoder states always go through EncoderStatesFrontend.
AUDIO_FRONTENDS = ("conv1d", "cnn2d")
# Model settings added after run keys were first written: left out of an experiment's run key at
# these defaults, so older run directories keep their names (as LATER_TRAIN_DEFAULTS for training).
LATER_MODEL_DEFAULTS: dict[str, Any] = {
    "audio_frontend": "conv1d",
    "audio_channels": [16, 32, 64],
    "audio_layer_mix": "softmax",
    "audio_utterance_norm": "none",
}


@dataclass
class MsataConfig:
    n_classes: int = 6
    n_mels: int = 80
    d_model: int = 192
    n_heads: int = 4
    n_layers: int = 4  # 0: no block, the front-end tokens are pooled directly (a pooled head; positions play no role)
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    audio_downsample: int = 1  # 1 keeps 50 tokens/s; k merges k frames per token
    audio_frontend: str = "conv1d"  # log-mel only: "conv1d" | "cnn2d" (AUDIO_FRONTENDS)
    audio_channels: tuple[int, ...] = (16, 32, 64)  # "cnn2d": one 3x3 conv stage each, halving frequency
    audio_layers: int = 0  # > 0: the audio input is a pretrained encoder's states (L layers of audio_width)
    audio_width: int = 0
    audio_heads: int = 0  # the encoder's attention heads (set from the store; used when fine-tuning)
    audio_finetune_blocks: int = 0  # > 0: the encoder's top k blocks re-run on the stored states and train
    audio_layer_mix: str = "softmax"  # encoder states: "softmax" | "concat" (LAYER_MIXES), how the layers combine per frame
    audio_utterance_norm: str = "none"  # encoder states: "none" | "mean" | "mean-var" (UTTERANCE_NORMS), per clip
    pooling: str = "mean"  # "mean" | "attention" | "stats" (mean and std, 2D wide): how tokens become one clip vector
    crop_size: int = 96  # face crop side, must match the feature store's FaceConfig.crop_size
    video_channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 CNN stage each
    video_input: str = "crops"  # "crops" | "blendshapes" (VIDEO_INPUTS), the store's face representation
    positions: str = "tarope"  # "tarope" | "index" | "none"
    fusion: str = "joint"  # "joint" | "late"
    rotary_rate: float = DEFAULT_RATE  # TaRoPE position ids per second
    rotary_base: float = DEFAULT_BASE
    ctm_dim: int = 128  # width of the CTM projection head
    ctm_sigma: float = 1.0 / 30.0  # seconds, CTM target width (one 30 fps video frame)
    ctm_tau: float = 0.1  # CTM softmax temperature
    ctm_on: str = "frontend"  # "frontend" | "encoder": the tokens CTM compares (CTM_ON_KINDS)
    # The streams the model reads; one left out is never fed, even when the batch holds it
    # (the audio-only / video-only ablations train on the same store and folds as the rest).
    modalities: tuple[str, ...] = MODALITY_KINDS

    def __post_init__(self) -> None:
        self.video_channels = tuple(int(c) for c in self.video_channels)
        self.audio_channels = tuple(int(c) for c in self.audio_channels)
        if isinstance(self.modalities, str) or not self.modalities or set(self.modalities) - set(MODALITY_KINDS):
            raise ValueError(f"modalities={self.modalities!r}; expected a non-empty subset of {list(MODALITY_KINDS)}")
        self.modalities = tuple(m for m in MODALITY_KINDS if m in self.modalities)  # canonical order: equal configs compare equal
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions={self.positions!r}; expected one of {POSITION_KINDS}")
        if self.fusion not in FUSION_KINDS:
            raise ValueError(f"fusion={self.fusion!r}; expected one of {FUSION_KINDS}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.n_heads} heads of even width")
        if self.video_input not in VIDEO_INPUTS:
            raise ValueError(f"video_input={self.video_input!r}; expected one of {VIDEO_INPUTS}")
        if self.ctm_on not in CTM_ON_KINDS:
            raise ValueError(f"ctm_on={self.ctm_on!r}; expected one of {CTM_ON_KINDS}")
        if self.audio_frontend not in AUDIO_FRONTENDS:
            raise ValueError(f"audio_frontend={self.audio_frontend!r}; expected one of {AUDIO_FRONTENDS}")
        if self.audio_frontend == "cnn2d" and (self.audio_layers > 0 or not self.audio_channels):
            raise ValueError("audio_frontend='cnn2d' reads log-mel (a store without encoder states) and needs audio_channels")
        if self.audio_frontend == "cnn2d" and (
            self.audio_downsample & (self.audio_downsample - 1) or self.audio_downsample > 2 ** len(self.audio_channels)
        ):
            raise ValueError(
                f"audio_downsample={self.audio_downsample}: the 2-D CNN pools time by 2 per stage of audio_channels, "
                f"so a power of 2 up to {2 ** len(self.audio_channels)}"
            )
        if self.audio_layer_mix not in LAYER_MIXES:
            raise ValueError(f"audio_layer_mix={self.audio_layer_mix!r}; expected one of {LAYER_MIXES}")
        if self.audio_layer_mix != "softmax" and self.audio_layers == 0:
            raise ValueError(f"audio_layer_mix={self.audio_layer_mix!r} mixes a pretrained encoder's layers; this store holds log-mel")
        if self.audio_utterance_norm not in UTTERANCE_NORMS:
            raise ValueError(f"audio_utterance_norm={self.audio_utterance_norm!r}; expected one of {UTTERANCE_NORMS}")
        if self.audio_utterance_norm != "none" and self.audio_layers == 0:
            raise ValueError(
                f"audio_utterance_norm={self.audio_utterance_norm!r} normalises a pretrained encoder's states; this store holds "
                "log-mel, which the log-mel front-ends already normalise per utterance"
            )
        if self.pooling not in POOLING_KINDS:
            raise ValueError(f"pooling={self.pooling!r}; expected one of {POOLING_KINDS}")
        if (self.audio_layers > 0) != (self.audio_width > 0):
            raise ValueError(
                f"audio_layers={self.audio_layers} and audio_width={self.audio_width}: set both (encoder states) or neither (log-mel)"
            )
        if self.audio_finetune_blocks and not 0 < self.audio_finetune_blocks < self.audio_layers:
            raise ValueError(
                f"audio_finetune_blocks={self.audio_finetune_blocks} needs a store of every hidden state of a packaged "
                f"encoder and fewer blocks than it has; this store holds {self.audio_layers} states"
            )
        if self.audio_downsample < 1:
            raise ValueError(f"audio_downsample must be >= 1, got {self.audio_downsample}")
        if self.n_classes < 1 or self.n_layers < 0 or not self.video_channels:
            raise ValueError(f"invalid sizes in {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["video_channels"] = list(self.video_channels)  # JSON/MLflow friendly
        data["audio_channels"] = list(self.audio_channels)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MsataConfig:
        reject_unknown_keys(data, cls, "MsataConfig")
        return cls(**data)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, C); with a pooled probe attached, the mixture's log-probabilities (pooled_probe.mix_log_probs)
    pooled: torch.Tensor  # (B, D) joint; (B, 2D) late = [audio pool; video pool]
    audio_tokens: torch.Tensor  # (B, Ta', D) encoder outputs at audio positions
    audio_times: torch.Tensor  # (B, Ta') seconds
    audio_mask: torch.Tensor  # (B, Ta') bool
    video_tokens: torch.Tensor  # (B, Tv, D)
    video_times: torch.Tensor  # (B, Tv) seconds
    video_mask: torch.Tensor  # (B, Tv) bool
    # The tokens the CTM loss compares (MsataConfig.ctm_on); None = the encoder outputs above.
    ctm_audio: torch.Tensor | None = None  # (B, Ta', D)
    ctm_video: torch.Tensor | None = None  # (B, Tv, D)


def rotary_positions(kind: str, stream_times: Sequence[torch.Tensor], rate: float = DEFAULT_RATE) -> torch.Tensor | None:
    """The rotary positions of streams placed one after another in one sequence (MsataConfig.positions).

    ``stream_times``: each stream's token times (B, T_s) seconds, in sequence order. Returns
    (B, sum T_s) float32: ``rate * t`` ("tarope"), each token's index within its own stream
    ("index": audio 0..Ta'-1, video 0..Tv-1, so the streams drift apart at 50 vs 30 tokens/s),
    or None ("none": no rotation, attention sees a bag of tokens).
    """
    if kind == "none":
        return None
    if kind == "tarope":
        parts = [time_positions(t, rate) for t in stream_times]
    elif kind == "index":
        parts = [index_positions(t) for t in stream_times]
    else:
        raise ValueError(f"unknown positions {kind!r}; expected one of {POSITION_KINDS}")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class SelfAttention(nn.Module):
    def __init__(self, config: MsataConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        q, k = rotate(q, rotation), rotate(k, rotation)  # rotation None: no positions
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    def __init__(self, config: MsataConfig) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * config.d_model)
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden),
            nn.GELU(),
            nn.Linear(hidden, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_mask, rotation)
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """N pre-norm blocks over tokens with a validity mask, rotated at the given positions."""

    def __init__(self, config: MsataConfig) -> None:
        super().__init__()
        self.rotary = Rotary(config.head_dim, config.rotary_base)  # holds no parameters, nothing in the state_dict
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, tokens: Tokens, positions: torch.Tensor | None) -> torch.Tensor:
        """tokens.x (B, T, D), positions (B, T) from :func:`rotary_positions` (None: no rotation)."""
        x = tokens.x  # (B, T, D)
        if x.shape[1] == 0:
            return x
        # A sample with no valid token at all (e.g. video-only clip without faces)
        # attends to everything instead of nothing: softmax over an empty set is NaN.
        # Its outputs are masked out downstream anyway.
        key_mask = tokens.mask | ~tokens.mask.any(dim=1, keepdim=True)  # (B, T)
        rotation = self.rotary(positions)  # once for all layers
        for block in self.blocks:
            x = block(x, key_mask, rotation)
        return self.norm(x)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens: x (B, T, D), mask (B, T) -> (B, D); zeros where none is valid."""
    m = mask.unsqueeze(-1).to(torch.float32)
    return (x.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class Pooling(nn.Module):
    """Tokens -> one vector: masked mean; attention pooling (a learned score per token,
    softmax over the valid ones), which lets the few emotional frames of a clip count more;
    or statistics pooling (mean and standard deviation, as in x-vectors), which also keeps
    how much the tokens vary over the clip (out_dim = 2D)."""

    def __init__(self, kind: str, d_model: int) -> None:
        super().__init__()
        self.kind = kind
        self.score = nn.Linear(d_model, 1) if kind == "attention" else None
        self.out_dim = 2 * d_model if kind == "stats" else d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "stats":
            mean = masked_mean(x, mask)  # (B, D)
            m = mask.unsqueeze(-1).to(torch.float32)
            var = ((x.to(torch.float32) - mean.unsqueeze(1)).square() * m).sum(1) / m.sum(1).clamp_min(1.0)
            return torch.cat([mean, torch.sqrt(var + 1e-5)], dim=-1)  # (B, 2D)
        if self.score is None:
            return masked_mean(x, mask)  # (B, D)
        logits = self.score(x.to(torch.float32)).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a clip with no valid token gets zeros
        return torch.einsum("bt,btd->bd", weights, x.to(torch.float32))


def _concat(a: Tokens, v: Tokens) -> Tokens:
    return Tokens(
        x=torch.cat([a.x, v.x.to(a.x.dtype)], dim=1),
        times=torch.cat([a.times, v.times], dim=1),
        mask=torch.cat([a.mask, v.mask], dim=1),
    )


class MsataModel(nn.Module):
    def __init__(self, config: MsataConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        if config.audio_layers > 0:
            self.audio_frontend: nn.Module = EncoderStatesFrontend(
                config.audio_layers,
                config.audio_width,
                d,
                config.audio_downsample,
                config.dropout,
                config.audio_finetune_blocks,
                config.audio_heads,
                layer_mix=config.audio_layer_mix,
                utterance_norm=config.audio_utterance_norm,
            )
        elif config.audio_frontend == "cnn2d":
            self.audio_frontend = ConvAudioFrontend(config.n_mels, d, config.audio_downsample, config.dropout, config.audio_channels)
        else:
            self.audio_frontend = AudioFrontend(config.n_mels, d, config.audio_downsample, config.dropout)
        if config.video_input == "blendshapes":
            self.video_frontend: nn.Module = BlendshapeFrontend(N_BLENDSHAPES, d, config.dropout)
        else:
            self.video_frontend = VideoFrontend(config.crop_size, config.video_channels, d, config.dropout)
        self.modality = nn.Parameter(torch.randn(2, d) / math.sqrt(d))  # [audio, video] embeddings
        self.encoder = Encoder(config)
        self.video_encoder = Encoder(config) if config.fusion == "late" else None
        self.pool = Pooling(config.pooling, d)
        pooled_dim = 2 * self.pool.out_dim if config.fusion == "late" else self.pool.out_dim
        self.video_pool = Pooling(config.pooling, d) if config.fusion == "late" else None
        self.head_drop = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(pooled_dim, config.n_classes)
        self.ctm_head = nn.Linear(d, config.ctm_dim)  # used by losses.ctm_loss only
        # train.probe_weight: a linear probe on pooled audio statistics, fitted after training and mixed
        # into the logits (modeling/network/pooled_probe.py); None while training and in models without one.
        self.pooled_probe: PooledProbe | None = None

    def attach_probe(self, probe: PooledProbe | None) -> None:
        if probe is not None and "audio" not in self.config.modalities:
            raise ValueError("a pooled audio probe needs a model that reads audio")
        self.pooled_probe = probe

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters started from pretrained weights (the training loop gives them a lower lr)."""
        frontend = self.audio_frontend
        return frontend.pretrained_parameters() if isinstance(frontend, EncoderStatesFrontend) else []

    def forward(self, batch: Batch) -> ModelOutput:
        audio, audio_mask = batch.audio, batch.audio_mask  # the probe's input, before any modality is dropped
        if "audio" not in self.config.modalities:  # (B, 0, ...): no audio token exists
            batch = replace(batch, audio=batch.audio[:, :0], audio_times=batch.audio_times[:, :0], audio_mask=batch.audio_mask[:, :0])
        if "video" not in self.config.modalities:
            batch = replace(batch, video=batch.video[:, :0], video_times=batch.video_times[:, :0], video_mask=batch.video_mask[:, :0])
        a = self.audio_frontend(batch.audio, batch.audio_times, batch.audio_mask)  # (B, Ta', D)
        v = self.video_frontend(batch.video, batch.video_times, batch.video_mask)  # (B, Tv, D), crops or blendshapes
        # Front-end tokens before the modality embedding: per-frame content only, no position and
        # no view of the other stream, so CTM on them can only be lowered by content that co-occurs.
        ctm_audio, ctm_video = (a.x, v.x) if self.config.ctm_on == "frontend" else (None, None)
        a.x = a.x + self.modality[0]
        v.x = v.x + self.modality[1]
        kind, rate = self.config.positions, self.config.rotary_rate
        if self.video_encoder is None:  # joint: one sequence, cross-modal attention
            h = self.encoder(_concat(a, v), rotary_positions(kind, [a.times, v.times], rate))  # (B, Ta' + Tv, D)
            audio_out, video_out = h[:, : a.x.shape[1]], h[:, a.x.shape[1] :]
            pooled = self.pool(h, torch.cat([a.mask, v.mask], dim=1))  # (B, D)
        else:  # late: no attention across modalities
            audio_out = self.encoder(a, rotary_positions(kind, [a.times], rate))
            video_out = self.video_encoder(v, rotary_positions(kind, [v.times], rate))
            pooled = torch.cat([self.pool(audio_out, a.mask), self.video_pool(video_out, v.mask)], dim=-1)  # (B, 2D)
        logits = self.classifier(self.head_drop(pooled))  # (B, C)
        if self.pooled_probe is not None:  # the mixture's log-probabilities (B, C)
            logits = self.pooled_probe.mix(logits, audio, audio_mask)
        return ModelOutput(
            logits=logits,
            pooled=pooled,
            audio_tokens=audio_out,
            audio_times=a.times,
            audio_mask=a.mask,
            video_tokens=video_out,
            video_times=v.times,
            video_mask=v.mask,
            ctm_audio=ctm_audio,
            ctm_video=ctm_video,
        )
