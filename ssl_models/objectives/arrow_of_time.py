"""Arrow of time: is this clip played forwards or backwards?"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_clips
from ssl_models.heads import ClassifierHead
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint, uniform


class ArrowOfTime(Objective):
    """Arrow of time (Wei, Lim, Zisserman & Freeman 2018, "Learning and Using the Arrow of Time").

    From a clip, ``frames`` frames are taken at a stride drawn per clip (``k, k + s, …``); with
    probability ½ their order is reversed (r = 1). Each frame goes through the backbone f; the
    frame features are concatenated in the order shown (late temporal fusion, as the paper's
    T-CAM fuses per-frame features) and a classifier h predicts r:

        L = −(1/B) Σ_b log softmax(h([f(x_{b,1}); …; f(x_{b,F})]))_{r_b}

    The paper feeds optical flow into a VGG; here the frames themselves go into the image backbone,
    so that the pretrained network is an image backbone, scored by the image protocols as well.
    Learnable only where motion is irreversible (friction, gravity, decay): a lossless bounce looks
    the same both ways, which is why ``moving-fashion-mnist`` loses energy.

    Args:
        backbone: an image backbone with ``feature_dim``.
        image_size: side of the square frames it sees.
        frames: F, frames per example (the paper: 10 flow frames; 4 here).
        max_stride: the stride s between them is drawn in [1, max_stride] per clip (where the clip
            is long enough).
        head_hidden_dim: 0 for a linear classifier on the F·D features, else one hidden layer.
        crop_scale, flip_p: one crop and one horizontal flip per clip, for all its frames
            (a vertical flip would turn a fall into a rise: never).

    Shapes: clips (B, T, C, H, W) uint8 → views {"frames": (B, F, C, S, S), "labels": (B,)};
    the backbone sees (B·F, C, S, S). Logged: ``accuracy``.
    """

    name = "arrow_of_time"
    contrastive = False
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, frames: int = 4, max_stride: int = 3,
                 head_hidden_dim: int = 512, crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        if frames < 2 or max_stride < 1:
            raise ValueError(f"arrow_of_time: frames must be >= 2 and max_stride >= 1, got {frames}, {max_stride}")
        self.frames, self.max_stride = int(frames), int(max_stride)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        self.head = ClassifierHead(self.frames * backbone.feature_dim, 2, hidden_dim=head_hidden_dim)

    def sample_frames(self, clips: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``frames`` frames of each clip at a random stride and start (the same indices are gathered
        per clip). Shape: (B, T, C, H, W) → (B, F, C, H, W)."""
        b, t = clips.shape[:2]
        if t < self.frames:
            raise ValueError(f"arrow_of_time needs clips of at least {self.frames} frames, got {t}; "
                             f"re-ingest with a larger --clip-frames")
        top = max(1, min(self.max_stride, (t - 1) // (self.frames - 1)))
        stride = randint(1, top + 1, (b,), generator, clips.device)                       # (B,)
        start = (uniform((b,), 0.0, 1.0, generator, clips.device) * (t - (self.frames - 1) * stride)).long()
        idx = start[:, None] + stride[:, None] * torch.arange(self.frames, device=clips.device)  # (B, F)
        return clips[torch.arange(b, device=clips.device)[:, None], idx]

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, C, H, W) uint8 → {"frames": (B, F, C, S, S) normalised, "labels": (B,)}."""
        x = prepare_clips(self.sample_frames(images, generator), self.image_size, self.crop_scale, self.flip_p,
                          generator)
        labels = randint(0, 2, (x.shape[0],), generator, x.device)                        # 1: reversed
        x = torch.where(labels[:, None, None, None, None].bool(), x.flip(1), x)
        return {"frames": normalize_input(x.flatten(0, 1)).view_as(x), "labels": labels}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: frames (B, F, C, S, S), labels (B,) → {"loss": scalar, "accuracy"}."""
        x, labels = views["frames"], views["labels"]
        b, f = x.shape[:2]
        feats = self.backbone(x.flatten(0, 1)).view(b, f * self.backbone.feature_dim)    # (B, F·D)
        logits = self.head(feats)                                                         # (B, 2)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean().detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frames={self.frames}, max_stride={self.max_stride}"
