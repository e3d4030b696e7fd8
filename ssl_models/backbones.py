"""Backbones: image (B, C, H, W) float → flat feature vector (B, feature_dim).

Every backbone exposes ``feature_dim``, ``in_channels`` and ``name`` and is built through
:func:`build` from the plain dict :data:`BACKBONES`, so ``backbones.build("resnet18", in_channels=1)``
is the one call the training loop, the evaluation stage and the tests share.

``small_stem=True`` swaps ResNet's ImageNet stem (7×7 conv stride 2 + max-pool, which throws away
3/4 of a 28 px image before the first block) for a 3×3 stride-1 conv with no pooling, as is
usual for CIFAR/Fashion-MNIST-sized inputs (28–64 px). ``width`` scales every stage (64 is
torchvision's ResNet; 32 is a narrow ResNet that trains ~3× faster on CPU).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from ssl_models import audio_encoder
from ssl_models.resnet import BasicBlock, Bottleneck, ResNet


class ResNetBackbone(nn.Module):
    """ResNet (torchvision's layout, ``ssl_models.resnet``) without its classifier; optional
    small-image stem and width."""

    def __init__(self, depth: int = 18, in_channels: int = 3, small_stem: bool = False,
                 width: int = 64, zero_init_residual: bool = True):
        super().__init__()
        if depth not in (18, 34, 50):
            raise ValueError(f"ResNet depth must be 18, 34 or 50, got {depth}")
        if in_channels < 1 or width < 8:
            raise ValueError(f"in_channels must be >= 1 and width >= 8, got {in_channels}, {width}")
        block, layers = {18: (BasicBlock, [2, 2, 2, 2]),
                         34: (BasicBlock, [3, 4, 6, 3]),
                         50: (Bottleneck, [3, 4, 6, 3])}[depth]
        net = ResNet(block, layers, width=width, zero_init_residual=zero_init_residual)
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.name = f"resnet{depth}"
        self.in_channels = in_channels
        self.feature_dim = width * 8 * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (B, C, H, W) float → (B, feature_dim)."""
        return self.net(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last two stages, before pooling (for frozen-feature evaluation).

        Shape: x (B, C, H, W) → [layer3 (B, 4·width·e, H/4, W/4), layer4 (B, feature_dim, H/8, W/8)]
        with the small stem (``e``: the block expansion); the global average of the last one is
        ``forward(x)``.
        """
        n = self.net
        h = n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))
        h3 = n.layer3(h)
        return [h3, n.layer4(h3)]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks with pooling: a backbone for fast CPU runs and tests."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])
        self.features = nn.Sequential(
            *block(in_channels, w, True), *block(w, 2 * w, True),
            *block(2 * w, 4 * w, True), *block(4 * w, 4 * w, False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.name = "small_cnn"
        self.in_channels = in_channels
        self.feature_dim = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (B, C, H, W) float → (B, 4·width)."""
        return self.features(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last two conv blocks, before pooling: [(B, 4w, H/8, W/8)] × 2."""
        h3 = self.features[:12](x)           # blocks 1–3 (conv, BN, ReLU, max-pool each)
        return [h3, self.features[12:15](h3)]  # block 4 (conv, BN, ReLU); then global pool + flatten


# Builders take explicit keywords only (no **kwargs), so a typo in a config's backbone_params
# fails at validation, naming the key, instead of on the workers.
def resnet18(in_channels: int = 3, small_stem: bool = False, width: int = 64,
             zero_init_residual: bool = True) -> ResNetBackbone:
    return ResNetBackbone(18, in_channels, small_stem, width, zero_init_residual)


def resnet50(in_channels: int = 3, small_stem: bool = False, width: int = 64,
             zero_init_residual: bool = True) -> ResNetBackbone:
    return ResNetBackbone(50, in_channels, small_stem, width, zero_init_residual)


def small_cnn(in_channels: int = 3, width: int = 32) -> SmallCNN:
    return SmallCNN(in_channels, width)


def vit_tiny(in_channels: int = 3, image_size: int = 32, patch_size: int = 4, mlp_ratio: float = 4.0) -> nn.Module:
    from ssl_models.vit import VisionTransformer
    return VisionTransformer(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
                             dim=192, depth=12, heads=3, mlp_ratio=mlp_ratio, name="vit_tiny")


def vit_small(in_channels: int = 3, image_size: int = 32, patch_size: int = 4, mlp_ratio: float = 4.0) -> nn.Module:
    from ssl_models.vit import VisionTransformer
    return VisionTransformer(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
                             dim=384, depth=12, heads=6, mlp_ratio=mlp_ratio, name="vit_small")


def igpt_tiny(in_channels: int = 3, seq_size: int = 14, levels: int | None = None, probe_layer: int = 4,
              mlp_ratio: float = 4.0) -> nn.Module:
    """A small image GPT (``ssl_models.gpt``): 8 causal blocks of width 128, features of block 4."""
    from ssl_models.gpt import ImageGPT
    return ImageGPT(in_channels=in_channels, seq_size=seq_size, levels=levels, dim=128, depth=8, heads=4,
                    mlp_ratio=mlp_ratio, probe_layer=probe_layer, name="igpt_tiny")


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "igpt_tiny": igpt_tiny,
    # audio: waveform (B, 1, L) → (B, feature_dim) (ssl_models/audio_encoder.py)
    "audio_conv": audio_encoder.audio_conv,
    "audio_cpc": audio_encoder.audio_cpc,
    "audio_transformer": audio_encoder.audio_transformer,
    "audio_apc": audio_encoder.audio_apc,
}
AUDIO_BACKBONES = ("audio_conv", "audio_cpc", "audio_transformer", "audio_apc")


def build(name: str, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a backbone by name from :data:`BACKBONES`; extra kwargs go to its constructor."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    model = BACKBONES[name](in_channels=in_channels, **kwargs)
    model.build_args = {"name": name, "in_channels": in_channels, **kwargs}
    return model
