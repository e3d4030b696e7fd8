"""CPC on audio: a causal GRU summary of past conv frames predicts the frames 1…K steps ahead (InfoNCE)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.audio import AudioAugment, augment_waveforms
from ssl_models.objectives.base import AudioObjective
from ssl_models.rng import rand


def sample_negatives(b: int, t: int, steps: int, n: int, generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
    """For every context (b, t), ``n`` frames drawn uniformly from the whole batch, never one of the
    frames t + 1 … t + steps of utterance b (the positives of the ``steps`` predictions made from it).

    Indices are into the flattened frames (b · T + t). Shape: → (B, T, N) long, on ``device``.
    """
    total = b * t
    pos = torch.arange(b * t).view(b, t, 1)                                       # flat index of (b, t)
    excl = (t - 1 - torch.arange(t)).clamp(max=steps).view(1, t, 1)               # how many future frames exist
    u = rand((b, t, n), generator)                                                # uniform [0, 1)
    r = torch.minimum((u * (total - excl)).long(), total - excl - 1)              # uniform in [0, total − excl)
    idx = r + excl * (r > pos)                                                    # skip the excluded window
    return idx.to(device if device is not None else "cpu")


class CPCAudio(AudioObjective):
    """Contrastive predictive coding on raw audio (van den Oord, Li & Vinyals 2018, "Representation
    Learning with Contrastive Predictive Coding", §3.1).

    A strided conv encoder turns the waveform into one frame per 160 samples, z = backbone.local(wave)
    (B, T, D); a causal GRU summarises the past, c = backbone.context(z) (B, T, C), c_t seeing
    z_1 … z_t only. One linear map W_k per step k = 1 … K scores a candidate frame z against the
    context, f_k(z, c_t) = exp(zᵀ W_k c_t), and InfoNCE (eq. 4) asks for the true future frame z_{t+k}
    among N negatives z_j:

        L_k = −mean_{b, t < T−k} log [ f_k(z_{t+k}, c_t) / (f_k(z_{t+k}, c_t) + Σ_{j=1..N} f_k(z_j, c_t)) ]
        L = mean_k L_k

    Negatives: the paper draws them from the minibatch; the modified CPC (Rivière, Joulin, Mazaré &
    Dupoux 2020) from the same speaker, which the run does not know at train time. Here each context
    (b, t) gets ``negatives`` frames drawn uniformly from all the batch's frames (other utterances and
    its own), shared by its K predictions (as in Rivière et al.'s code) and never one of the frames
    t + 1 … t + K of its own utterance, so no prediction's positive is among its negatives. They are
    drawn in :meth:`make_views` from the run's generator. The scores and the log-softmax are in fp32.

    Defaults: K = 12 steps (120 ms) as in the paper: the predictors and the scoring cost little beside
    the conv encoder, and a one-second utterance has 98 frames. ``negatives`` = 32 (Rivière et al.:
    128; each adds B·T·K·D multiply-adds and B·T·D floats of gathered frames, so 32 keeps a CPU batch
    small). Augmentation: the paper uses none; a light random gain (±``gain_db``) and, with
    probability ``noise_p``, white noise at an SNR in ``snr_db`` (which also gives silent frames
    something that tells them apart). The backbone must be ``audio_cpc`` (conv frames, a causal GRU):
    a bidirectional context would see z_{t+k}.

    Args:
        backbone: an ``AudioEncoder`` with ``context_kind == "gru"``.
        prediction_steps: K.
        negatives: N, per context (shared by its K predictions).
        gain_db, noise_p, snr_db: the augmentation (``ssl_models.audio.AudioAugment``).

    Shapes: utterances (B, 1, L) → views {"waves": (B, L), "negatives": (B, T, N) long, indices into
    the flattened (B·T) frames}; z (B, T, D), c (B, T, C), predictions (B, T, K, D), logits
    (B, T, K, 1 + N). Logged: ``accuracy`` (share of predictions whose positive outscores every
    negative, averaged over k), ``accuracy_k1`` and ``accuracy_kK`` (the first and last step).
    """

    name = "cpc_audio"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int = 28, in_channels: Optional[int] = None,
                 prediction_steps: int = 12, negatives: int = 32, gain_db: float = 6.0, noise_p: float = 0.5,
                 snr_db: tuple[float, float] = (15.0, 40.0)):
        super().__init__(backbone, image_size, in_channels)
        self.require_causal_context(backbone, "audio_cpc")
        if int(prediction_steps) < 1 or int(negatives) < 1:
            raise ValueError(f"cpc_audio: prediction_steps and negatives must be >= 1, got {prediction_steps}, "
                             f"{negatives}")
        if gain_db < 0 or not 0 <= noise_p <= 1 or snr_db[0] > snr_db[1]:
            raise ValueError(f"cpc_audio: gain_db >= 0, noise_p in [0, 1], snr_db (low, high); got {gain_db}, "
                             f"{noise_p}, {snr_db}")
        self.prediction_steps, self.negatives = int(prediction_steps), int(negatives)
        self.augment = AudioAugment(gain_db=float(gain_db), noise_p=float(noise_p),
                                    snr_db=(float(snr_db[0]), float(snr_db[1])), shift=0.0, speed=(1.0, 1.0),
                                    speed_p=0.0)
        d, c = backbone.local_dim, backbone.feature_dim
        self.predictors = nn.ModuleList(nn.Linear(c, d, bias=False) for _ in range(self.prediction_steps))  # W_k

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Gain and noise per utterance; the negatives of every context.

        Shape: images (B, 1, L) or (B, L) float in [-1, 1] (or int16) → {"waves": (B, L) float32,
        "negatives": (B, T, N) long}, T = 1 + (L − 400) // 160.
        """
        waves = augment_waveforms(images, self.augment, generator)
        b, t = waves.shape[0], self.backbone.frames(waves.shape[1])
        if t <= self.prediction_steps:
            raise ValueError(f"cpc_audio: utterances of {t} frames are too short for {self.prediction_steps} "
                             f"prediction steps")
        neg = sample_negatives(b, t, self.prediction_steps, self.negatives, generator, waves.device)
        return {"waves": waves, "negatives": neg}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["waves"] (B, L), views["negatives"] (B, T, N) → {"loss": (), "accuracy": (),
        "accuracy_k1": (), "accuracy_kK": ()}."""
        z = self.backbone.local(views["waves"])                                   # (B, T, D)
        c = self.backbone.context(z)                                              # (B, T, C)
        b, t, d = z.shape
        neg = views["negatives"]
        if neg.shape[:2] != (b, t):
            raise ValueError(f"cpc_audio: negatives {tuple(neg.shape)} do not match the {b} × {t} frames")
        K, dev = self.prediction_steps, z.device
        pred = torch.stack([w(c) for w in self.predictors], 2)                    # (B, T, K, D): W_k c_t
        steps = torch.arange(1, K + 1, device=dev)
        future = torch.arange(t, device=dev)[:, None] + steps                     # (T, K): t + k
        valid = future < t                                                        # (T, K)
        with torch.autocast(dev.type, enabled=False):
            pred, zf = pred.float(), z.float()
            z_pos = zf[:, future.clamp(max=t - 1)]                                # (B, T, K, D)
            z_neg = zf.reshape(b * t, d)[neg]                                     # (B, T, N, D)
            pos = (pred * z_pos).sum(-1, keepdim=True)                            # (B, T, K, 1)
            negs = torch.einsum("btkd,btnd->btkn", pred, z_neg)                   # (B, T, K, N)
            logits = torch.cat([pos, negs], -1)                                   # (B, T, K, 1 + N)
            nll = -F.log_softmax(logits, -1)[..., 0]                              # (B, T, K)
            w = valid.float()                                                     # (T, K)
            count = w.sum(0) * b                                                  # (K,) contexts per step
            loss = ((nll * w).sum((0, 1)) / count).mean()
            with torch.no_grad():
                hit = (pos[..., 0] > negs.amax(-1)).float()                       # (B, T, K)
                acc = (hit * w).sum((0, 1)) / count                               # (K,)
        return {"loss": loss, "accuracy": acc.mean(), "accuracy_k1": acc[0], "accuracy_kK": acc[-1]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prediction_steps={self.prediction_steps}, negatives={self.negatives}"
