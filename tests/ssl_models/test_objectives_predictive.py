"""The predictive objectives: autoencoder, denoising autoencoder, MAE, rotation, relative position,
jigsaw, colorization.

Every objective: a forward/backward gives a finite loss and gradients on the backbone, a few dozen
steps on a fixed tiny batch lower the loss, and its state round-trips through the state_dict.
Then each one's own contract (views, labels, what the loss counts). Everything is tiny (small_cnn
of width 8, a 2-block ViT of width 32, 8 images of 28 px) so the file runs in seconds on a CPU.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from ssl_models import backbones
from ssl_models.augment import normalize_input
from ssl_models.objectives.autoencoder import Autoencoder
from ssl_models.objectives.colorization import Colorization
from ssl_models.objectives.denoising_autoencoder import DenoisingAutoencoder
from ssl_models.objectives.jigsaw import Jigsaw
from ssl_models.objectives.mae import MAE, masked_patch_loss, unpatchify
from ssl_models.objectives.relative_position import RelativePosition
from ssl_models.objectives.rotation import Rotation
from ssl_models.vit import VisionTransformer

torch.set_num_threads(1)
SIZE = 28


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(channels, b=8, seed=0):
    return torch.randint(0, 256, (b, channels, SIZE, SIZE), dtype=torch.uint8, generator=_gen(seed))


def _cnn(channels):
    return backbones.build("small_cnn", in_channels=channels, width=8)


def _vit(channels):
    return VisionTransformer(in_channels=channels, image_size=SIZE, patch_size=4, dim=32, depth=2, heads=2)


# name → (factory(seed) → objective, image channels); only the backbone and a narrow decoder
# are chosen here, every other argument is the objective's default.
CASES = {
    "autoencoder": (lambda: Autoencoder(backbone=_cnn(1), image_size=SIZE, decoder_width=8), 1),
    "denoising_autoencoder": (lambda: DenoisingAutoencoder(backbone=_cnn(1), image_size=SIZE, decoder_width=8), 1),
    "mae": (lambda: MAE(backbone=_vit(1), image_size=SIZE, decoder_dim=32, decoder_heads=2), 1),
    "rotation": (lambda: Rotation(backbone=_cnn(1), image_size=SIZE), 1),
    "relative_position": (lambda: RelativePosition(backbone=_cnn(3), image_size=SIZE), 3),
    "jigsaw": (lambda: Jigsaw(backbone=_cnn(1), image_size=SIZE), 1),
    "colorization": (lambda: Colorization(backbone=_cnn(1), image_size=SIZE, decoder_width=8), 3),
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    factory, channels = CASES[name]
    return factory(), channels


def test_registry_holds_the_predictive_objectives_with_defaults():
    from ssl_models.objectives import OBJECTIVES, build

    for name in CASES:
        cls = OBJECTIVES[name]
        assert cls.name == name and cls.contrastive is False
        assert "Shape:" in cls.make_views.__doc__ and "Shape:" in cls.forward.__doc__
        assert re.search(r"\b(19|20)\d\d\b", cls.__doc__)              # the paper, with its year
        torch.manual_seed(0)
        channels = 1 if name in ("colorization", "mae") else 3
        backbone = _vit(channels) if name == "mae" else _cnn(channels)
        obj = build(name, backbone=backbone, image_size=SIZE)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=_gen())  # resized to 28
        if name == "mae":
            images = images[:, :1]
        assert torch.isfinite(obj(obj.make_views(images))["loss"])


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_finite_loss_and_backbone_gradients(name):
    obj, channels = _build(name)
    assert obj.name == name and obj.contrastive is False
    out = obj(obj.make_views(_images(channels), generator=_gen()))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    obj.after_step()


@pytest.mark.parametrize("name", list(CASES))
def test_a_few_dozen_steps_lower_the_loss_on_a_fixed_batch(name):
    obj, channels = _build(name)
    views = obj.make_views(_images(channels), generator=_gen())
    opt = torch.optim.Adam(obj.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        obj.set_progress(step, 30)
        loss = obj(views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.95 * losses[0], losses


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_restores_the_whole_method(name):
    a, channels = _build(name, seed=0)
    b, _ = _build(name, seed=1)
    views = a.make_views(_images(channels), generator=_gen())
    a(views)                                      # colorization: the histogram moves in training
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(views)["loss"], b(views)["loss"])


def test_views_are_reproducible_under_a_seed():
    for name in CASES:
        obj, channels = _build(name)
        v1 = obj.make_views(_images(channels), generator=_gen(5))
        v2 = obj.make_views(_images(channels), generator=_gen(5))
        assert v1.keys() == v2.keys() and all(torch.equal(v1[k], v2[k]) for k in v1), name


# --------------------------------------------------------------------------- autoencoders

def test_denoising_view_is_corrupted_and_target_is_clean():
    images = _images(1)
    for noise in ("masking", "gaussian"):
        torch.manual_seed(0)
        dae = DenoisingAutoencoder(backbone=_cnn(1), image_size=SIZE, noise=noise, decoder_width=8, flip_p=0.0)
        views = dae.make_views(images, generator=_gen())
        clean = images.float() / 255
        assert torch.equal(views["clean"], clean)
        assert not torch.equal(views["corrupted"], clean)
        if noise == "masking":     # 25% of the pixels set to 0, the rest untouched
            changed = views["corrupted"] != clean
            assert (views["corrupted"][changed] == 0).all()
            zeroed = (views["corrupted"] == 0).flatten(1).sum(1)
            assert (zeroed >= round(0.25 * SIZE * SIZE)).all()
        out = dae(views)
        expected = F.mse_loss(dae.decoder(dae.backbone(normalize_input(views["corrupted"]))), clean)
        assert torch.allclose(out["loss"], expected)


def test_autoencoder_target_is_its_input():
    torch.manual_seed(0)
    ae = Autoencoder(backbone=_cnn(1), image_size=SIZE, decoder_width=8, flip_p=0.0)
    views = ae.make_views(_images(1), generator=_gen())
    expected = F.mse_loss(ae.decoder(ae.backbone(normalize_input(views["images"]))), views["images"])
    assert torch.allclose(ae(views)["loss"], expected)


def test_denoising_rejects_bad_noise():
    with pytest.raises(ValueError, match="masking.*gaussian"):
        DenoisingAutoencoder(backbone=_cnn(1), image_size=SIZE, noise="salt")


# --------------------------------------------------------------------------- MAE

def test_mae_loss_counts_masked_patches_only():
    mae, _ = _build("mae")
    views = mae.make_views(_images(1), generator=_gen())
    _, mask = mae.reconstruct(views)
    assert (mask.sum(dim=1) == 49 - 12).all()                     # 75% of 49 patches masked
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, 16), 4, 1).bool()   # (B, 1, 28, 28)
    base = mae(views)["loss"]
    other = torch.rand(views["images"].shape, generator=_gen(9))
    visible_changed = dict(views, target=torch.where(pixel_mask, views["images"], other))
    masked_changed = dict(views, target=torch.where(pixel_mask, other, views["images"]))
    assert torch.allclose(mae(visible_changed)["loss"], base)
    assert not torch.allclose(mae(masked_changed)["loss"], base)


def test_masked_patch_loss_against_a_loop():
    pred, target = torch.randn(2, 5, 6, generator=_gen()), torch.randn(2, 5, 6, generator=_gen(1))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(5):
            if mask[b, i]:
                total += sum((pred[b, i, d] - target[b, i, d]).item() ** 2 for d in range(6)) / 6
                count += 1
    assert masked_patch_loss(pred, target, mask).item() == pytest.approx(total / count, rel=1e-5)
    t = target[0, 0]
    normed = (t - t.mean()) / (t.var() + 1e-6).sqrt()
    one = torch.tensor([[1.0, 0, 0, 0, 0]])
    assert masked_patch_loss(pred[:1], target[:1], one, norm_pix_loss=True).item() == pytest.approx(
        ((pred[0, 0] - normed) ** 2).mean().item(), rel=1e-5)


def test_mae_norm_pix_loss_and_backbone_checks():
    torch.manual_seed(0)
    mae = MAE(backbone=_vit(3), image_size=SIZE, norm_pix_loss=True, decoder_dim=32, decoder_heads=2)
    assert torch.isfinite(mae(mae.make_views(_images(3), generator=_gen()))["loss"])
    with pytest.raises(ValueError, match="VisionTransformer.*small_cnn"):
        MAE(backbone=_cnn(1), image_size=SIZE)
    with pytest.raises(ValueError, match="image_size"):
        MAE(backbone=_vit(1), image_size=32)


# --------------------------------------------------------------------------- rotation

def test_rotation_views_hold_all_four_rotations():
    rot, _ = _build("rotation")
    rot.flip_p, rot.crop_scale = 0.0, (1.0, 1.0)
    images = _images(1, b=3)
    views = rot.make_views(images, generator=_gen())
    x = normalize_input(images.float() / 255)
    assert views["labels"].tolist() == [0, 1, 2, 3] * 3
    for i in range(3):
        for k in range(4):
            assert torch.allclose(views["images"][4 * i + k], torch.rot90(x[i], k, dims=(1, 2)))
    one = Rotation(backbone=_cnn(1), image_size=SIZE, all_rotations=False, flip_p=0.0, crop_scale=(1.0, 1.0))
    v = one.make_views(images, generator=_gen())
    assert v["images"].shape[0] == 3
    for i in range(3):
        assert torch.allclose(v["images"][i], torch.rot90(x[i], int(v["labels"][i]), dims=(1, 2)))
    assert "accuracy" in rot(views)


# --------------------------------------------------------------------------- patch tasks

def _coordinate_images(b=4):
    """3-channel images whose pixel (r, c) holds r·9 in red and c·9 in green: a tile's top-left
    pixel tells where it was cut."""
    r = torch.arange(SIZE).view(SIZE, 1).expand(SIZE, SIZE) * 9
    c = torch.arange(SIZE).view(1, SIZE).expand(SIZE, SIZE) * 9
    img = torch.stack([r, c, torch.zeros_like(r)]).to(torch.uint8)
    return img[None].repeat(b, 1, 1, 1)


def _corner(tile_normalised):
    """(row, col) of a tile's top-left pixel, from the coordinate images. Shape: (C, p, p) → (2,)."""
    px = (tile_normalised[:2, 0, 0] * 0.5 + 0.5) * 255 / 9
    return px.round().long()


