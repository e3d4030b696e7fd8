"""BYOL: an online network with a predictor regresses an EMA target network's projection."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import ViewConfig, check_images, resolve_view_config, two_views
from ssl_models.heads import BYOLPredictor, ProjectionMLP
from ssl_models.objectives.base import Objective
from ssl_models.objectives.moco import momentum_copy, momentum_update


class BYOL(Objective):
    """Bootstrap Your Own Latent.

    Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
    Kavukcuoglu, Munos, Valko (2020), "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning". Online network: backbone f_θ, projector g_θ, predictor q_θ;
    target network: f_ξ, g_ξ, an exponential moving average of the online one. For views v, v′,
    with p = q_θ(g_θ(f_θ(v))) and z′ = g_ξ(f_ξ(v′)), eq. (2)::

        L_θ,ξ = ‖p/‖p‖ − z′/‖z′‖‖² = 2 − 2·cos(p, z′)

    symmetrised by swapping the views, L^BYOL = L + L̃ (eq. 2; range [0, 8]), averaged over the
    batch. After each optimizer step (:meth:`after_step`), ξ ← τ·ξ + (1 − τ)·θ with the cosine
    schedule of §3.2::

        τ = 1 − (1 − τ_base)·(cos(π·k/K) + 1)/2

    where k/K is ``self.progress`` (set by the training loop through ``set_progress``), so τ rises
    from τ_base to 1 at the end of training.

    The views are BYOL's asymmetric pair (Table 6): blur with p = 1.0 / 0.1, solarize with
    p = 0 / 0.2; everything else as :class:`ViewConfig`'s defaults.

    Args:
        momentum_base: τ_base (0.996 in the paper; 0.99 for short runs).
        hidden_dim, out_dim: projector g (4096 → 256 in the paper).
        predictor_hidden_dim: predictor q's hidden width (4096 in the paper).
        view1, view2: the two augmentations (ViewConfig or dict of overrides).
    """

    name = "byol"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 momentum_base: float = 0.996, hidden_dim: int = 4096, out_dim: int = 256,
                 predictor_hidden_dim: int = 4096, view1: "ViewConfig | dict | None" = None,
                 view2: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if not 0.0 <= momentum_base <= 1.0:
            raise ValueError(f"BYOL: momentum_base must be in [0, 1] (the paper uses 0.996), got {momentum_base}")
        self.momentum_base = float(momentum_base)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim, out_dim, layers=2, batch_norm=True)
        self.predictor = BYOLPredictor(dim=out_dim, hidden_dim=predictor_hidden_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projection = momentum_copy(self.projection)
        self.view1_config = resolve_view_config(view1, ViewConfig(size=self.image_size, blur_p=1.0, solarize_p=0.0))
        self.view2_config = resolve_view_config(view2, ViewConfig(size=self.image_size, blur_p=0.1, solarize_p=0.2))

    @property
    def view_config(self) -> ViewConfig:
        """The first view's augmentation (its mean/std are what ``preprocess`` normalises with)."""
        return self.view1_config

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """BYOL's asymmetric views. Shape: images (B, C, H, W) uint8 → {"view1", "view2"}: (B, C, S, S)."""
        check_images(images, self.in_channels, "BYOL")
        v1, v2 = two_views(images, self.view1_config, self.view2_config, generator=generator)
        return {"view1": v1, "view2": v2}

    def current_momentum(self) -> float:
        """τ at the current progress: 1 − (1 − τ_base)·(cos(π·progress) + 1)/2."""
        progress = float(self.progress)
        return 1.0 - (1.0 - self.momentum_base) * (math.cos(math.pi * progress) + 1.0) / 2.0

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["view1"], views["view2"] (B, C, S, S) → {"loss": (), "cosine": (), "momentum": float}."""
        v1, v2 = views["view1"], views["view2"]
        n = v1.shape[0]
        both = torch.cat([v1, v2], dim=0)                                        # (2B, C, S, S)
        p = self.predictor(self.projection(self.backbone(both)))                 # (2B, out_dim)
        with torch.no_grad():
            z = self.target_projection(self.target_backbone(both))               # (2B, out_dim)
        p, z = p.float(), z.float()                                              # loss in float32 under autocast
        p1, p2 = p[:n], p[n:]
        z1, z2 = z[:n], z[n:]
        cos_12 = F.cosine_similarity(p1, z2, dim=1)                              # (B,)
        cos_21 = F.cosine_similarity(p2, z1, dim=1)
        loss = (2 - 2 * cos_12).mean() + (2 - 2 * cos_21).mean()
        return {"loss": loss, "cosine": 0.5 * (cos_12 + cos_21).mean().detach(), "momentum": self.current_momentum()}

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of the target network with τ from the cosine schedule."""
        online = list(self.backbone.parameters()) + list(self.projection.parameters())
        target = list(self.target_backbone.parameters()) + list(self.target_projection.parameters())
        momentum_update(target, online, self.current_momentum())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum_base={self.momentum_base}"
