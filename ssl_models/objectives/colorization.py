"""Colorization: predict the ab colour channels of Lab from the lightness L."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import prepare_images
from ssl_models.color import ABQuantizer, lightness_input, rebalancing_weights, rgb_to_lab
from ssl_models.heads import ConvDecoder
from ssl_models.objectives.base import Objective


class Colorization(Objective):
    """Colorful image colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization").

    The image is converted to CIE Lab; the backbone f sees only L (scaled to [−1, 1], so it must be
    built with ``in_channels=1``) and a :class:`~ssl_models.heads.ConvDecoder` g predicts the
    colour of every pixel.

    ``mode="classification"`` (the paper's): the ab plane is quantised into Q bins
    (:class:`~ssl_models.color.ABQuantizer`), the target Z is the soft encoding of the true ab
    (5 nearest bins, Gaussian σ = 5) and the loss is the class-rebalanced cross-entropy, eq. (2):

        L = −(1 / HW) Σ_{h,w} v(Z_{h,w}) Σ_q Z_{h,w,q} log Ẑ_{h,w,q},   v(Z_{h,w}) = w_{q*},  q* = argmax_q Z_{h,w,q},

    with w ∝ ((1 − λ) p̃ + λ / Q)^−1, E_p̃[w] = 1 (:func:`~ssl_models.color.rebalancing_weights`),
    p̃ being estimated from a running histogram of the training pixels' bins (``ab_counts``, a
    buffer summed over workers when ``torch.distributed`` is initialised) rather than from all
    of ImageNet up front.

    ``mode="regression"``: g predicts ab / 110 directly with the squared error (the paper's L2
    baseline, which gives desaturated colours).

    Args:
        backbone: a backbone built with ``in_channels=1``.
        image_size: side of the square views.
        mode: "classification" or "regression".
        soft_targets: soft encoding (paper) or the nearest bin only (less memory).
        rebalance: weigh pixels by rarity (λ = ``lam``, smoothing σ = ``sigma``); off → all weights 1.
        in_gamut_only: classes are the in-gamut bins (Q = 262) or the whole 23×23 grid.
        decoder_width: base width of the decoder.
        crop_scale, flip_p: the light view.

    Logged: ``accuracy`` (predicted bin = nearest bin) in classification, ``ab_rmse`` in regression.
    """

    name = "colorization"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, mode: str = "classification", soft_targets: bool = True,
                 rebalance: bool = True, lam: float = 0.5, sigma: float = 5.0, in_gamut_only: bool = True,
                 decoder_width: int = 32, crop_scale: tuple[float, float] = (1.0, 1.0), flip_p: float = 0.5):
        backbone_channels = getattr(backbone, "in_channels", 1)
        if backbone_channels != 1:
            raise ValueError(f"colorization feeds the backbone the L channel only, but this backbone takes "
                             f"{backbone_channels} channels; build it with in_channels=1, e.g. "
                             f"backbones.build('resnet18', in_channels=1)")
        if mode not in ("classification", "regression"):
            raise ValueError(f"mode must be 'classification' or 'regression', got {mode!r}")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must be in (0, 1], got {lam}; the paper uses 0.5")
        super().__init__(backbone, image_size, in_channels=3)
        self.mode = mode
        self.soft_targets = bool(soft_targets)
        self.rebalance = bool(rebalance)
        self.lam = float(lam)
        self.sigma = float(sigma)
        self.crop_scale = tuple(crop_scale)
        self.flip_p = float(flip_p)
        self.quantizer = ABQuantizer(10, 110, in_gamut_only)
        out_channels = self.quantizer.num_bins if mode == "classification" else 2
        self.decoder = ConvDecoder(backbone.feature_dim, out_channels, self.image_size, width=decoder_width)
        # Running histogram of the training pixels' ab bins (float64: float32 stops counting at 2^24).
        self.register_buffer("ab_counts", torch.zeros(self.quantizer.num_bins, dtype=torch.float64))

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, 3, H, W) uint8 → {"L": (B, 1, S, S) in [−1, 1], "ab": (B, 2, S, S) in Lab units}."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"colorization needs colour images (B, 3, H, W): it predicts the colour (ab) "
                             f"of Lab from the lightness L, but got shape {tuple(images.shape)}; use an RGB "
                             f"dataset, or another objective for grayscale data such as Fashion-MNIST")
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        lab = rgb_to_lab(x)                                          # (B, 3, S, S)
        return {"L": lab[:, :1] / 50.0 - 1.0, "ab": lab[:, 1:]}

    @classmethod
    def backbone_channels(cls, image_channels: int) -> int:
        """1: the backbone sees the lightness L only. Refuses images without colour, before anything is built."""
        if image_channels != 3:
            raise ValueError(f"colorization needs colour images (3 channels) but these have {image_channels}: it "
                             f"predicts the colour (ab) of Lab from the lightness L; use an RGB dataset, or another "
                             f"objective for grayscale data such as Fashion-MNIST")
        return 1

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone sees the lightness channel only: L/50 − 1 of the un-augmented image.

        Shape: images (B, 3, H, W) uint8 → (B, 1, image_size, image_size).
        """
        return lightness_input(images, self.image_size)

    @torch.no_grad()
    def _update_histogram(self, bins: torch.Tensor) -> None:
        counts = torch.bincount(bins.flatten(), minlength=self.quantizer.num_bins).to(self.ab_counts.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.ab_counts += counts

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["L"] (B, 1, S, S), views["ab"] (B, 2, S, S)."""
        out = self.decoder(self.backbone(views["L"]))                # (B, Q or 2, S, S)
        ab = views["ab"]
        if self.mode == "regression":
            loss = F.mse_loss(out, ab / 110.0)
            return {"loss": loss, "ab_rmse": (loss.detach().sqrt() * 110.0)}
        with torch.no_grad():
            nearest = self.quantizer.encode_hard(ab)                 # (B, S, S) q* per pixel
            if self.training:
                self._update_histogram(nearest)
            if self.rebalance:
                weights = rebalancing_weights(self.ab_counts, self.quantizer.centers, self.lam, self.sigma)  # (Q,)
            else:
                weights = torch.ones(self.quantizer.num_bins, device=ab.device)
            target = self.quantizer.encode_soft(ab) if self.soft_targets else nearest  # (B, Q, S, S) or (B, S, S)
        ce = F.cross_entropy(out, target, reduction="none")          # (B, S, S)
        loss = (weights.to(ce.dtype)[nearest] * ce).mean()
        accuracy = (out.argmax(dim=1) == nearest).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
