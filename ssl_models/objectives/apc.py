"""APC: autoregressive predictive coding, a causal GRU over log-mel frames forecasts the frame n steps ahead."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ssl_models.audio import AudioAugment, augment_waveforms
from ssl_models.audio_encoder import MelFrontend
from ssl_models.objectives.base import AudioObjective


class APC(AudioObjective):
    """Autoregressive predictive coding (Chung, Hsu, Tang & Glass 2019, "An Unsupervised
    Autoregressive Model for Speech Representation Learning").

    The input frames are the utterance's standardised log-mel spectrogram, x = backbone.local(wave)
    (80 bands, one frame per 10 ms); a unidirectional GRU reads them, h = backbone.context(x), and a
    linear head maps its output at time t to a forecast of the frame n steps later:

        L = 1 / ((T − n) · M) · Σ_b Σ_{t < T−n} ‖W h_t + b − x_{t+n}‖₁        (mean over frames and bands)

    The target is the input itself; it carries no gradient (the log-mel front end has no parameters,
    and the target is detached anyway). Because the context is causal, h_t has seen x_1 … x_t only, so
    the task cannot be solved by looking ahead; a bidirectional context would make it trivial, which is
    why the backbone must be ``audio_apc`` (log-mel front end, ``context_kind == "gru"``). A conv front
    end is refused too: a target with parameters could collapse to a constant.

    Defaults: ``shift`` n = 3 (30 ms), the paper's best choice for phone classification (its script's
    default is 1). The paper's network is a 3 × 512 GRU (``audio_apc``'s default is 3 × 256; the CPU
    config narrows it further). Augmentation: the paper uses none; a random gain (±``gain_db`` dB,
    i.e. a constant offset of every log-mel band of the utterance) is the only one here, 0 switches it
    off.

    Args:
        backbone: ``audio_apc`` (an ``AudioEncoder`` with the log-mel front end and a GRU context).
        shift: n, how many frames ahead the forecast is (≥ 1).
        gain_db: the gain's range in dB.

    Shapes: utterances (B, 1, L) → views {"waves": (B, L)}; frames x (B, T, M), T = 1 + (L − 400) // 160,
    context h (B, T, H), forecasts (B, T − n, M). Logged: ``copy_l1`` (the L1 of the naive forecast
    x̂_{t+n} = x_t, the baseline the model has to beat).
    """

    name = "apc"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int = 28, in_channels: Optional[int] = None,
                 shift: int = 3, gain_db: float = 6.0):
        super().__init__(backbone, image_size, in_channels)
        self.require_causal_context(backbone, "audio_apc")
        if not isinstance(getattr(backbone, "front", None), MelFrontend):
            raise ValueError(f"apc forecasts the log-mel input, so the backbone must read log-mel frames (audio_apc); "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has a learned front end")
        if int(shift) < 1 or gain_db < 0:
            raise ValueError(f"apc: shift must be >= 1 and gain_db >= 0, got {shift}, {gain_db}")
        self.shift = int(shift)
        self.augment = AudioAugment(gain_db=float(gain_db), noise_p=0.0, shift=0.0, speed=(1.0, 1.0), speed_p=0.0)
        self.head = nn.Linear(backbone.feature_dim, backbone.local_dim)

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """A random gain per utterance.

        Shape: images (B, 1, L) or (B, L) float in [-1, 1] (or int16) → {"waves": (B, L) float32}.
        """
        return {"waves": augment_waveforms(images, self.augment, generator)}

    def forecast(self, x: torch.Tensor) -> torch.Tensor:
        """The head's forecast at every time step, of the frame ``shift`` steps later.

        Shape: frames x (B, T, M) → (B, T, M); output t forecasts x_{t+n}.
        """
        return self.head(self.backbone.context(x))

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["waves"] (B, L) → {"loss": (), "copy_l1": ()}."""
        x = self.backbone.local(views["waves"])                                  # (B, T, M)
        n, t = self.shift, x.shape[1]
        if t <= n:
            raise ValueError(f"apc: utterances of {t} frames are too short for shift {n}")
        pred = self.forecast(x)[:, :t - n]                                       # (B, T − n, M)
        with torch.autocast(x.device.type, enabled=False):
            target = x[:, n:].detach().float()                                   # (B, T − n, M)
            loss = (pred.float() - target).abs().mean()
            copy = (x[:, :t - n].detach().float() - target).abs().mean()
        return {"loss": loss, "copy_l1": copy}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}"
