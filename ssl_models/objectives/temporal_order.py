"""Temporal order: Shuffle & Learn (in order or not?) and the order prediction network (which order?)."""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_clips
from ssl_models.heads import ClassifierHead
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint, uniform


def _frames_at(clips: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather per-clip frame indices. Shape: clips (B, T, C, H, W), idx (B, K) → (B, K, C, H, W)."""
    return clips[torch.arange(clips.shape[0], device=clips.device)[:, None], idx]


def _sorted_indices(b: int, t: int, k: int, generator, device) -> torch.Tensor:
    """``k`` distinct frame indices per clip, increasing, drawn uniformly. Shape: (B, k)."""
    scores = uniform((b, t), 0.0, 1.0, generator, device)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


class ShuffleAndLearn(Objective):
    """Shuffle & Learn (Misra, Zitnick & Hebert 2016, "Shuffle and Learn: Unsupervised Learning using
    Temporal Order Verification").

    Five frames a < b < c < d < e are drawn from a clip. A positive tuple is (b, c, d), in order; a
    negative keeps b and d and puts a frame from outside them in the middle: (b, a, d) or (b, e, d).
    Each frame goes through the shared backbone f; the three features are concatenated and a
    classifier h says whether the tuple is in order (y = 1):

        L = −(1/B) Σ_b log softmax(h([f(x_b1); f(x_b2); f(x_b3)]))_{y_b}

    The paper samples from high-motion windows (by optical flow) and uses AlexNet fc7 features;
    here the frames come from anywhere in the clip, the features from the image backbone.

    Args:
        backbone: an image backbone with ``feature_dim``; clips of at least 5 frames.
        image_size: side of the square frames it sees.
        positive_fraction: share of tuples in order (the paper: 25 % positives).
        head_hidden_dim: 0 for a linear classifier on the 3·D features, else one hidden layer.
        crop_scale, flip_p: one crop and one flip per clip, for all its frames.

    Shapes: clips (B, T, C, H, W) uint8 → views {"frames": (B, 3, C, S, S), "labels": (B,)};
    the backbone sees (3·B, C, S, S). Logged: ``accuracy``.
    """

    name = "shuffle_and_learn"
    contrastive = False
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, positive_fraction: float = 0.5,
                 head_hidden_dim: int = 512, crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        if not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"shuffle_and_learn: positive_fraction must be in (0, 1), got {positive_fraction}")
        self.positive_fraction = float(positive_fraction)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        self.head = ClassifierHead(3 * backbone.feature_dim, 2, hidden_dim=head_hidden_dim)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, C, H, W) uint8 → {"frames": (B, 3, C, S, S) normalised, "labels": (B,)}
        (label 1: in order)."""
        b, t = images.shape[:2]
        if t < 5:
            raise ValueError(f"shuffle_and_learn needs clips of at least 5 frames, got {t}; re-ingest with a "
                             f"larger --clip-frames")
        i = _sorted_indices(b, t, 5, generator, images.device)                          # (B, 5): a < b < c < d < e
        positive = uniform((b,), 0.0, 1.0, generator, images.device) < self.positive_fraction
        outside = torch.where(uniform((b,), 0.0, 1.0, generator, images.device) < 0.5, i[:, 0], i[:, 4])
        middle = torch.where(positive, i[:, 2], outside)
        idx = torch.stack([i[:, 1], middle, i[:, 3]], dim=1)                               # (B, 3)
        x = prepare_clips(_frames_at(images, idx), self.image_size, self.crop_scale, self.flip_p, generator)
        return {"frames": normalize_input(x.flatten(0, 1)).view_as(x), "labels": positive.long()}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: frames (B, 3, C, S, S), labels (B,) → {"loss": scalar, "accuracy"}."""
        x, labels = views["frames"], views["labels"]
        b = x.shape[0]
        logits = self.head(self.backbone(x.flatten(0, 1)).view(b, -1))                    # (B, 2)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().detach()}


def order_classes(n: int = 4) -> torch.Tensor:
    """The n!/2 orders OPN tells apart: each permutation of n frames and its reverse are one class
    (they look alike without the arrow of time), represented by the one whose first index is lower
    than its last. Shape: (n!/2, n)."""
    return torch.tensor([p for p in itertools.permutations(range(n)) if p[0] < p[-1]])


class TemporalOrder(Objective):
    """Order prediction network, OPN (Lee, Huang, Singh & Yang 2017, "Unsupervised Representation
    Learning by Sorting Sequences").

    Four frames in time order are drawn from a clip and shown in one of the 4!/2 = 12 orders
    (:func:`order_classes`; an order and its reverse are one class), each order possibly reversed.
    Each frame goes through the shared backbone f; every pair (i < j) of the shown frames' features
    goes through a shared pairwise layer g; the 6 pair features are concatenated and a classifier h
    predicts the order class c:

        L = −(1/B) Σ_b log softmax(h([g(f_1, f_2); g(f_1, f_3); …; g(f_3, f_4)]))_{c_b}

    The paper adds motion-aware sampling and channel splitting (one colour channel per frame);
    neither is here.

    Args:
        backbone: an image backbone with ``feature_dim``; clips of at least 4 frames.
        image_size: side of the square frames it sees.
        pair_dim: width of g's output (the paper: 512).
        crop_scale, flip_p: one crop and one flip per clip, for all its frames.

    Shapes: clips (B, T, C, H, W) uint8 → views {"frames": (B, 4, C, S, S), "labels": (B,) in [0, 12)};
    the backbone sees (4·B, C, S, S). Logged: ``accuracy``.
    """

    name = "temporal_order"
    contrastive = False
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, pair_dim: int = 512,
                 crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        self.register_buffer("orders", order_classes(4), persistent=False)                 # (12, 4)
        self.pair = nn.Sequential(nn.Linear(2 * backbone.feature_dim, pair_dim), nn.ReLU(inplace=True))
        self.head = ClassifierHead(6 * pair_dim, len(self.orders))
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, C, H, W) uint8 → {"frames": (B, 4, C, S, S) normalised, "labels": (B,)}."""
        b, t = images.shape[:2]
        if t < 4:
            raise ValueError(f"temporal_order needs clips of at least 4 frames, got {t}; re-ingest with a "
                             f"larger --clip-frames")
        idx = _sorted_indices(b, t, 4, generator, images.device)                        # (B, 4) in time order
        labels = randint(0, len(self.orders), (b,), generator, images.device)
        order = self.orders.to(images.device)[labels]                                     # (B, 4)
        reverse = randint(0, 2, (b,), generator, images.device).bool()
        order = torch.where(reverse[:, None], order.flip(1), order)
        x = prepare_clips(_frames_at(images, idx.gather(1, order)), self.image_size, self.crop_scale, self.flip_p,
                          generator)
        return {"frames": normalize_input(x.flatten(0, 1)).view_as(x), "labels": labels}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: frames (B, 4, C, S, S), labels (B,) → {"loss": scalar, "accuracy"}."""
        x, labels = views["frames"], views["labels"]
        b = x.shape[0]
        f = self.backbone(x.flatten(0, 1)).view(b, 4, -1)                                # (B, 4, D)
        pairs = [self.pair(torch.cat([f[:, i], f[:, j]], dim=1)) for i, j in itertools.combinations(range(4), 2)]
        logits = self.head(torch.cat(pairs, dim=1))                                       # (B, 12)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().detach()}
