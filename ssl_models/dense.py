"""Dense maps of an image backbone for the objectives that learn correspondences between frames
(cycle consistency, colorization tracking): the first of ``backbone.feature_maps`` and its shape."""
from __future__ import annotations

import torch
from torch import nn


def dense_map(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first of ``backbone.feature_maps(x)`` (a ResNet's layer3: H/4 with the small stem), and a
    zero that depends on the later maps. Add the zero to the loss: the later stages (layer4) then
    take part in it with zero gradients, as DistributedDataParallel without
    ``find_unused_parameters`` requires of every parameter.

    Shape: x (B, C, S, S) → (B, D, h, w) and a scalar 0.
    """
    maps = backbone.feature_maps(x)
    zero = sum((m.float().mean() for m in maps[1:]), torch.zeros((), device=x.device)) * 0.0
    return maps[0], zero


@torch.no_grad()
def dense_shape(backbone: nn.Module, in_channels: int, image_size: int) -> tuple[int, int]:
    """Channels D and side h of ``backbone.feature_maps(x)[0]`` for (image_size)² inputs: one dummy
    frame, in eval mode so that no batch-norm statistic moves (on torch's meta device too).

    Returns (D, h).
    """
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        x = torch.zeros(1, in_channels, image_size, image_size, device=param.device, dtype=param.dtype)
        dense = backbone.feature_maps(x)[0]                                              # (1, D, h, w)
    finally:
        backbone.train(was_training)
    return int(dense.shape[1]), int(dense.shape[-1])