def test_relative_position_labels_match_where_the_neighbour_is():
    torch.manual_seed(0)
    rp = RelativePosition(backbone=_cnn(3), image_size=SIZE, patch=7, gap=2, jitter=0, tile_size=7, flip_p=0.0)
    views = rp.make_views(_coordinate_images(8), generator=_gen(4))
    assert views["center"].shape == (8, 3, 7, 7)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    for i in range(8):
        d = _corner(views["neighbor"][i]) - _corner(views["center"][i])
        assert tuple(d.tolist()) == tuple(9 * o for o in offsets[int(views["labels"][i])])
    default = RelativePosition(backbone=_cnn(1), image_size=SIZE)
    assert default.tile_size == 16 and default.make_views(_images(1))["center"].shape == (8, 1, 16, 16)


def test_jigsaw_tiles_follow_the_labelled_permutation():
    torch.manual_seed(0)
    jig = Jigsaw(backbone=_cnn(3), image_size=SIZE, patch=7, gap=2, jitter=0, tile_size=7, tile_norm=False,
                 flip_p=0.0)
    assert jig.permutations.shape == (100, 9) and "permutations" in jig.state_dict()
    views = jig.make_views(_coordinate_images(4), generator=_gen(2))
    assert views["tiles"].shape == (4, 9, 3, 7, 7)
    for i in range(4):
        corners = torch.stack([_corner(t) for t in views["tiles"][i]])        # (9, 2)
        origin = corners.min(dim=0).values
        grid_index = ((corners - origin) // 9) @ torch.tensor([3, 1])         # row-major position in the grid
        assert grid_index.tolist() == jig.permutations[views["labels"][i]].tolist()


def test_jigsaw_tile_normalisation_and_permutation_set_size():
    torch.manual_seed(0)
    jig = Jigsaw(backbone=_cnn(1), image_size=SIZE, n_perms=10)
    tiles = jig.make_views(_images(1), generator=_gen())["tiles"]
    assert torch.allclose(tiles.mean(dim=(2, 3, 4)), torch.zeros(8, 9), atol=1e-4)
    assert jig.head[-1].out_features == 10


# --------------------------------------------------------------------------- colorization

def test_colorization_refuses_grayscale_images_and_rgb_backbones():
    col, _ = _build("colorization")
    with pytest.raises(ValueError, match="colorization needs colour images"):
        col.make_views(_images(1))
    with pytest.raises(ValueError, match="in_channels=1"):
        Colorization(backbone=_cnn(3), image_size=SIZE)


def test_colorization_views_histogram_and_regression_mode():
    col, _ = _build("colorization")
    views = col.make_views(_images(3), generator=_gen())
    assert views["L"].shape == (8, 1, SIZE, SIZE) and views["ab"].shape == (8, 2, SIZE, SIZE)
    assert views["L"].min() >= -1 and views["L"].max() <= 1
    col(views)
    assert col.ab_counts.sum().item() == 8 * SIZE * SIZE
    col.eval()
    col(views)                                   # evaluation does not count
    assert col.ab_counts.sum().item() == 8 * SIZE * SIZE
    torch.manual_seed(0)
    reg = Colorization(backbone=_cnn(1), image_size=SIZE, mode="regression", decoder_width=8)
    out = reg(views)
    assert reg.decoder(reg.backbone(views["L"])).shape == (8, 2, SIZE, SIZE) and "ab_rmse" in out
    hard = Colorization(backbone=_cnn(1), image_size=SIZE, soft_targets=False, rebalance=False, decoder_width=8)
    assert torch.isfinite(hard(views)["loss"])
