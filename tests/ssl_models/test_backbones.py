"""Backbones' feature maps: what the frozen-feature evaluation pools (frozen_grid, frozen_stages)."""
import pytest
import torch

from ssl_models import backbones
from ssl_models.vit import VisionTransformer


@pytest.mark.parametrize("name,kwargs,size", [
    ("resnet18", dict(small_stem=True, width=8), 32),
    ("resnet18", dict(width=16), 64),
    ("small_cnn", dict(width=8), 32),
])
def test_last_feature_map_pools_to_the_backbone_output(name, kwargs, size):
    torch.manual_seed(0)
    net = backbones.build(name, in_channels=1, **kwargs).eval()
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        maps = net.feature_maps(x)
        out = net(x)
    assert len(maps) == 2 and all(m.shape[0] == 3 for m in maps)
    assert maps[-1].shape[1] == net.feature_dim
    if name.startswith("resnet"):
        assert maps[0].shape[-1] == 2 * maps[1].shape[-1]      # layer3's grid is twice as fine as layer4's
    torch.testing.assert_close(maps[-1].mean((2, 3)), out)     # global pool of the last map = forward


def test_vit_feature_maps_are_patch_grids_of_the_last_two_blocks():
    net = VisionTransformer(in_channels=1, image_size=16, patch_size=4, dim=32, depth=3, heads=2).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        maps = net.feature_maps(x)
        tokens = net.forward_features(x)                       # (B, 1 + 16, dim)
    assert [tuple(m.shape) for m in maps] == [(2, net.feature_dim, 4, 4)] * 2
    # the last map is the final block's patch tokens, row-major on the patch grid
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), tokens[:, 1:])
    assert not torch.allclose(maps[0], maps[1])
