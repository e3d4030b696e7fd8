"""The one interface every objective shares (the training loop, the tests and users call it).

::

    objective = SomeObjective(backbone, image_size=28, **params)
    views = objective.make_views(images, generator=g)   # uint8 (B, C, H, W) → dict of float tensors
    out = objective(views)                               # {"loss": scalar, ...figures to log}
    out["loss"].backward(); optimizer.step()
    objective.after_step()                               # momentum / queue / prototype updates

An objective is one self-contained ``nn.Module``: it owns its heads, momentum encoders, queues and
prototypes (all in its ``state_dict``, so one checkpoint restores the whole method) and exposes
the backbone it trains as ``objective.backbone``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Objective(nn.Module):
    """Base class: stores the backbone, image geometry and training progress.

    Subclasses implement :meth:`make_views` and :meth:`forward`; they override
    :meth:`after_step` where state changes after the optimizer step. ``contrastive`` tells the
    report which family the method belongs to.
    """

    name: str = "objective"
    contrastive: bool = True
    # what make_views takes: "image" — uint8 (B, C, H, W); "clip" — uint8 (B, T, C, H, W), frames of a
    # video at the rate chosen at ingest (the backbone still sees frames: (B·T', C, S, S))
    modality: str = "image"
    # a clip objective that uses a second camera where the run has one: make_views then gets
    # (B, 2, T, C, H, W), the main clip and the first other view
    takes_views: bool = False

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: int | None = None):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.backbone = backbone
        self.image_size = int(image_size)
        self.in_channels = int(in_channels if in_channels is not None else getattr(backbone, "in_channels", 3))
        # Fraction of training done, in [0, 1]; set by the loop before each step, used by schedules
        # (BYOL's momentum, SwAV's prototype freezing). A buffer so checkpoints carry it.
        self.register_buffer("progress", torch.zeros(()), persistent=True)
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)

    @classmethod
    def backbone_channels(cls, image_channels: int) -> int:
        """Input channels the backbone needs for images with ``image_channels`` channels
        (the same, except for objectives that feed it a transform of the image, e.g. colorization's L)."""
        return image_channels

    def set_progress(self, step: int, total_steps: int) -> None:
        """Tell the objective where training stands (called before each step)."""
        self.step.fill_(int(step))
        self.progress.fill_(float(step) / max(1, int(total_steps)))

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Turn a uint8 batch into the views this objective needs.

        Shape: images (B, C, H, W) uint8 on any device; the views are on the same device.
        """
        raise NotImplementedError

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Return ``{"loss": scalar tensor, ...}``; extra entries are floats or 0-d tensors to log."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented backbone input for feature extraction (kNN monitor, probes, fine-tuning).

        uint8 → float in [0, 1], resized to ``image_size`` if needed, normalised with the same
        mean/std as the training views (``self.view_config`` where the objective has one, else the
        views' default 0.5/0.5), so evaluation sees inputs on the scale the backbone learned on.

        Shape: images (B, C, H, W) uint8 → (B, C, image_size, image_size) float32.
        """
        from ssl_models.augment import normalize, resize, to_float

        x = resize(to_float(images), self.image_size)
        cfg = getattr(self, "view_config", None)
        mean, std = (cfg.mean, cfg.std) if cfg is not None else ((0.5,), (0.5,))
        return normalize(x, mean, std)

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum, queue and prototype updates after the optimizer step; no-op by default."""
        return None

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, in_channels={self.in_channels}"


class AudioObjective(Objective):
    """Base class of the objectives that learn from sound (modality ``"audio"``).

    ``make_views`` takes the run's utterances, float (B, 1, L) in [-1, 1] at the rate chosen at ingest
    (16 kHz by default; ``ssl_models.audio``), and the backbone is an ``ssl_models.audio_encoder``
    ``AudioEncoder`` (``local``: frames, ``context``: across frames, ``forward``: the utterance vector).
    ``image_size`` is kept for the shared interface and not used.
    """

    modality = "audio"

    @classmethod
    def backbone_channels(cls, image_channels: int) -> int:
        """Audio backbones take mono utterances, whatever else the run holds."""
        return 1

    def __init__(self, backbone: nn.Module, image_size: int = 28, in_channels: int | None = None):
        super().__init__(backbone, image_size, in_channels=1)
        for need in ("local", "context"):
            if not hasattr(backbone, need):
                raise ValueError(f"{type(self).__name__} needs an audio backbone (audio_conv, audio_cpc, "
                                 f"audio_transformer, audio_apc); {getattr(backbone, 'name', type(backbone).__name__)} "
                                 f"has no {need}()")

    def require_causal_context(self, backbone: nn.Module, builder: str) -> None:
        """Refuse a backbone whose context is not a unidirectional GRU: a predictive-coding objective
        whose context sees the frames it predicts solves its task by looking ahead."""
        if getattr(backbone, "context_kind", None) != "gru":
            raise ValueError(f"{self.name} needs a causal context, a unidirectional GRU (the {builder} backbone); "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has context "
                             f"{getattr(backbone, 'context_kind', None)!r} (a transformer would see the frames it "
                             f"predicts)")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented backbone input: (B, 1, L) → float32 (B, L)."""
        from ssl_models.audio import waveforms

        return waveforms(images)

    def extra_repr(self) -> str:
        return "audio"
