"""Relative patch position: classify where a neighbouring patch sits relative to the centre one."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.heads import ClassifierHead
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint
from ssl_models.tiles import patch_grid, resize_tiles, resolve_grid, tile_input_size


class RelativePosition(Objective):
    """Context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation Learning
    by Context Prediction").

    A 3×3 grid of tiles is cut from each image with a ``gap`` between tiles and a random ``jitter``
    of each tile (so that lines and textures cannot simply be continued across the border); the
    centre tile and one of its 8 neighbours, label y ∈ {0 … 7} (row-major: top-left, top,
    top-right, left, right, bottom-left, bottom, bottom-right), go through the same backbone f,
    and a classifier h on the concatenated features predicts y:

        L = −log softmax(h([f(centre); f(neighbour)]))_y,   averaged over the batch.

    Tiles are resized to :func:`~ssl_models.tiles.tile_input_size` (at least 16 px, or a ViT's
    image size) so that every backbone accepts them. The paper's defence against chromatic
    aberration (colour dropping/projection) is not implemented.

    Args:
        backbone: any backbone with ``feature_dim``.
        image_size: side of the square image the grid is cut from.
        patch, gap, jitter: tile side, gap and jitter in pixels; by default from
            :func:`~ssl_models.tiles.grid_geometry` (28 px → 7, 2, 1).
        tile_size: side the tiles are resized to before the backbone (default: see above).
        head_hidden_dim: hidden width of the classifier on the concatenated pair (the paper's fc7).
        flip_p: probability of a horizontal flip of the whole image (before cutting; labels
            follow the flipped image, which is what the network sees).

    Logged: ``accuracy`` over the 8 positions.
    """

    name = "relative_position"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, patch: int | None = None, gap: int | None = None,
                 jitter: int | None = None, tile_size: int | None = None, head_hidden_dim: int = 256,
                 flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        self.patch, self.gap, self.jitter = resolve_grid(self.image_size, patch, gap, jitter)
        self.tile_size = int(tile_size if tile_size is not None else tile_input_size(backbone, self.patch))
        self.flip_p = float(flip_p)
        self.head = ClassifierHead(2 * backbone.feature_dim, 8, hidden_dim=head_hidden_dim)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"center", "neighbor": (B, C, t, t) normalised, "labels": (B,)}."""
        x = prepare_images(images, self.image_size, (1.0, 1.0), self.flip_p, generator)
        tiles = patch_grid(x, 3, self.patch, self.gap, self.jitter, generator)   # (B, 9, C, p, p)
        B = x.shape[0]
        labels = randint(0, 8, (B,), generator, x.device)                        # (B,) in 0 … 7
        which = labels + (labels >= 4).long()                                    # grid index, skipping the centre 4
        rows = torch.arange(B, device=x.device)
        pair = torch.stack([tiles[:, 4], tiles[rows, which]], dim=1)             # (B, 2, C, p, p)
        pair = normalize_input(resize_tiles(pair, self.tile_size).flatten(0, 1)) # (2B, C, t, t)
        pair = pair.view(B, 2, *pair.shape[1:])                                  # (B, 2, C, t, t)
        return {"center": pair[:, 0], "neighbor": pair[:, 1], "labels": labels}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["center"], views["neighbor"] (B, C, t, t), views["labels"] (B,) in 0 … 7."""
        B = views["labels"].shape[0]
        feats = self.backbone(torch.cat([views["center"], views["neighbor"]], dim=0))  # (2B, D)
        pair = torch.cat([feats[:B], feats[B:]], dim=1)                                 # (B, 2D)
        logits = self.head(pair)                                                         # (B, 8)
        loss = F.cross_entropy(logits, views["labels"])
        accuracy = (logits.argmax(dim=1) == views["labels"]).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
