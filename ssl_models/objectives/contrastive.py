"""Pairwise contrastive loss with a margin (Hadsell, Chopra, LeCun 2006) on two views per image."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import ViewConfig, check_images, resolve_view_config, two_views
from ssl_models.heads import ProjectionMLP
from ssl_models.losses import contrastive_margin
from ssl_models.objectives.base import Objective


class PairwiseContrastive(Objective):
    """Pairwise contrastive loss ("DrLIM").

    Hadsell, Chopra, LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping",
    eq. (4): for a pair with Euclidean distance D = ‖G(x₁) − G(x₂)‖₂ and label Y (0 similar,
    1 dissimilar)::

        L(Y, D) = (1 − Y)·½·D² + Y·½·max(0, m − D)²

    Pairs come from two augmented views of the batch: (view₁ of image i, view₂ of image i) is
    similar, (view₁ of i, view₂ of j ≠ i) dissimilar. G is the backbone followed by a small
    projection MLP (``out_dim``), its output L2-normalised by default (so D ∈ [0, 2] and the
    margin is on a fixed scale). There are B similar and B(B − 1) dissimilar pairs; the two
    kinds are averaged separately and added, so the similar pairs are not drowned out::

        loss = mean_similar L + mean_dissimilar L

    Args:
        margin: m (1.0 suits normalised embeddings, whose random pairs sit at D ≈ √2).
        out_dim, hidden_dim: the projection (hidden defaults to the backbone's feature_dim).
        normalize: L2-normalise the embeddings before measuring distances.
        view: the augmentation (ViewConfig or dict of overrides).
    """

    name = "contrastive"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 margin: float = 1.0, out_dim: int = 32, hidden_dim: Optional[int] = None, normalize: bool = True,
                 view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if margin <= 0:
            raise ValueError(f"PairwiseContrastive: margin must be > 0 (1.0 for normalised embeddings), got {margin}")
        self.margin = float(margin)
        self.normalize = bool(normalize)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim,
                                        layers=2, batch_norm=True)
        self.view_config = resolve_view_config(view, ViewConfig(size=self.image_size))

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"view1", "view2"}: (B, C, S, S) float."""
        check_images(images, self.in_channels, "PairwiseContrastive")
        v1, v2 = two_views(images, self.view_config, generator=generator)
        return {"view1": v1, "view2": v2}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (N, C, S, S) → (N, out_dim)."""
        z = self.projection(self.backbone(x))
        return F.normalize(z, dim=1) if self.normalize else z

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["view1"], views["view2"] (B, C, S, S) → {"loss": (), "pos_distance": (), "neg_distance": ()}."""
        v1, v2 = views["view1"], views["view2"]
        n = v1.shape[0]
        z = self.embed(torch.cat([v1, v2], dim=0))                     # (2B, out_dim)
        z1, z2 = z[:n], z[n:]
        i, j = torch.meshgrid(torch.arange(n, device=z.device), torch.arange(n, device=z.device), indexing="ij")
        off = i != j                                                    # (B, B) dissimilar pairs
        i, j = i[off], j[off]                                           # (B(B−1),) each
        similar = contrastive_margin(z1, z2, z.new_zeros(n), self.margin)
        dissimilar = contrastive_margin(z1[i], z2[j], z.new_ones(i.numel()), self.margin)
        with torch.no_grad():
            pos_d = torch.linalg.vector_norm(z1 - z2, dim=1).mean()
            neg_d = torch.linalg.vector_norm(z1[i] - z2[j], dim=1).mean()
        return {"loss": similar + dissimilar, "pos_distance": pos_d, "neg_distance": neg_d}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, normalize={self.normalize}"
