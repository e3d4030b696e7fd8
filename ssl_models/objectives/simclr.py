"""SimCLR: two augmented views, a projection MLP, NT-Xent over the global batch."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import ViewConfig, check_images, resolve_view_config, two_views
from ssl_models.heads import ProjectionMLP
from ssl_models.losses import nt_xent
from ssl_models.objectives.base import Objective


class SimCLR(Objective):
    """SimCLR with the NT-Xent loss.

    Chen, Kornblith, Norouzi, Hinton (2020), "A Simple Framework for Contrastive Learning of
    Visual Representations". Each image x gives two views x̃_i, x̃_j; z = g(f(x̃)) with backbone f
    and projection MLP g; with u = z/‖z‖, for the positive pair (i, j), eq. (1)::

        ℓ(i, j) = −log [ exp(u_iᵀu_j/τ) / Σ_{k ≠ i} exp(u_iᵀu_k/τ) ]

    averaged over the 2N anchors, where k runs over both views of every image on every worker:
    negatives are gathered across ranks with gradient (:func:`ssl_models.losses.nt_xent`).

    Both views go through the backbone in one batch (their BatchNorm statistics are shared, as
    in the reference implementation). Under DistributedDataParallel, convert BatchNorm to
    ``SyncBatchNorm`` for the paper's global-BN setting.

    Args:
        temperature: τ (0.5 for CIFAR-sized data in the paper, 0.1 for ImageNet).
        hidden_dim, out_dim, projection_layers, batch_norm: the projection MLP g
            (hidden defaults to the backbone's feature_dim, as in the paper).
        gather: gather negatives across ranks (True) or use the local batch only.
        view: the augmentation, a :class:`ViewConfig` or a dict overriding its fields.

    >>> backbone = ssl_models.backbones.build("small_cnn", in_channels=1)
    >>> objective = SimCLR(backbone, image_size=28)
    >>> out = objective(objective.make_views(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)))
    """

    name = "simclr"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 temperature: float = 0.5, hidden_dim: Optional[int] = None, out_dim: int = 128,
                 projection_layers: int = 2, batch_norm: bool = True, gather: bool = True,
                 view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if temperature <= 0:
            raise ValueError(f"SimCLR: temperature must be > 0 (try 0.1-0.5), got {temperature}")
        self.temperature = float(temperature)
        self.gather = bool(gather)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim,
                                        layers=projection_layers, batch_norm=batch_norm)
        self.view_config = resolve_view_config(view, ViewConfig(size=self.image_size))

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Two independent views.

        Shape: images (B, C, H, W) uint8 → {"view1", "view2"}: (B, C, S, S) float, S = view size.
        """
        check_images(images, self.in_channels, "SimCLR")
        v1, v2 = two_views(images, self.view_config, generator=generator)
        return {"view1": v1, "view2": v2}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["view1"], views["view2"] (B, C, S, S) → {"loss": (), "pos_cosine": ()}."""
        v1, v2 = views["view1"], views["view2"]
        n = v1.shape[0]
        z = self.projection(self.backbone(torch.cat([v1, v2], dim=0)))     # (2B, out_dim)
        z1, z2 = z[:n], z[n:]                                              # (B, out_dim) each
        loss = nt_xent(z1, z2, self.temperature, gather=self.gather)
        with torch.no_grad():
            pos = F.cosine_similarity(z1, z2, dim=1).mean()
        return {"loss": loss, "pos_cosine": pos}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, gather={self.gather}"
