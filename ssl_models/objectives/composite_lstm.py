"""Composite LSTM: from the first frames of a clip, reconstruct them backwards and predict the next ones."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_clips
from ssl_models.heads import ConvDecoder
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint


class CompositeLSTM(Objective):
    """Composite LSTM (Srivastava, Mansimov & Salakhutdinov 2015, "Unsupervised Learning of Video
    Representations using LSTMs").

    A window of P + Q consecutive frames x_1 … x_{P+Q} (``context`` P, ``future`` Q) is taken from
    each clip; every frame goes through the backbone f. An encoder LSTM reads f(x_1) … f(x_P); two
    decoder LSTMs start from its final state (h, c). The reconstructor LSTM_rec outputs the input frames in
    reverse order, x_P … x_1; the predictor LSTM_fut outputs the next frames, x_{P+1} … x_{P+Q}. Both are
    conditional: each step's input is the backbone feature of the frame the decoder had to output
    at the step before (zero at the first step), the true frame in training (teacher forcing; at
    test the paper feeds back the generated frame). A frame decoder (g_rec, g_fut: one per decoder LSTM,
    :class:`~ssl_models.heads.ConvDecoder`) maps each hidden state to per-pixel logits, and with
    ℓ(z, x) the per-pixel binary cross-entropy of σ(z) against intensities x in [0, 1]:

        L = (1/B) Σ_b [ (1/P) Σ_{j=1..P} ℓ(g_rec(r_j), x_{P+1−j}) + (1/Q) Σ_{j=1..Q} ℓ(g_fut(q_j), x_{P+j}) ]
        r_j = LSTM_rec(u_j, r_{j−1}),  u_1 = 0,  u_j = f(x_{P+2−j})     (the frame reconstructed at step j − 1)
        q_j = LSTM_fut(v_j, q_{j−1}),  v_1 = 0,  v_j = f(x_{P+j−1})     (the frame predicted at step j − 1)
        r_0 = q_0 = the encoder's final (h, c) after f(x_1) … f(x_P)

    each ℓ averaged over pixels and channels. The paper's loss is this cross-entropy on binary
    Moving MNIST; on RGB intensities in [0, 1] it is the cross-entropy of Bernoulli pixels with
    soft targets (its minimum is the targets' entropy, not 0), kept so that the two terms compare
    with the paper's. The paper's encoder reads pixels or features of a frozen ImageNet network;
    here the frames go through the image backbone trained by the loss, so the pretrained network
    is an image backbone, scored by the image protocols as well.

    Args:
        backbone: an image backbone with ``feature_dim``.
        image_size: side of the square frames it sees.
        context: P, frames the encoder reads (the paper: 10).
        future: Q, frames the predictor outputs (the paper: 10); clips need P + Q frames.
        hidden_dim: width of the three LSTMs (the paper: 2048 or 4096 units).
        num_layers: layers of each LSTM.
        conditional: False feeds zeros at every decoder step (the paper's unconditioned decoders).
        decoder_width: base width of the frame decoders.
        crop_scale, flip_p: one crop and one horizontal flip per clip, for all its frames.

    Shapes: clips (B, T, C, H, W) uint8 → views {"frames": (B, P + Q, C, S, S) in [0, 1]}; the
    backbone sees (B·(P + Q), C, S, S), each frame decoder (B·P or B·Q, hidden_dim). Logged:
    ``reconstruction_loss``, ``prediction_loss``.
    """

    name = "composite_lstm"
    contrastive = False
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, context: int = 8, future: int = 8,
                 hidden_dim: int = 256, num_layers: int = 1, conditional: bool = True, decoder_width: int = 32,
                 crop_scale: tuple[float, float] = (0.8, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        if context < 1 or future < 1 or hidden_dim < 1 or num_layers < 1:
            raise ValueError(f"composite_lstm: context, future, hidden_dim and num_layers must be >= 1, got "
                             f"{context}, {future}, {hidden_dim}, {num_layers}")
        self.context, self.future = int(context), int(future)
        self.conditional = bool(conditional)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        d = backbone.feature_dim
        self.encoder = nn.LSTM(d, hidden_dim, num_layers, batch_first=True)
        self.reconstructor = nn.LSTM(d, hidden_dim, num_layers, batch_first=True)
        self.predictor = nn.LSTM(d, hidden_dim, num_layers, batch_first=True)
        self.reconstruct_frame = ConvDecoder(hidden_dim, self.in_channels, self.image_size, width=decoder_width)
        self.predict_frame = ConvDecoder(hidden_dim, self.in_channels, self.image_size, width=decoder_width)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, C, H, W) uint8 → {"frames": (B, P + Q, C, S, S) in [0, 1]},
        P + Q consecutive frames from a random start per clip."""
        b, t = images.shape[:2]
        k = self.context + self.future
        if t < k:
            raise ValueError(f"composite_lstm needs clips of at least context + future = {k} frames, got {t}; "
                             f"re-ingest with a larger --clip-frames or lower context/future")
        start = randint(0, t - k + 1, (b,), generator, images.device)                    # (B,)
        idx = start[:, None] + torch.arange(k, device=images.device)                       # (B, P + Q)
        frames = images[torch.arange(b, device=images.device)[:, None], idx]               # (B, P + Q, C, H, W)
        return {"frames": prepare_clips(frames, self.image_size, self.crop_scale, self.flip_p, generator)}

    def _inputs(self, feats: torch.Tensor) -> torch.Tensor:
        """A decoder's inputs from the features of the frames it outputs: zero, then each previous
        target's feature (or zeros throughout when unconditioned). Shape: (B, L, D) → (B, L, D)."""
        if not self.conditional:
            return torch.zeros_like(feats)
        return torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)

    def decode(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel logits of the reconstructed (reversed) and the predicted frames.

        Shape: frames (B, P + Q, C, S, S) → (B, P, C, S, S) for x_P … x_1, (B, Q, C, S, S) for
        x_{P+1} … x_{P+Q}.
        """
        x = views["frames"]
        b, k = x.shape[:2]
        if k != self.context + self.future:
            raise ValueError(f"composite_lstm: views hold {k} frames, expected context + future = "
                             f"{self.context + self.future}")
        p, q = self.context, self.future
        feats = self.backbone(normalize_input(x.flatten(0, 1))).view(b, k, -1)         # (B, P + Q, D)
        _, state = self.encoder(feats[:, :p])                                            # 2 × (layers, B, H)
        h_rec, _ = self.reconstructor(self._inputs(feats[:, :p].flip(1)), state)         # (B, P, H)
        h_pred, _ = self.predictor(self._inputs(feats[:, p:]), state)                    # (B, Q, H)
        rec = self.reconstruct_frame(h_rec.flatten(0, 1)).view(b, p, *x.shape[2:])      # (B, P, C, S, S)
        pred = self.predict_frame(h_pred.flatten(0, 1)).view(b, q, *x.shape[2:])        # (B, Q, C, S, S)
        return rec, pred

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: frames (B, P + Q, C, S, S) in [0, 1] → {"loss": scalar, "reconstruction_loss",
        "prediction_loss"}."""
        x = views["frames"].float()
        rec, pred = self.decode(views)
        rec_loss = F.binary_cross_entropy_with_logits(rec.float(), x[:, :self.context].flip(1))
        pred_loss = F.binary_cross_entropy_with_logits(pred.float(), x[:, self.context:])
        return {"loss": rec_loss + pred_loss, "reconstruction_loss": rec_loss.detach(),
                "prediction_loss": pred_loss.detach()}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, context={self.context}, future={self.future}, "
                f"conditional={self.conditional}")
