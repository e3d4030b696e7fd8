"""ssl_models.vit: shapes, backbone attributes, MAE masking, argument checks."""
import pytest
import torch

from ssl_models import backbones
from ssl_models.vit import VisionTransformer, sincos_pos_embed_2d

torch.set_num_threads(1)


def _vit(**kw):
    args = dict(in_channels=1, image_size=28, patch_size=4, dim=32, depth=2, heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def test_shapes_and_backbone_attributes():
    vit = _vit()
    assert (vit.feature_dim, vit.in_channels, vit.patch_size, vit.num_patches) == (32, 1, 4, 49)
    x = torch.rand(3, 1, 28, 28)
    assert vit(x).shape == (3, 32)
    assert vit.forward_features(x).shape == (3, 50, 32)
    # the state dict holds the learned weights, not the fixed position embeddings
    assert "pos_embed" not in vit.state_dict() and "cls_token" in vit.state_dict()


def test_vit_tiny_through_backbones_build():
    vit = backbones.build("vit_tiny", in_channels=3, image_size=32, patch_size=8)
    assert vit.name == "vit_tiny" and vit.feature_dim == 192 and vit.num_patches == 16
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 192)


@pytest.mark.parametrize("ratio,kept", [(0.75, 12), (0.5, 24), (0.0, 49)])
def test_forward_encoder_keeps_the_right_number_of_tokens(ratio, kept):
    vit = _vit()
    x = torch.rand(4, 1, 28, 28)
    latent, mask, ids_restore = vit.forward_encoder(x, ratio, generator=torch.Generator().manual_seed(0))
    assert latent.shape == (4, 1 + kept, 32)
    assert mask.shape == (4, 49) and (mask.sum(dim=1) == 49 - kept).all()
    assert ids_restore.shape == (4, 49)


def test_forward_encoder_sees_only_visible_patches():
    vit = _vit().eval()
    x = torch.rand(2, 1, 28, 28)
    noise = torch.rand(2, 49, generator=torch.Generator().manual_seed(1))
    latent, mask, _ = vit.forward_encoder(x, 0.75, noise=noise)
    pixel_mask = mask.view(2, 7, 7).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].bool()  # (2, 1, 28, 28)
    changed = torch.where(pixel_mask, torch.rand_like(x), x)          # alter masked pixels only
    latent2, mask2, _ = vit.forward_encoder(changed, 0.75, noise=noise)
    assert torch.equal(mask, mask2)
    assert torch.allclose(latent, latent2, atol=1e-6)


def test_sincos_embedding_rows_are_distinct():
    emb = sincos_pos_embed_2d(16, 3, 3)
    assert emb.shape == (10, 16) and emb[0].abs().sum() == 0
    assert torch.unique(emb[1:], dim=0).shape[0] == 9


def test_argument_checks():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        _vit(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="heads"):
        _vit(dim=30, heads=4)
    with pytest.raises(ValueError, match="expects images of shape"):
        _vit()(torch.rand(2, 1, 32, 32))
