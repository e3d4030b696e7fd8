"""Heads that sit on a backbone's flat features.

All heads derive from :class:`Head`, a small ``nn.Sequential`` built from a list of
``(in_dim, out_dim, batch_norm, activation)`` blocks (the shape lightly uses for its
``ProjectionHead``), so a projection MLP, BYOL's predictor and a pretext classifier differ only
in their block list. Prototypes and decoders have their own small classes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Block = tuple[int, int, Optional[nn.Module], Optional[nn.Module]]


class Head(nn.Sequential):
    """A stack of Linear(+BN)(+activation) blocks.

    Shape: input (B, in_dim) → output (B, out_dim).
    """

    def __init__(self, blocks: Sequence[Block]):
        layers: list[nn.Module] = []
        for in_dim, out_dim, bn, act in blocks:
            layers.append(nn.Linear(in_dim, out_dim, bias=bn is None))
            if bn is not None:
                layers.append(bn)
            if act is not None:
                layers.append(act)
        super().__init__(*layers)
        self.in_dim = blocks[0][0]
        self.out_dim = blocks[-1][1]


class ProjectionMLP(Head):
    """Projection head g(·) of SimCLR/MoCo v2/BYOL: ``layers`` Linear layers, BN+ReLU between.

    ``last_bn`` adds an affine-free BN after the last layer (SimCLR v2 / MoCo v3 style).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, layers: int = 2,
                 batch_norm: bool = True, last_bn: bool = False):
        if layers < 1:
            raise ValueError(f"a projection MLP needs at least 1 layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        blocks: list[Block] = []
        for i in range(layers):
            last = i == layers - 1
            bn = nn.BatchNorm1d(dims[i + 1]) if (batch_norm and not last) else None
            if last and last_bn:
                bn = nn.BatchNorm1d(dims[i + 1], affine=False)
            blocks.append((dims[i], dims[i + 1], bn, None if last else nn.ReLU(inplace=True)))
        super().__init__(blocks)


class BYOLPredictor(ProjectionMLP):
    """BYOL's predictor q(·): a 2-layer MLP from projection space to projection space."""

    def __init__(self, dim: int = 256, hidden_dim: int = 4096):
        super().__init__(dim, hidden_dim, dim, layers=2, batch_norm=True)


class ClassifierHead(Head):
    """A pretext-task classifier: optional hidden layer, then logits over ``num_classes``."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 0, dropout: float = 0.0):
        if hidden_dim:
            blocks: list[Block] = [(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)),
                                   (hidden_dim, num_classes, None, None)]
        else:
            blocks = [(in_dim, num_classes, None, None)]
        super().__init__(blocks)
        if dropout:
            self.insert(0, nn.Dropout(dropout))


class SwAVPrototypes(nn.Module):
    """SwAV's prototypes C: a bias-free linear layer whose rows are kept on the unit sphere.

    Shape: z (B, dim), L2-normalised → scores (B, n_prototypes).
    """

    def __init__(self, dim: int = 128, n_prototypes: int = 300):
        super().__init__()
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self.normalize()

    @torch.no_grad()
    def normalize(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer(z)


class ConvDecoder(nn.Module):
    """Decoder for the reconstruction objectives: flat features → dense map (B, out_channels, H, W).

    Linear to a (4·width, s, s) grid with s = ceil(image_size / 4), two ×2 transposed-conv
    upsamplings, a 3×3 conv to ``out_channels``, then a crop to exactly ``image_size``.
    Used for the autoencoders (out_channels = image channels) and colorization (ab values or
    ab-bin logits).
    """

    def __init__(self, in_dim: int, out_channels: int, image_size: int, width: int = 32):
        super().__init__()
        self.image_size = image_size
        self.s = math.ceil(image_size / 4)
        self.width = width
        self.fc = nn.Sequential(nn.Linear(in_dim, 4 * width * self.s * self.s), nn.ReLU(inplace=True))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Shape: h (B, in_dim) → (B, out_channels, image_size, image_size)."""
        x = self.fc(h).view(h.shape[0], 4 * self.width, self.s, self.s)  # (B, 4w, s, s)
        x = self.up(x)                                                   # (B, C, 4s, 4s)
        return x[..., : self.image_size, : self.image_size]
