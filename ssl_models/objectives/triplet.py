"""Triplet ranking loss on two views per image, with batch-hard or random negatives."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import ViewConfig, check_images, resolve_view_config, two_views
from ssl_models.heads import ProjectionMLP
from ssl_models.losses import triplet_margin
from ssl_models.objectives.base import Objective

MINING = ("batch_hard", "random")


class Triplet(Objective):
    """Triplet ranking loss with negative mining.

    Schroff, Kalenichenko, Philbin (2015), "FaceNet: A Unified Embedding for Face Recognition
    and Clustering", eq. (1)-(2) (after Weinberger & Saul 2009); batch-hard mining from Hermans,
    Beyer, Leibe (2017), "In Defense of the Triplet Loss for Person Re-Identification". With
    Euclidean distance d on the embeddings::

        L = mean_a max(0, m + d(a, p) − d(a, n))

    The anchor a is one view of an image, the positive p its other view, the negative n a view
    of another image of the batch: with ``mining="batch_hard"`` the closest one (argmin of d over
    j ≠ i, chosen without gradient), with ``mining="random"`` a uniformly random other image,
    drawn in :meth:`make_views` from the generator (so it is reproducible). The loss is
    symmetrised: each view serves once as anchor, the negatives taken from the other view.

    Args:
        margin: m (0.5 suits L2-normalised embeddings).
        mining: "batch_hard" or "random".
        out_dim, hidden_dim, normalize: the embedding (projection MLP; L2-normalised by default).
        view: the augmentation (ViewConfig or dict of overrides).
    """

    name = "triplet"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 margin: float = 0.5, mining: str = "batch_hard", out_dim: int = 64,
                 hidden_dim: Optional[int] = None, normalize: bool = True, view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if margin < 0:
            raise ValueError(f"Triplet: margin must be >= 0 (0.2-1.0 for normalised embeddings), got {margin}")
        if mining not in MINING:
            raise ValueError(f"Triplet: mining must be one of {MINING}, got {mining!r}")
        self.margin = float(margin)
        self.mining = mining
        self.normalize = bool(normalize)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim,
                                        layers=2, batch_norm=True)
        self.view_config = resolve_view_config(view, ViewConfig(size=self.image_size))

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"view1", "view2"}: (B, C, S, S) float, plus for random
        mining {"negative1", "negative2"}: (B,) long, index of another image (≠ i) for each anchor."""
        check_images(images, self.in_channels, "Triplet")
        v1, v2 = two_views(images, self.view_config, generator=generator)
        views = {"view1": v1, "view2": v2}
        if self.mining == "random":
            B = images.shape[0]
            for key in ("negative1", "negative2"):
                shift = torch.randint(1, B, (B,), generator=generator)          # 1 … B−1, never 0
                views[key] = ((torch.arange(B) + shift) % B).to(images.device)
        return views

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (N, C, S, S) → (N, out_dim)."""
        z = self.projection(self.backbone(x))
        return F.normalize(z, dim=1) if self.normalize else z

    @torch.no_grad()
    def _hardest(self, anchors: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Index of the closest other image for each anchor. Shape: (B, D), (B, D) → (B,)."""
        d = torch.cdist(anchors, others)                                       # (B, B)
        d.fill_diagonal_(float("inf"))                                         # the positive is not a negative
        return d.argmin(dim=1)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["view1"], views["view2"] (B, C, S, S) → {"loss": (), "active": ()}."""
        v1, v2 = views["view1"], views["view2"]
        n = v1.shape[0]
        z = self.embed(torch.cat([v1, v2], dim=0))                             # (2B, out_dim)
        z1, z2 = z[:n], z[n:]
        if self.mining == "batch_hard":
            j1, j2 = self._hardest(z1, z2), self._hardest(z2, z1)
        else:
            j1, j2 = views["negative1"], views["negative2"]
        loss = 0.5 * (triplet_margin(z1, z2, z2[j1], self.margin) + triplet_margin(z2, z1, z1[j2], self.margin))
        with torch.no_grad():
            gap = torch.linalg.vector_norm(z1 - z2, dim=1) - torch.linalg.vector_norm(z1 - z2[j1], dim=1)
            active = (gap + self.margin > 0).float().mean()                    # fraction of triplets with loss
        return {"loss": loss, "active": active}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, mining={self.mining!r}"
