"""Per-modality front-ends: turn frames into timestamped tokens of width d_model.

Each front-end returns ``Tokens``: features, times (seconds) and validity mask (the
encoder chooses rotary positions from the times). Padded frames and
frames without a face come out masked; their feature values are irrelevant
because attention, pooling and the CTM loss all ignore masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics: a standard, data-independent normalisation for RGB crops.
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)


@dataclass
class Tokens:
    x: torch.Tensor  # (B, T, D)
    times: torch.Tensor  # (B, T) float32 seconds
    mask: torch.Tensor  # (B, T) bool, True = real token


def normalise_utterance(logmel: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5, scale: bool = True) -> torch.Tensor:
    """Per-utterance, per-channel mean (and, with ``scale``, variance) normalisation over valid frames.

    logmel (B, T, F) or encoder states (B, T, L, D), mask (B, T) -> the same shape, float32, with
    padded frames set to 0, so that a clip gives the same features whatever it is padded to.
    """
    m = mask.reshape(*mask.shape, *([1] * (logmel.dim() - 2))).to(torch.float32)  # (B, T, 1) or (B, T, 1, 1)
    x = logmel.to(torch.float32)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, 1[, 1])
    mean = (x * m).sum(dim=1, keepdim=True) / n  # (B, 1, F) or (B, 1, L, D)
    if not scale:
        return (x - mean) * m
    var = ((x - mean).square() * m).sum(dim=1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def merge_times(times: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Times and mask of tokens that each merge ``factor`` consecutive frames.

    times, mask (B, T) -> (B, ceil(T/factor)) each. A merged token's time is the
    mean of its valid frames' times; it is valid when any of its frames is.
    """
    b, t = times.shape
    pad = (-t) % factor
    times = F.pad(times.to(torch.float32), (0, pad))
    m = F.pad(mask, (0, pad)).to(torch.float32)
    times, m = times.view(b, -1, factor), m.view(b, -1, factor)  # (B, T', factor)
    count = m.sum(-1)  # (B, T')
    merged = (times * m).sum(-1) / count.clamp_min(1.0)
    return merged, count > 0


class AudioFrontend(nn.Module):
    """Log-mel frames (B, Ta, F) at 50/s -> tokens at 50/downsample per second.

    Two 3-tap convolutions (40 ms context each side overall), then, when
    downsample > 1, a non-overlapping conv of kernel = stride = downsample so
    each output token merges exactly ``downsample`` frames and its time is the
    mean of theirs.
    """

    def __init__(self, n_mels: int, d_model: int, downsample: int, dropout: float) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.downsample = downsample
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.merge = nn.Conv1d(d_model, d_model, kernel_size=downsample, stride=downsample) if downsample > 1 else None
        self.out = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, logmel: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> Tokens:
        b, t, f = logmel.shape
        d = self.conv1.out_channels
        if t == 0:
            empty = logmel.new_zeros(b, 0, d)
            return Tokens(empty, times.new_zeros(b, 0), mask.new_zeros(b, 0))
        if f != self.n_mels:
            raise ValueError(f"audio has {f} mel channels, the model expects {self.n_mels}")
        m = mask.unsqueeze(1).to(logmel.dtype)  # (B, 1, Ta)
        x = normalise_utterance(logmel, mask).transpose(1, 2)  # (B, F, Ta)
        # Re-zero padding after each conv so padded frames act as the conv's zero padding.
        x = F.gelu(self.conv1(x)) * m  # (B, D, Ta)
        x = F.gelu(self.conv2(x)) * m
        if self.merge is not None:
            x = F.gelu(self.merge(F.pad(x, (0, (-t) % self.downsample))))  # (B, D, Ta')
            times, mask = merge_times(times, mask, self.downsample)
        x = self.drop(self.out(x.transpose(1, 2)))  # (B, Ta', D)
        return Tokens(x, times.to(torch.float32), mask)


