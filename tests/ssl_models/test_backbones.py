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


@pytest.mark.parametrize("depth", [18, 50])
def test_own_resnet_is_torchvisions_layout_and_init(depth):
    """ssl_models.resnet replaces torchvision's (whose import costs 2.5 s per process): the same
    state_dict keys and shapes, the same output from the same weights, the same init statistics."""
    import torchvision

    from ssl_models.resnet import BasicBlock, Bottleneck, ResNet

    ours = ResNet(BasicBlock if depth == 18 else Bottleneck, [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]).eval()
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None, zero_init_residual=True).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    for k in a:  # init: zeroed residual BNs in the same places, conv weights at the same scale
        if a[k].dtype.is_floating_point and a[k].numel() > 1000:
            assert abs(a[k].std().item() - b[k].std().item()) < 0.1 * b[k].std().item() + 1e-6, k
        elif k.endswith(("bn2.weight", "bn3.weight")):
            assert torch.equal(a[k] == 0, b[k] == 0), k
    ours.load_state_dict(b)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.slow  # starts a separate Python process
def test_building_a_backbone_does_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys; from ssl_models import backbones, objectives; "
            "backbones.build('resnet18', in_channels=1, small_stem=True, width=8); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
