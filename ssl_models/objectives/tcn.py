"""Time-contrastive networks: the same moment seen by two cameras is close, another moment is far."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_clips
from ssl_models.heads import ProjectionMLP
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint, uniform


class TCN(Objective):
    """Time-contrastive networks (Sermanet, Lynch, Chebotar, Hsu, Jang, Schaal & Levine 2018,
    "Time-Contrastive Networks: Self-Supervised Learning from Video").

    Multi-view (clips with a second camera): the anchor a is frame t of camera 1, the positive p the
    same frame t of camera 2, the negative n a frame t' of camera 1 at least ``negative_gap`` frames
    away (|t − t'| ≥ gap). Embeddings e = normalise(g(f(x))) (backbone f, projection g) and the
    triplet loss with margin α (0.2 in the paper):

        L = (1/B) Σ_b max(0, ‖e_a − e_p‖² − ‖e_a − e_n‖² + α)

    Single-view (no second camera): the positive is a frame within ``positive_radius`` of t in the
    same clip (the paper's radius 6 on 30 fps video), the negative one at least ``negative_gap``
    away. The cameras differ in placement, zoom and tint, so only what they share (the items and
    where they are in time) can bring a and p together.

    Args:
        backbone: an image backbone with ``feature_dim``.
        image_size: side of the square frames it sees.
        embed_dim: size of the embedding (the paper: 32).
        margin: α.
        negative_gap: minimum distance in frames of the negative (in clip frames, at the ingest's rate).
        positive_radius: single-view only: maximum distance in frames of the positive.
        crop_scale, flip_p: one crop and one flip per clip and camera.

    Shapes: images = clips (B, T, C, H, W), or (B, 2, T, C, H, W) with the second camera →
    views {"anchor", "positive", "negative": (B, C, S, S)}; the backbone sees (3·B, C, S, S).
    Logged: ``triplet_accuracy`` (share of triplets with the positive nearer than the negative).
    """

    name = "tcn"
    contrastive = True
    modality = "clip"
    takes_views = True       # the loop hands it (B, 2, T, C, H, W) where the run's clips have a second camera

    def __init__(self, backbone: nn.Module, image_size: int, embed_dim: int = 32, margin: float = 0.2,
                 negative_gap: int = 4, positive_radius: int = 1, crop_scale: tuple[float, float] = (0.8, 1.0),
                 flip_p: float = 0.0):
        super().__init__(backbone, image_size)
        if margin <= 0 or negative_gap < 1 or positive_radius < 0:
            raise ValueError(f"tcn: margin > 0, negative_gap >= 1, positive_radius >= 0; got {margin}, "
                             f"{negative_gap}, {positive_radius}")
        self.margin, self.gap, self.radius = float(margin), int(negative_gap), int(positive_radius)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        self.projection = ProjectionMLP(backbone.feature_dim, backbone.feature_dim, embed_dim, layers=2)

    def _times(self, b: int, t: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor times and negative times at least ``gap`` away. Shape: (B,), (B,)."""
        if t < self.gap + 1:
            raise ValueError(f"tcn needs clips of more than negative_gap={self.gap} frames, got {t}")
        anchor = randint(0, t, (b,), generator, device)
        # a uniform draw over the frames at least gap away, on either side
        left, right = (anchor - self.gap + 1).clamp(min=0), (t - anchor - self.gap).clamp(min=0)
        pick = (uniform((b,), 0.0, 1.0, generator, device) * (left + right)).long()
        negative = torch.where(pick < left, pick, anchor + self.gap + (pick - left))
        return anchor, negative

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: clips (B, T, C, H, W) or (B, 2, T, C, H, W) uint8 → {"anchor", "positive", "negative":
        (B, C, S, S) normalised}."""
        multi = images.ndim == 6
        cams = images if multi else images[:, None]
        b, _, t = cams.shape[:3]
        rows = torch.arange(b, device=images.device)
        anchor, negative = self._times(b, t, generator, images.device)
        if multi:
            positive, pos_cam = anchor, 1
        else:
            offset = randint(1, self.radius + 1, (b,), generator, images.device) if self.radius else torch.zeros_like(anchor)
            sign = torch.where(uniform((b,), 0.0, 1.0, generator, images.device) < 0.5, -1, 1)
            positive = (anchor + sign * offset).clamp(0, t - 1)
            pos_cam = 0
        frames = torch.stack([cams[rows, 0, anchor], cams[rows, pos_cam, positive], cams[rows, 0, negative]], 1)
        # one crop per clip and camera: anchor and negative share camera 1's
        a_n = prepare_clips(frames[:, [0, 2]], self.image_size, self.crop_scale, self.flip_p, generator)
        p = prepare_clips(frames[:, [1]], self.image_size, self.crop_scale, self.flip_p, generator)
        norm = lambda x: normalize_input(x)  # noqa: E731
        return {"anchor": norm(a_n[:, 0]), "positive": norm(p[:, 0]), "negative": norm(a_n[:, 1])}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding. Shape: (N, C, S, S) → (N, embed_dim)."""
        return F.normalize(self.projection(self.backbone(x)).float(), dim=1)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: anchor, positive, negative (B, C, S, S) → {"loss": scalar, "triplet_accuracy"}."""
        b = views["anchor"].shape[0]
        e = self.embed(torch.cat([views["anchor"], views["positive"], views["negative"]]))  # (3B, E)
        a, p, n = e[:b], e[b:2 * b], e[2 * b:]
        d_ap, d_an = (a - p).pow(2).sum(1), (a - n).pow(2).sum(1)
        loss = F.relu(d_ap - d_an + self.margin).mean()
        return {"loss": loss, "triplet_accuracy": (d_ap < d_an).float().mean().detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, negative_gap={self.gap}"
