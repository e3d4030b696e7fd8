"""Denoising autoencoder: reconstruct the clean input from a corrupted one."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.heads import ConvDecoder
from ssl_models.objectives.base import Objective
from ssl_models.rng import rand, randn


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None,
                   clamp: bool = False) -> torch.Tensor:
    """Additive isotropic Gaussian noise x̃ = x + ε, ε ~ N(0, std²) (Vincent et al. 2010).

    Shape: x (B, C, H, W) → (B, C, H, W); clipped to [0, 1] if ``clamp``.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    out = x + std * randn(x.shape, generator, x.device).to(x.dtype)
    return out.clamp(0, 1) if clamp else out


def masking_noise(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None,
                  return_mask: bool = False):
    """Masking noise (Vincent et al. 2008): set a random ``fraction`` of each image's pixels to 0.

    Exactly round(fraction · H · W) pixel positions per image are zeroed, across all channels.

    Shape: x (B, C, H, W) → (B, C, H, W), and with ``return_mask`` the mask (B, 1, H, W), True = zeroed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"masking fraction must be in [0, 1], got {fraction}")
    B, C, H, W = x.shape
    k = int(round(fraction * H * W))
    scores = rand((B, H * W), generator, x.device)                   # (B, H·W)
    idx = scores.topk(k, dim=1, largest=False).indices               # (B, k) the k lowest
    mask = torch.zeros(B, H * W, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
    mask = mask.view(B, 1, H, W)                                      # (B, 1, H, W)
    out = x.masked_fill(mask, 0.0)
    return (out, mask) if return_mask else out


class DenoisingAutoencoder(Objective):
    """Denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol 2008, "Extracting and Composing
    Robust Features with Denoising Autoencoders").

    A corruption q(x̃ | x) is applied to the input; the backbone f encodes x̃ and the decoder g must
    give back the *clean* x:

        L = (1 / (B·C·H·W)) Σ ‖g(f(x̃)) − x‖²,   x̃ ~ q(x̃ | x).

    Corruptions: ``noise="masking"`` (the paper's: a random ``fraction`` of each image's pixels set
    to 0) or ``noise="gaussian"`` (additive isotropic N(0, ``std``²), from the 2010 journal
    version). The squared error suits inputs in [0, 1]; the paper also uses cross-entropy for
    binary inputs.

    Args:
        backbone: any backbone with ``feature_dim``.
        image_size: side of the square views.
        noise: "masking" or "gaussian".
        fraction: share of pixels zeroed by masking noise.
        std: standard deviation of Gaussian noise (images in [0, 1]).
        decoder_width, crop_scale, flip_p: as in :class:`~ssl_models.objectives.autoencoder.Autoencoder`.
    """

    name = "denoising_autoencoder"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, noise: str = "masking", fraction: float = 0.25,
                 std: float = 0.2, decoder_width: int = 32, crop_scale: tuple[float, float] = (1.0, 1.0),
                 flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        if noise not in ("masking", "gaussian"):
            raise ValueError(f"noise must be 'masking' or 'gaussian', got {noise!r}")
        if noise == "masking" and not 0.0 < fraction < 1.0:
            raise ValueError(f"masking fraction must be in (0, 1), got {fraction}; Vincent et al. use 0.1–0.5")
        if noise == "gaussian" and std <= 0:
            raise ValueError(f"Gaussian noise std must be > 0 (images are in [0, 1]), got {std}")
        self.noise = noise
        self.fraction = float(fraction)
        self.std = float(std)
        self.decoder = ConvDecoder(backbone.feature_dim, self.in_channels, self.image_size, width=decoder_width)
        self.crop_scale = tuple(crop_scale)
        self.flip_p = float(flip_p)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x̃ ~ q(x̃ | x). Shape: x (B, C, S, S) in [0, 1] → (B, C, S, S)."""
        if self.noise == "masking":
            return masking_noise(x, self.fraction, generator)
        return gaussian_noise(x, self.std, generator)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"corrupted": x̃, "clean": x}, both (B, C, S, S) in [0, 1] scale."""
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        return {"corrupted": self.corrupt(x, generator), "clean": x}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["corrupted"], views["clean"] (B, C, S, S)."""
        clean = views["clean"]
        recon = self.decoder(self.backbone(normalize_input(views["corrupted"])))  # (B, C, S, S)
        loss = F.mse_loss(recon, clean)
        return {"loss": loss, "mse": loss.detach()}