class ConvAudioFrontend(nn.Module):
    """Log-mel frames (B, Ta, F) at 50/s -> tokens at 50/downsample per second, through a 2-D CNN.

    The from-scratch alternative to :class:`AudioFrontend` (``MsataConfig.audio_frontend = "cnn2d"``):
    convolutions over time x frequency see local spectro-temporal patterns (formant moves,
    pitch harmonics) that per-frame 1-D convolutions over all channels mix away; it is the
    front-end of most small-data speech emotion CNNs. Each stage is a 3x3 convolution,
    BatchNorm, GELU and a max-pool that halves frequency, and time as well in the first
    log2(downsample) stages; the frequency axis is then flattened into each token. A token's
    time is the mean of its frames' times (``merge_times`` applied per pooling stage), so
    TaRoPE is unchanged.
    """

    def __init__(self, n_mels: int, d_model: int, downsample: int, dropout: float, channels: tuple[int, ...]) -> None:
        super().__init__()
        if downsample & (downsample - 1) or downsample > 2 ** len(channels):
            raise ValueError(
                f"audio_downsample={downsample}: the 2-D CNN pools time by 2 per stage, so a power of 2 up to {2 ** len(channels)}"
            )
        self.n_mels, self.downsample = n_mels, downsample
        self.time_pools = [2 if 2**i < downsample else 1 for i in range(len(channels))]
        stages, pools, c_in, freq = [], [], 1, n_mels
        for c_out, t_pool in zip(channels, self.time_pools, strict=True):
            stages.append(nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()))
            pools.append(nn.MaxPool2d(kernel_size=(2, t_pool), ceil_mode=True))
            c_in, freq = c_out, -(-freq // 2)
        self.stages, self.pools = nn.ModuleList(stages), nn.ModuleList(pools)
        self.out = nn.Linear(c_in * freq, d_model)
        self.drop = nn.Dropout(dropout)
        self.d_model = d_model

    def forward(self, logmel: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> Tokens:
        b, t, f = logmel.shape
        if t == 0:
            return Tokens(logmel.new_zeros(b, 0, self.d_model), times.new_zeros(b, 0), mask.new_zeros(b, 0))
        if f != self.n_mels:
            raise ValueError(f"audio has {f} mel channels, the model expects {self.n_mels}")
        x = normalise_utterance(logmel, mask).transpose(1, 2).unsqueeze(1)  # (B, 1, F, Ta)
        m = mask
        for stage, pool, t_pool in zip(self.stages, self.pools, self.time_pools, strict=True):
            # Padded frames: -inf into the max-pool (never the max of a window with a real frame),
            # zero out of it (the next convolution's zero padding), so padding changes no real token.
            x = pool(stage(x).masked_fill(~m[:, None, None, :], float("-inf")))  # (B, C, F/2, Ta/t_pool)
            if t_pool > 1:
                times, m = merge_times(times, m, t_pool)
            x = x.masked_fill(~m[:, None, None, :], 0.0)
        x = x.flatten(1, 2).transpose(1, 2)  # (B, Ta', C * F')
        return Tokens(self.drop(self.out(x)), times.to(torch.float32), m)


# How encoder states' layers become one vector per frame: "softmax", SUPERB's learned weighted
# sum (one weight per layer); "concat", every layer side by side into the projection (a learned
# read-out per layer and channel, what the pooled logistic-regression floor sees).
LAYER_MIXES = ("softmax", "concat")
# Per-utterance normalisation of encoder states after the per-frame layer norm (``model.audio_utterance_norm``): "none";
# "mean", each layer's channels minus their mean over the clip's frames (cepstral mean normalisation's analogue: a
# clip's static offsets, much of them speaker, taken out; the pooled probe keeps them); "mean-var", also divided by
# their std over those frames.
UTTERANCE_NORMS = ("none", "mean", "mean-var")


class EncoderStatesFrontend(nn.Module):
    """Pretrained-encoder hidden states (B, Ta, L, D_in) at 50/s -> tokens (B, Ta', d_model).

    As in SUPERB: each stored layer is layer-normed (no affine), the layers are mixed by a
    learned softmax weighting, then projected to d_model. With ``layer_mix="concat"`` the
    normalised layers are instead laid side by side (L x D_in wide) into the projection, so it
    learns a read-out per layer and channel rather than one weight per layer. ``utterance_norm``
    (UTTERANCE_NORMS) centres each clip's states on their own mean first. With downsample k > 1, k
    consecutive frames are averaged into one token (time = mean of theirs), which keeps the
    joint encoder's cost down; the pretrained encoder already gives each frame wide context.

    Fine-tuning (``finetune_blocks`` = k > 0): the encoder's top k blocks (and its final
    LayerNorm) live here as trainable copies, started from the pretrained weights by
    :meth:`load_top_blocks`. They re-run on the stored state that feeds block n - k, so the
    store is still read, never recomputed, and only the top of the encoder trains. This needs
    a store holding every hidden state (L = n_layers + 1, embedding first).
    """

    def __init__(
        self,
        n_layers: int,
        width: int,
        d_model: int,
        downsample: int,
        dropout: float,
        finetune_blocks: int = 0,
        encoder_heads: int = 0,
        layer_mix: str = "softmax",
        utterance_norm: str = "none",
    ) -> None:
        super().__init__()
        if layer_mix not in LAYER_MIXES:
            raise ValueError(f"layer_mix={layer_mix!r}; expected one of {LAYER_MIXES}")
        if utterance_norm not in UTTERANCE_NORMS:
            raise ValueError(f"utterance_norm={utterance_norm!r}; expected one of {UTTERANCE_NORMS}")
        self.n_layers, self.width, self.downsample, self.layer_mix = n_layers, width, downsample, layer_mix
        self.utterance_norm = utterance_norm
        if layer_mix == "softmax":
            self.layer_logits = nn.Parameter(torch.zeros(n_layers))  # uniform mix at init
        mixed_width = width * n_layers if layer_mix == "concat" else width
        self.proj = nn.Sequential(nn.Linear(mixed_width, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.drop = nn.Dropout(dropout)
        self.d_model = d_model
        self.finetune_blocks = finetune_blocks
        if finetune_blocks:
            if not 0 < finetune_blocks < n_layers:
                raise ValueError(
                    f"audio_finetune_blocks={finetune_blocks}: the store holds {n_layers} hidden states, so at most {n_layers - 1} blocks"
                )
            if encoder_heads < 1 or width % encoder_heads:
                raise ValueError(f"audio_heads={encoder_heads} cannot split width {width}: fine-tuning needs the encoder's head count")
            from features.audio_encoders.whisper import WhisperBlock

            self.top_blocks = nn.ModuleList(WhisperBlock(width, encoder_heads) for _ in range(finetune_blocks))
            self.top_norm = nn.LayerNorm(width)

    def layer_weights(self) -> torch.Tensor:
        """The learned softmax mix (L,); only for layer_mix="softmax"."""
        if self.layer_mix != "softmax":
            raise ValueError(f"layer_mix={self.layer_mix!r} has no layer weights: every layer goes into the projection")
        return torch.softmax(self.layer_logits, dim=0)  # (L,)

    @torch.no_grad()
    def load_top_blocks(self, encoder: nn.Module) -> None:
        """Start the trainable top blocks from a pretrained WhisperEncoder's last blocks."""
        blocks = list(encoder.blocks)
        if len(blocks) + 1 != self.n_layers or encoder.shape.width != self.width:
            raise ValueError(
                f"encoder with {len(blocks)} blocks of width {encoder.shape.width} does not match a store of "
                f"{self.n_layers} hidden states of width {self.width}"
            )
        for mine, theirs in zip(self.top_blocks, blocks[-self.finetune_blocks :], strict=False):
            if mine.n_heads != theirs.n_heads:
                raise ValueError(f"encoder blocks have {theirs.n_heads} heads, the model was built with {mine.n_heads}")
            mine.load_state_dict(theirs.state_dict())
        self.top_norm.load_state_dict(encoder.final_norm.state_dict())

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """The parameters that start from pretrained weights (trained at a reduced learning rate)."""
        if not self.finetune_blocks:
            return []
        return [*self.top_blocks.parameters(), *self.top_norm.parameters()]

    def _rerun_top(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the top k stored states by the trainable blocks' outputs. (B, Ta, L, D) float32"""
        k = self.finetune_blocks
        x = states[:, :, -k - 1]  # (B, Ta, D) the residual stream entering block n - k
        outputs = []
        for block in self.top_blocks:
            x = block(x, key_mask=mask)
            outputs.append(x)
        outputs[-1] = self.top_norm(x)  # the last hidden state is after the final LayerNorm
        return torch.cat([states[:, :, :-k], torch.stack(outputs, dim=2)], dim=2)

    def forward(self, states: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> Tokens:
        b, t = states.shape[:2]
        if t == 0:
            empty = states.new_zeros((b, 0, self.d_model), dtype=torch.float32)
            return Tokens(empty, times.new_zeros(b, 0), mask.new_zeros(b, 0))
        if tuple(states.shape[2:]) != (self.n_layers, self.width):
            raise ValueError(
                f"audio encoder states have shape {tuple(states.shape[2:])} per frame, the model expects ({self.n_layers}, {self.width})"
            )
        x = states.to(torch.float32)  # (B, Ta, L, D_in)
        if self.finetune_blocks:
            x = self._rerun_top(x, mask)
        x = F.layer_norm(x, (self.width,))
        if self.utterance_norm != "none":  # each layer's channels centred (and scaled) on the clip's own frames
            x = normalise_utterance(x, mask, scale=self.utterance_norm == "mean-var")  # (B, Ta, L, D_in)
        if self.layer_mix == "softmax":
            x = torch.einsum("btld,l->btd", x, self.layer_weights())  # (B, Ta, D_in)
        else:
            x = x.flatten(2)  # (B, Ta, L * D_in)
        x = x * mask.unsqueeze(-1)
        if self.downsample > 1:
            pad = (-t) % self.downsample
            m = F.pad(mask, (0, pad)).view(b, -1, self.downsample).to(x.dtype)  # (B, Ta', k)
            x = F.pad(x, (0, 0, 0, pad)).view(b, -1, self.downsample, x.shape[-1]).sum(2) / m.sum(-1, keepdim=True).clamp_min(1.0)
            times, mask = merge_times(times, mask, self.downsample)
        x = self.drop(self.proj(x))  # (B, Ta', d_model)
        return Tokens(x, times.to(torch.float32), mask)


class VideoFrontend(nn.Module):
    """Face crops (B, Tv, S, S, 3) uint8 -> one token per frame (B, Tv, D).

    A small CNN (stride-2 conv, GroupNorm, GELU stages, then global average
    pooling) applied to all valid frames of the batch at once; frames without a
    face and padding are never computed and come out as zero tokens, masked.
    """

    def __init__(self, crop_size: int, channels: tuple[int, ...], d_model: int, dropout: float) -> None:
        super().__init__()
        self.crop_size = crop_size
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, d_model)
        self.drop = nn.Dropout(dropout)
        self.d_model = d_model
        self.register_buffer("mean", torch.tensor(_RGB_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(_RGB_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, crops: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> Tokens:
        b, t = crops.shape[:2]
        if t > 0 and tuple(crops.shape[2:]) != (self.crop_size, self.crop_size, 3):
            raise ValueError(f"video crops have shape {tuple(crops.shape[2:])}, the model expects ({self.crop_size}, {self.crop_size}, 3)")
        frames = crops[mask]  # (N, S, S, 3) valid frames only
        feats = frames.new_zeros((0, self.d_model), dtype=torch.float32)
        if frames.shape[0] > 0:
            x = (frames.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std  # (N, 3, S, S)
            x = self.cnn(x).mean(dim=(2, 3))  # (N, C)
            feats = self.out(x)  # (N, D)
        tokens = feats.new_zeros(b, t, self.d_model)
        tokens[mask] = feats
        return Tokens(self.drop(tokens), times.to(torch.float32), mask)


class BlendshapeFrontend(nn.Module):
    """Blendshape scores (B, Tv, K) float32 -> one token per frame (B, Tv, D).

    ``Linear(K, D) -> LayerNorm -> GELU -> Linear(D, D)`` applied to each frame on its own,
    like the crop CNN: a token holds one frame's expression and nothing of its neighbours,
    so timing stays with the rotary positions and CTM compares per-frame content. The scores
    are already in [0, 1] and comparable across speakers, so no input normalisation is
    learned. Frames without a face and padding come out as zero tokens, masked.
    """

    def __init__(self, n_features: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.n_features, self.d_model = n_features, d_model
        self.mlp = nn.Sequential(nn.Linear(n_features, d_model), nn.LayerNorm(d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, scores: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> Tokens:
        b, t = scores.shape[:2]
        if t > 0 and tuple(scores.shape[2:]) != (self.n_features,):
            raise ValueError(f"video frames have shape {tuple(scores.shape[2:])}, the model expects ({self.n_features},) blendshape scores")
        # (B, Tv, K) -> (B, Tv, D); zeroed where invalid so padded or faceless frames carry nothing.
        tokens = self.mlp(scores.to(torch.float32)) * mask.unsqueeze(-1)
        return Tokens(self.drop(tokens), times.to(torch.float32), mask)
