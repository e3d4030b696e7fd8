"""Rotation prediction: classify which of four rotations was applied."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.heads import ClassifierHead
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint


class Rotation(Objective):
    """Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning
    by Predicting Image Rotations").

    Each image x is rotated by r · 90°, r ∈ {0, 1, 2, 3}; a classifier h on the backbone feature
    predicts r with cross-entropy:

        L = −(1 / |R|) Σ_{r ∈ R} log softmax(h(f(rot(x, r))))_r,

    averaged over the batch, where R = {0, 1, 2, 3} (all four rotations of every image in the same
    batch, as in the paper, ``all_rotations=True``) or one r drawn per image.

    Args:
        backbone: any backbone with ``feature_dim``; the images must be square.
        image_size: side of the square views.
        all_rotations: four rotated copies per image (batch 4·B) or one random rotation per image.
        head_hidden_dim: 0 for a linear classifier, otherwise one hidden layer of that width.
        crop_scale, flip_p: the light view before rotating.

    Logged: ``accuracy`` of the rotation classifier.
    """

    name = "rotation"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, all_rotations: bool = True, head_hidden_dim: int = 0,
                 crop_scale: tuple[float, float] = (0.5, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        self.all_rotations = bool(all_rotations)
        self.head = ClassifierHead(backbone.feature_dim, 4, hidden_dim=head_hidden_dim)
        self.crop_scale = tuple(crop_scale)
        self.flip_p = float(flip_p)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"images": (B', C, S, S) normalised, "labels": (B',)},
        B' = 4·B with ``all_rotations``, else B."""
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        B = x.shape[0]
        rotated = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], dim=1)  # (B, 4, C, S, S)
        if self.all_rotations:
            labels = torch.arange(4, device=x.device).repeat(B)                              # (4B,) 0,1,2,3,0,…
            x = rotated.flatten(0, 1)                                                        # (4B, C, S, S)
        else:
            labels = randint(0, 4, (B,), generator, x.device)                                # (B,)
            x = rotated[torch.arange(B, device=x.device), labels]                            # (B, C, S, S)
        return {"images": normalize_input(x), "labels": labels}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["images"] (B', C, S, S), views["labels"] (B',) in {0, 1, 2, 3}."""
        logits = self.head(self.backbone(views["images"]))    # (B', 4)
        loss = F.cross_entropy(logits, views["labels"])
        accuracy = (logits.argmax(dim=1) == views["labels"]).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
