"""Audio backbones: waveform (B, 1, L) or (B, L) float → utterance vector (B, feature_dim).

One class, :class:`AudioEncoder`, in two halves that the objectives reach separately:

* ``local(x)``: the frame encoder, one vector per 160 samples (10 ms at 16 kHz):
  - ``frontend="conv"``: strided 1-D convolutions, CPC's (van den Oord et al. 2018) kernels
    10/8/4/4/4 with strides 5/4/2/2/2 (160 samples per frame), each followed by a per-frame
    channel norm (LayerNorm over channels only, never over time, so no frame sees another's
    statistics: the leak that batch and group norm open for predictive coding, Rivière et al. 2020)
    and a GELU;
  - ``frontend="logmel"``: the log-mel spectrogram (``ssl_models.audio.LogMel``, ``n_mels`` bands,
    standardised by a fixed affine map), APC's input (Chung et al. 2019).
* ``context(z)``: what looks across frames:
  - ``"none"``: the frames as they are;
  - ``"gru"``: a unidirectional GRU (causal: frame t sees frames ≤ t), CPC's and APC's context;
  - ``"transformer"``: wav2vec 2.0's (Baevski et al. 2020) convolutional relative position
    embedding (grouped conv, kernel 31) then pre-norm transformer blocks (bidirectional).

``forward`` is the mean over time of ``context(local(x))``: the utterance vector the evaluation
probes. Shapes: local: (B, L) → (B, T, D_local) with T = 1 + (L − 400) // 160 for both front ends
(the conv stack's receptive field is 465 samples; 65 zeros padded on the right give the same T); context:
(B, T, D_local) → (B, T, feature_dim).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.audio import HOP, WINDOW, LogMel, waveforms

CPC_KERNELS = (10, 8, 4, 4, 4)
CPC_STRIDES = (5, 4, 2, 2, 2)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each frame. Shape: (B, C, T) → (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ConvFrontend(nn.Module):
    """Strided conv stack: (B, L) → (B, T, dim), one frame per prod(strides) samples."""

    def __init__(self, dim: int, kernels=CPC_KERNELS, strides=CPC_STRIDES):
        super().__init__()
        layers, cin = [], 1
        for k, s in zip(kernels, strides):
            layers += [nn.Conv1d(cin, dim, k, s, bias=False), ChannelNorm(dim), nn.GELU()]
            cin = dim
        self.net = nn.Sequential(*layers)
        self.dim = dim
        self.hop, self.field = 1, 1
        for k, s in zip(kernels, strides):
            self.field += (k - 1) * self.hop
            self.hop *= s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stack's receptive field is 465 samples: 65 zeros on the right give one frame per
        # 160 samples of every full 400-sample window, as many as the log-mel has
        return self.net(F.pad(x, (0, self.field - 400))[:, None]).transpose(1, 2)


class MelFrontend(nn.Module):
    """Log-mel frames, standardised by a fixed shift and scale (log energies of [-1, 1] audio sit
    around −6 ± 4): (B, L) → (B, T, n_mels)."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.mel = LogMel(n_mels)
        self.dim = n_mels
        self.hop = HOP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.mel(x) + 6.0) / 4.0


