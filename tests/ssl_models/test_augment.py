"""ssl_models.augment: shapes, dtype, range, determinism, 1/3 channels, agreement with torchvision."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_models import augment as A
from ssl_models.rng import coin, uniform

torch.set_num_threads(1)


def _images(c, b=8, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, side, side), dtype=torch.uint8, generator=g)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_to_float_range_and_dtype():
    x = A.to_float(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3))
    assert x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([0.0, 128 / 255, 1.0])
    with pytest.raises(ValueError, match="B, C, H, W"):
        A.to_float(torch.zeros(3, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("c", [1, 3])
def test_each_op_keeps_shape_dtype_range(c):
    x = A.to_float(_images(c))
    g = _gen()
    ops = [
        lambda t: A.horizontal_flip(t, 0.5, generator=g),
        lambda t: A.color_jitter(t, 0.4, 0.4, 0.4, 0.1, p=1.0, generator=g),
        lambda t: A.random_grayscale(t, 0.5, generator=g),
        lambda t: A.gaussian_blur(t, 1.0, generator=g),
        lambda t: A.solarize(t, 0.5, generator=g),
    ]
    for op in ops:
        y = op(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.min() >= 0.0 and y.max() <= 1.0 + 1e-6
    y = A.random_resized_crop(x, 12, generator=g)
    assert y.shape == (8, c, 12, 12) and 0.0 <= y.min() and y.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("c", [1, 3])
def test_view_shape_dtype_range(c):
    cfg = A.ViewConfig(size=12, solarize_p=0.5)
    v = A.view(_images(c), cfg, generator=_gen())
    assert v.shape == (8, c, 12, 12) and v.dtype == torch.float32
    assert v.min() >= -1.0 - 1e-6 and v.max() <= 1.0 + 1e-6       # mean 0.5, std 0.5


@pytest.mark.parametrize("c", [1, 3])
def test_determinism_under_a_seed(c):
    images, cfg = _images(c), A.ViewConfig(size=16, solarize_p=0.3)
    a1, a2 = A.two_views(images, cfg, generator=_gen(7))
    b1, b2 = A.two_views(images, cfg, generator=_gen(7))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = A.two_views(images, cfg, generator=_gen(8))
    assert not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)                      # the two views differ


def test_generator_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    A.view(_images(3), A.ViewConfig(size=8), generator=_gen())
    assert torch.equal(torch.rand(3), expected)


def test_probability_zero_is_identity_and_one_always_applies():
    x = A.to_float(_images(3))
    g = _gen()
    assert torch.equal(A.horizontal_flip(x, 0.0, generator=g), x)
    assert torch.equal(A.horizontal_flip(x, 1.0, generator=g), x.flip(-1))
    assert torch.equal(A.color_jitter(x, 0.5, 0.5, 0.5, 0.2, p=0.0, generator=g), x)
    assert torch.equal(A.random_grayscale(x, 0.0, generator=g), x)
    assert torch.allclose(A.gaussian_blur(x, 0.0, generator=g), x)
    assert torch.equal(A.solarize(x, 0.0, generator=g), x)
    gray = A.random_grayscale(x, 1.0, generator=g)
    assert gray.shape == x.shape and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    sol = A.solarize(x, 1.0, threshold=0.5, generator=g)
    assert torch.equal(sol, torch.where(x >= 0.5, 1 - x, x))


def test_color_jitter_is_grayscale_safe():
    x = A.to_float(_images(1))
    # Saturation and hue do not apply to one channel: the result equals brightness+contrast only
    # (same draws from the same seed).
    full = A.color_jitter(x, 0.4, 0.4, 0.9, 0.4, p=1.0, generator=_gen(3))
    bc = A.color_jitter(x, 0.4, 0.4, 0.0, 0.0, p=1.0, generator=_gen(3))
    assert full.shape == x.shape and torch.equal(full, bc)
    assert not torch.equal(full, x)


def _factors(seed, b, ranges):
    """Replay color_jitter's draws: the apply coin, then one U(range) per factor, in order."""
    g = _gen(seed)
    coin(b, 1.0, g)
    return [uniform(b, lo, hi, g) for lo, hi in ranges]


