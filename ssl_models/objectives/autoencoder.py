"""Autoencoder: reconstruct the input from the backbone's flat feature."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.heads import ConvDecoder
from ssl_models.objectives.base import Objective


class Autoencoder(Objective):
    """A plain autoencoder (Hinton & Salakhutdinov 2006, "Reducing the Dimensionality of Data with
    Neural Networks"; the baseline that Vincent et al. 2008 corrupt): the backbone f encodes the
    image, a :class:`~ssl_models.heads.ConvDecoder` g decodes the flat feature back to pixels, and

        L = (1 / (B·C·H·W)) Σ ‖g(f(x)) − x‖²,

    the mean squared error to the clean input x in [0, 1]. The backbone sees x normalised like
    every other view (``augment.normalize_input``); the target stays in [0, 1].

    Args:
        backbone: any backbone with ``feature_dim``.
        image_size: side of the square views.
        decoder_width: base width of the decoder (4·, 2·, 1· this many channels).
        crop_scale: area range of a random resized crop; (1, 1) = the whole image, resized.
        flip_p: probability of a horizontal flip.

    >>> ae = Autoencoder(backbones.build("small_cnn", in_channels=1), image_size=28)
    >>> out = ae(ae.make_views(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)))
    >>> out["loss"].backward()
    """

    name = "autoencoder"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, decoder_width: int = 32,
                 crop_scale: tuple[float, float] = (1.0, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        self.decoder = ConvDecoder(backbone.feature_dim, self.in_channels, self.image_size, width=decoder_width)
        self.crop_scale = tuple(crop_scale)
        self.flip_p = float(flip_p)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"images": (B, C, S, S) float in [0, 1]}."""
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        return {"images": x}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["images"] (B, C, S, S) in [0, 1]."""
        x = views["images"]
        recon = self.decoder(self.backbone(normalize_input(x)))   # (B, C, S, S)
        loss = F.mse_loss(recon, x)
        return {"loss": loss, "mse": loss.detach()}