class PositionalConv(nn.Module):
    """wav2vec 2.0's relative position embedding: grouped conv over time, GELU, added to the input.
    Shape: (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, kernel: int = 31, groups: int = 16):
        super().__init__()
        groups = groups if dim % groups == 0 else 1
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x.transpose(1, 2))).transpose(1, 2)


class AudioEncoder(nn.Module):
    """See the module docstring. ``dim``: width of the conv frames (and of the context, unless
    ``context_dim`` is given); ``layers``: GRU or transformer layers."""

    def __init__(self, in_channels: int = 1, frontend: str = "conv", context: str = "none", dim: int = 128,
                 context_dim: Optional[int] = None, layers: int = 2, heads: int = 4, n_mels: int = 80,
                 name: str = "audio_encoder"):
        super().__init__()
        if in_channels != 1:
            raise ValueError(f"audio backbones take mono audio (in_channels 1), got {in_channels}")
        if frontend not in ("conv", "logmel") or context not in ("none", "gru", "transformer"):
            raise ValueError(f"frontend must be conv or logmel and context none, gru or transformer; got "
                             f"{frontend!r}, {context!r}")
        if dim < 8 or layers < 1:
            raise ValueError(f"dim must be >= 8 and layers >= 1, got {dim}, {layers}")
        self.front = ConvFrontend(dim) if frontend == "conv" else MelFrontend(n_mels)
        d_local = self.front.dim
        d_ctx = context_dim or (dim if frontend == "conv" else dim)
        self.context_kind = context
        if context == "gru":
            self.ctx = nn.GRU(d_local, d_ctx, num_layers=layers, batch_first=True)
        elif context == "transformer":
            if d_ctx % heads:
                raise ValueError(f"the transformer's width {d_ctx} must be a multiple of heads {heads}")
            self.proj = nn.Linear(d_local, d_ctx) if d_local != d_ctx else nn.Identity()
            self.pos = PositionalConv(d_ctx)
            block = nn.TransformerEncoderLayer(d_ctx, heads, 4 * d_ctx, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.ctx = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
            self.ctx_norm = nn.LayerNorm(d_ctx)
        else:
            d_ctx = d_local
        self.in_channels = 1
        self.local_dim = d_local
        self.feature_dim = d_ctx
        self.hop = HOP
        self.name = name

    def frames(self, length: int) -> int:
        """Frames of an utterance of ``length`` samples."""
        return max(0, 1 + (length - WINDOW) // HOP)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (B, 1, L) or (B, L) → (B, T, local_dim)."""
        x = waveforms(x)
        z = self.front(x)
        return z[:, :self.frames(x.shape[1])]

    def context(self, z: torch.Tensor, padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Shape: (B, T, local_dim) → (B, T, feature_dim); ``padding`` (B, T) bool marks frames a
        transformer must not attend to."""
        if self.context_kind == "gru":
            return self.ctx(z)[0]
        if self.context_kind == "transformer":
            h = self.pos(self.proj(z))
            return self.ctx_norm(self.ctx(h, src_key_padding_mask=padding))
        return z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features: ``context(local(x))``. Shape: (B, L) → (B, T, feature_dim)."""
        return self.context(self.local(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (B, 1, L) or (B, L) float → (B, feature_dim), the mean over frames."""
        return self.encode(x).mean(1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frames before and after the context, channels first, for the evaluation's pooling over
        spans of time (``frozen_grid``, ``frozen_stages``). Shape: (B, L) → [(B, local_dim, T), (B, feature_dim, T)]."""
        z = self.local(x)
        return [z.transpose(1, 2), self.context(z).transpose(1, 2)]


def audio_conv(in_channels: int = 1, dim: int = 128) -> AudioEncoder:
    """Conv frames only (PASE's encoder shape; a context-free baseline)."""
    return AudioEncoder(in_channels, "conv", "none", dim, name="audio_conv")


def audio_cpc(in_channels: int = 1, dim: int = 128, context_dim: int = 128, layers: int = 1) -> AudioEncoder:
    """CPC's encoder: conv frames, a causal GRU context."""
    return AudioEncoder(in_channels, "conv", "gru", dim, context_dim, layers, name="audio_cpc")


def audio_transformer(in_channels: int = 1, dim: int = 128, layers: int = 2, heads: int = 4) -> AudioEncoder:
    """wav2vec 2.0's shape, small: conv frames, a transformer context."""
    return AudioEncoder(in_channels, "conv", "transformer", dim, dim, layers, heads, name="audio_transformer")


def audio_apc(in_channels: int = 1, dim: int = 256, layers: int = 3, n_mels: int = 80) -> AudioEncoder:
    """APC's encoder: log-mel frames, a causal GRU (3 × 512 in the paper's code)."""
    return AudioEncoder(in_channels, "logmel", "gru", dim, dim, layers, n_mels=n_mels, name="audio_apc")


__all__ = ["AudioEncoder", "ChannelNorm", "audio_conv", "audio_cpc", "audio_transformer", "audio_apc"]