def test_color_jitter_agrees_with_torchvision_per_sample():
    x = A.to_float(_images(3, b=4))
    # Hue only: the 4th draw is the shift; compare with torchvision's HSV hue shift.
    out = A.color_jitter(x, 0, 0, 0, 0.2, p=1.0, generator=_gen(0))
    shift = _factors(0, 4, [(1, 1), (1, 1), (1, 1), (-0.2, 0.2)])[3]
    ref = torch.stack([TF.adjust_hue(xi, float(h)) for xi, h in zip(x, shift)])
    assert torch.allclose(out, ref, atol=1e-5)
    # Saturation only (torchvision's luma uses 0.2989 for red, we use 0.299: 1e-4 apart).
    out = A.color_jitter(x, 0, 0, 0.5, 0, p=1.0, generator=_gen(1))
    sat = _factors(1, 4, [(1, 1), (1, 1), (0.5, 1.5)])[2]
    ref = torch.stack([TF.adjust_saturation(xi, float(f)) for xi, f in zip(x, sat)])
    assert torch.allclose(out, ref, atol=1e-3)
    # Brightness then contrast.
    out = A.color_jitter(x, 0.4, 0.4, 0, 0, p=1.0, generator=_gen(2))
    bf, cf = _factors(2, 4, [(0.6, 1.4), (0.6, 1.4)])
    ref = torch.stack([TF.adjust_contrast(TF.adjust_brightness(xi, float(b)), float(c))
                       for xi, b, c in zip(x, bf, cf)])
    assert torch.allclose(out, ref, atol=1e-3)


def test_gaussian_blur_matches_torchvision_for_fixed_sigma():
    x = A.to_float(_images(3, side=20))
    ours = A.gaussian_blur(x, 1.0, sigma=(1.3, 1.3), kernel_size=5, generator=_gen())
    ref = TF.gaussian_blur(x, [5, 5], [1.3, 1.3])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert A.blur_kernel_size(224, 224) == 23 and A.blur_kernel_size(32, 32) == 3


def test_random_resized_crop_full_box_is_identity():
    x = A.to_float(_images(3))
    y = A.random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen())
    assert torch.allclose(y, x, atol=1e-6)


def test_normalize_broadcasts_and_checks():
    x = torch.full((2, 3, 4, 4), 0.75)
    assert torch.allclose(A.normalize(x, (0.5,), (0.25,)), torch.ones_like(x))
    y = A.normalize(x, (0.25, 0.5, 0.75), (0.5, 0.5, 0.5))
    assert y[:, 0].eq(1.0).all() and y[:, 2].eq(0.0).all()
    with pytest.raises(ValueError, match="1 or 3 entries"):
        A.normalize(x, (0.5, 0.5), (0.5, 0.5))


def test_multi_crop_shapes_and_view_config_checks():
    crops = A.multi_crop(_images(1), A.ViewConfig(size=16), A.ViewConfig(size=8, scale=(0.05, 0.3)),
                         n_global=2, n_local=3, generator=_gen())
    assert [tuple(c.shape) for c in crops] == [(8, 1, 16, 16)] * 2 + [(8, 1, 8, 8)] * 3
    with pytest.raises(ValueError, match="probability"):
        A.ViewConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        A.ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="float batch"):
        A.horizontal_flip(_images(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_views_on_gpu():
    images, cfg = _images(3), A.ViewConfig(size=16)
    cpu = A.view(images, cfg, generator=_gen(5))
    gpu = A.view(images.cuda(), cfg, generator=_gen(5))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_resize_is_a_no_op_at_size_and_antialiased_otherwise():
    x = torch.rand(2, 3, 28, 28)
    assert A.resize(x, 28) is x
    up = A.resize(x, 32)
    assert up.shape == (2, 3, 32, 32)
    assert torch.allclose(A.resize(torch.full((1, 1, 28, 28), 0.3), 16), torch.full((1, 1, 16, 16), 0.3))
    # downsizing averages (antialias): a 1-pixel checkerboard becomes flat grey, not aliased stripes
    checker = (torch.arange(28)[:, None] + torch.arange(28)[None, :]).remainder(2).float()[None, None]
    assert (A.resize(checker, 7) - 0.5).abs().max() < 0.1
