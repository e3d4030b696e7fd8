"""Batched image augmentations on tensors, on whatever device the batch is on.

Every op takes a float batch ``x`` of shape (B, C, H, W) with values in [0, 1] and returns a new
batch; nothing loops over images in Python and nothing goes through PIL, so a batch of 256 images
is augmented by a handful of tensor ops (on the GPU when the batch is there).

Randomness: each op draws its per-sample parameters on the CPU from the optional
``torch.Generator`` (``ssl_models.rng``: the one convention of every batched op) and then moves
them to the batch's device. The same seed therefore reproduces the same batch exactly, on any
device, whatever else the device's own generator has been used for. Following torchvision's v2
transforms, drawing the parameters (``rng.uniform``, ``rng.coin``) is kept apart from applying them.

The ops (SimCLR's chain, Chen et al. 2020, Appendix A, in that order):

- :func:`random_resized_crop` - crop of random area and aspect ratio, resized by bilinear
  sampling through one ``affine_grid``/``grid_sample`` call for the whole batch;
- :func:`horizontal_flip`;
- :func:`color_jitter` - brightness, contrast, saturation, hue (fixed order); on a 1-channel
  batch only brightness and contrast apply, so Fashion-MNIST needs no special case;
- :func:`random_grayscale` - keeps the channel count;
- :func:`gaussian_blur` - per-sample sigma, kernel ~10% of the side (odd);
- :func:`solarize`;
- :func:`normalize`.

:class:`ViewConfig` bundles the parameters of one view and :func:`view` applies the chain;
:func:`two_views` and :func:`multi_crop` build the view sets the contrastive objectives need.

>>> g = torch.Generator().manual_seed(0)
>>> images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
>>> v1, v2 = two_views(images, ViewConfig(size=28), generator=g)
>>> v1.shape, v1.dtype
(torch.Size([8, 1, 28, 28]), torch.float32)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ssl_models.rng import coin, uniform

# ITU-R 601-2 luma, the weights torchvision and PIL use for RGB → L.
_LUMA = (0.299, 0.587, 0.114)


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} expects a batch (B, C, H, W); got shape {tuple(x.shape)} - "
                         f"add a batch dimension with x.unsqueeze(0)")
    if not x.is_floating_point():
        raise ValueError(f"{what} expects a float batch in [0, 1]; got {x.dtype} - call to_float(x) first")


def _check_p(p: float, what: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what}: probability p must be in [0, 1], got {p}")


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Move CPU parameters (B,) to x's device and dtype, shaped (B, 1, 1, 1) to broadcast."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _mask(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bool mask (B,) on the CPU → (B, 1, 1, 1) on x's device."""
    return m.to(x.device).view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- ops
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] → float32 in [0, 1]; a float batch is returned as float32.

    Shape: images (B, C, H, W) → (B, C, H, W).
    """
    if images.ndim != 4:
        raise ValueError(f"to_float expects (B, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise ValueError(f"to_float expects uint8 (0-255) or float (0-1) images, got {images.dtype}")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a float batch to ``size`` × ``size``; a no-op at that size already.

    Shape: x (B, C, H, W) float → (B, C, size, size).
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Crop a random box of each image and resize it to ``size``×``size`` (bilinear).

    Per sample: area fraction s ~ U(scale), log aspect ratio ~ U(log ratio), box w = √(s·H·W·r),
    h = √(s·H·W/r), clipped to the image (torchvision retries 10 times instead; clipping only
    changes the ratio of the rare too-wide boxes), top-left corner uniform over the positions
    where the box fits (sub-pixel). One ``affine_grid`` + ``grid_sample`` call resizes the whole
    batch. There is no antialiasing: fine for the 28–64 px images gelato targets, where crops
    are upsampled; downsampling large crops by more than ~2× would alias.

    Shape: x (B, C, H, W) float → (B, C, size, size).
    """
    _check_batch(x, "random_resized_crop")
    if size < 1:
        raise ValueError(f"random_resized_crop: size must be >= 1, got {size}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"random_resized_crop: scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"random_resized_crop: ratio must satisfy 0 < min <= max, got {ratio}")
    B, C, H, W = x.shape
    area = uniform(B, scale[0], scale[1], generator) * (H * W)               # (B,) pixels²
    log_r = uniform(B, math.log(ratio[0]), math.log(ratio[1]), generator)    # (B,)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(1.0, W)                                # (B,) pixels
    h = torch.sqrt(area / aspect).clamp(1.0, H)
    x0 = uniform(B, 0.0, 1.0, generator) * (W - w)                            # left edge
    y0 = uniform(B, 0.0, 1.0, generator) * (H - h)                            # top edge
    # Box in grid_sample's normalised coordinates (align_corners=False: -1/+1 are the outer
    # edges of the first/last pixel): centre c and half-extent w/W.
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w / W
    theta[:, 0, 2] = 2 * (x0 + w / 2) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = 2 * (y0 + h / 2) / H - 1
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)      # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mirror each image left-right with probability p.

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    _check_batch(x, "horizontal_flip")
    _check_p(p, "horizontal_flip")
    flip = coin(x.shape[0], p, generator)
    return torch.where(_mask(flip, x), x.flip(-1), x)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch. Shape: x (B, 3, H, W) → (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Grayscale of a 1- or 3-channel batch, (B, 1, H, W); other channel counts: channel mean."""
    if x.shape[1] == 3:
        return rgb_to_grayscale(x)
    return x.mean(dim=1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape: x (B, 3, H, W) RGB in [0, 1] → hue, saturation, value, each (B, H, W) in [0, 1].

    Written for speed (one ``where`` chain, ``x − floor(x)`` for the wrap-around; 3× faster on CPU
    than an argmax/remainder version). Where max = min the hue is 0 (saturation is 0 there).
    """
    r, g, b = x.unbind(1)                                     # each (B, H, W)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-12)
    inv = 1.0 / delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) * inv,
                    torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h = h * (1.0 / 6.0)
    return h - h.floor(), s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape: h, s, v (B, H, W) → (B, 3, H, W) RGB.

    Closed form: channel n ∈ (5, 3, 1) for (R, G, B) is V − V·S·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6·H) mod 6.
    """
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1)
    k = n + 6.0 * h.unsqueeze(1)                              # (B, 3, H, W)
    k = k - 6.0 * (k * (1.0 / 6.0)).floor()                   # mod 6
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * a


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """With probability p per image, jitter brightness, contrast, saturation and hue.

    Factors as torchvision's ``ColorJitter``: brightness b ~ U[max(0, 1−β), 1+β], x ← b·x;
    contrast c ~ U[max(0, 1−γ), 1+γ], x ← c·x + (1−c)·mean(gray(x)); saturation
    s ~ U[max(0, 1−σ), 1+σ], x ← s·x + (1−s)·gray(x); hue shift η ~ U[−h, h] turns of the colour
    wheel, applied in HSV. Each step clamps to [0, 1]. The order is fixed (torchvision draws a
    random order). On a batch that is not 3-channel (e.g. 1-channel Fashion-MNIST) saturation
    and hue are undefined and skipped: only brightness and contrast apply.

    Shape: x (B, C, H, W) in [0, 1] → (B, C, H, W).
    """
    _check_batch(x, "color_jitter")
    _check_p(p, "color_jitter")
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise ValueError(f"color_jitter: {name} must be >= 0, got {v}")
    if not 0 <= hue <= 0.5:
        raise ValueError(f"color_jitter: hue must be in [0, 0.5], got {hue}")
    B, C = x.shape[:2]
    apply = coin(B, p, generator)
    bf = uniform(B, max(0.0, 1 - brightness), 1 + brightness, generator)
    cf = uniform(B, max(0.0, 1 - contrast), 1 + contrast, generator)
    sf = uniform(B, max(0.0, 1 - saturation), 1 + saturation, generator)
    hf = uniform(B, -hue, hue, generator)
    out = x
    if brightness > 0:
        out = (out * _per_sample(bf, x)).clamp(0.0, 1.0)
    if contrast > 0:
        m = _gray(out).mean(dim=(1, 2, 3), keepdim=True)       # (B, 1, 1, 1)
        c = _per_sample(cf, x)
        out = (c * out + (1 - c) * m).clamp(0.0, 1.0)
    if C == 3 and saturation > 0:
        s = _per_sample(sf, x)
        out = (s * out + (1 - s) * _gray(out)).clamp(0.0, 1.0)
    if C == 3 and hue > 0:
        h, sat, val = _rgb_to_hsv(out)                        # (B, H, W) each
        h = h + _per_sample(hf, x).view(-1, 1, 1)
        out = _hsv_to_rgb(h - h.floor(), sat, val).clamp(0.0, 1.0)
    return torch.where(_mask(apply, x), out, x)


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Replace each image by its grayscale (repeated over the channels) with probability p.

    A 1-channel batch is already gray and comes back unchanged (the draw is still made, so the
    generator advances the same way whatever the channel count).

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    _check_batch(x, "random_grayscale")
    _check_p(p, "random_grayscale")
    gray = coin(x.shape[0], p, generator)
    if x.shape[1] == 1:
        return x
    g = _gray(x).expand_as(x)                                 # (B, C, H, W)
    return torch.where(_mask(gray, x), g, x)


def blur_kernel_size(height: int, width: int) -> int:
    """Odd kernel side ~10% of the image side, at least 3 (23 for 224 px as in SimCLR, 3 for 32 px)."""
    return max(3, 2 * int(0.05 * min(height, width)) + 1)


def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
                  generator: Optional[torch.Generator] = None, kernel_size: Optional[int] = None) -> torch.Tensor:
    """With probability p per image, blur with a Gaussian of σ ~ U(sigma), per sample.

    The blur is separable: a weighted sum of k shifted copies along each axis (reflect padding),
    with per-sample 1-D weights G_b(j) ∝ exp(−j²/(2σ_b²)), j = −k//2 … k//2. Images not chosen
    get a unit impulse kernel, i.e. are returned unchanged. ``kernel_size`` defaults to
    :func:`blur_kernel_size`.

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    _check_batch(x, "gaussian_blur")
    _check_p(p, "gaussian_blur")
    if not 0 < sigma[0] <= sigma[1]:
        raise ValueError(f"gaussian_blur: sigma must satisfy 0 < min <= max, got {sigma}")
    B, C, H, W = x.shape
    k = kernel_size if kernel_size is not None else blur_kernel_size(H, W)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be odd and positive, got {k}")
    apply = coin(B, p, generator)
    sig = uniform(B, sigma[0], sigma[1], generator)
    half = k // 2
    if half >= min(H, W):
        half = min(H, W) - 1                                  # reflect padding needs pad < side
        k = 2 * half + 1
    j = torch.arange(-half, half + 1, dtype=torch.float32)    # (k,)
    kern = torch.exp(-(j.view(1, k) ** 2) / (2 * sig.view(B, 1) ** 2))        # (B, k)
    kern = kern / kern.sum(dim=1, keepdim=True)
    impulse = (j == 0).float().expand(B, k)
    kern = torch.where(apply.view(B, 1), kern, impulse)
    kern = kern.to(device=x.device, dtype=x.dtype)
    xp = F.pad(x, (half, half, 0, 0), mode="reflect")         # (B, C, H, W + 2·half)
    out = sum(kern[:, i].view(B, 1, 1, 1) * xp[..., i:i + W] for i in range(k))
    xp = F.pad(out, (0, 0, half, half), mode="reflect")       # (B, C, H + 2·half, W)
    out = sum(kern[:, i].view(B, 1, 1, 1) * xp[..., i:i + H, :] for i in range(k))
    return out


def solarize(x: torch.Tensor, p: float = 0.2, threshold: float = 0.5,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """With probability p per image, invert the pixels at or above ``threshold``: x ← 1 − x.

    Shape: x (B, C, H, W) in [0, 1] → (B, C, H, W).
    """
    _check_batch(x, "solarize")
    _check_p(p, "solarize")
    apply = coin(x.shape[0], p, generator)
    return torch.where(_mask(apply, x) & (x >= threshold), 1.0 - x, x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean) / std per channel; a 1-long mean/std applies to every channel.

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    _check_batch(x, "normalize")
    C = x.shape[1]
    mean, std = tuple(mean), tuple(std)
    if len(mean) == 1:
        mean = mean * C
    if len(std) == 1:
        std = std * C
    if len(mean) != C or len(std) != C:
        raise ValueError(f"normalize: mean/std must have 1 or {C} entries for a {C}-channel batch, "
                         f"got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize: std must be positive, got {std}")
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, C, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, C, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- views
@dataclass(frozen=True)
class ViewConfig:
    """Parameters of one augmented view (SimCLR's chain; MoCo v2's colour strengths).

    The defaults suit 28–32 px images with 1 or 3 channels: crop scale from 0.2 (MoCo v2; 0.08
    throws away too much of a 28 px image), jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2,
    blur p=0.5, no solarization, and mean/std 0.5/0.5 for every channel (maps [0, 1] to
    [−1, 1]; pass per-channel tuples, e.g. ImageNet's, when they are known).
    """

    size: int = 32                                  # output side, pixels
    scale: tuple[float, float] = (0.2, 1.0)         # crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)     # crop aspect ratio
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ViewConfig.size must be >= 1, got {self.size}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ViewConfig.{name} must be a probability in [0, 1], got {v}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"ViewConfig.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ViewConfig.hue must be in [0, 0.5], got {self.hue}")
        if len(self.mean) < 1 or len(self.mean) != len(self.std):
            raise ValueError(f"ViewConfig.mean and std need the same length (1 or C), got {self.mean}, {self.std}")


def resolve_view_config(spec: "ViewConfig | dict | None", default: ViewConfig) -> ViewConfig:
    """An objective's view argument → a :class:`ViewConfig`.

    ``None`` gives ``default``; a dict (as read from a YAML config) overrides fields of
    ``default``; a :class:`ViewConfig` is used as is.
    """
    if spec is None:
        return default
    if isinstance(spec, ViewConfig):
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - set(ViewConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown view option(s) {sorted(unknown)}; valid: {sorted(ViewConfig.__dataclass_fields__)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        return dataclasses.replace(default, **fields)
    raise ValueError(f"a view must be a ViewConfig, a dict of its fields or None, got {type(spec).__name__}")


def check_images(images: torch.Tensor, in_channels: int, what: str) -> None:
    """Raise ValueError unless ``images`` is a (B, C, H, W) batch with ``in_channels`` channels and B >= 2."""
    if images.ndim != 4:
        raise ValueError(f"{what}.make_views expects images (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != in_channels:
        raise ValueError(f"{what} was built for {in_channels}-channel images, got {images.shape[1]} channels; "
                         f"build the backbone with in_channels={images.shape[1]}")
    if images.shape[0] < 2:
        raise ValueError(f"{what} contrasts images within a batch and needs at least 2 images, got {images.shape[0]}")


def view(images: torch.Tensor, cfg: ViewConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One augmented, normalised view of a batch: crop → flip → jitter → grayscale → blur → solarize → normalize.

    Ops whose probability (or every strength) is zero are skipped and draw nothing.

    Shape: images (B, C, H, W) uint8 (or float in [0, 1]) → (B, C, cfg.size, cfg.size) float32.
    """
    x = to_float(images)
    x = random_resized_crop(x, cfg.size, cfg.scale, cfg.ratio, generator=generator)
    if cfg.flip_p > 0:
        x = horizontal_flip(x, cfg.flip_p, generator=generator)
    if cfg.jitter_p > 0 and max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
        x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p, generator=generator)
    if cfg.grayscale_p > 0:
        x = random_grayscale(x, cfg.grayscale_p, generator=generator)
    if cfg.blur_p > 0:
        x = gaussian_blur(x, cfg.blur_p, cfg.sigma, generator=generator)
    if cfg.solarize_p > 0:
        x = solarize(x, cfg.solarize_p, cfg.solarize_threshold, generator=generator)
    return normalize(x, cfg.mean, cfg.std)


def two_views(images: torch.Tensor, cfg1: ViewConfig, cfg2: Optional[ViewConfig] = None,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent views of each image (SimCLR, MoCo, BYOL); ``cfg2`` defaults to ``cfg1``.

    Shape: images (B, C, H, W) uint8 → two (B, C, size, size) float32 batches.
    """
    return view(images, cfg1, generator), view(images, cfg2 if cfg2 is not None else cfg1, generator)


def multi_crop(images: torch.Tensor, global_cfg: ViewConfig, local_cfg: ViewConfig, n_global: int = 2,
               n_local: int = 4, generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """SwAV's multi-crop (Caron et al. 2020): ``n_global`` large views then ``n_local`` small ones.

    Shape: images (B, C, H, W) uint8 → list of n_global tensors (B, C, G, G) followed by n_local
    tensors (B, C, L, L), with G = global_cfg.size and L = local_cfg.size.
    """
    if n_global < 1 or n_local < 0:
        raise ValueError(f"multi_crop needs n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
    return ([view(images, global_cfg, generator) for _ in range(n_global)]
            + [view(images, local_cfg, generator) for _ in range(n_local)])


# --------------------------------------------------------------------------- the predictive objectives' light view

def prepare_images(images: torch.Tensor, size: int, crop_scale: tuple[float, float] = (1.0, 1.0),
                   flip_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The light view of the predictive objectives: float in [0, 1], ``size``×``size``.

    With ``crop_scale`` = (1, 1) the whole image is resized (only if its size differs); otherwise a
    random resized crop of that area range is taken. Then a horizontal flip with probability ``flip_p``.

    Shape: images (B, C, H, W) uint8 (or float in [0, 1]) → (B, C, size, size) float32.
    """
    x = to_float(images)
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
    if crop_scale[0] < 1.0:
        x = random_resized_crop(x, size, scale=crop_scale, generator=generator)
    else:
        x = resize(x, size)
    if flip_p > 0:
        x = horizontal_flip(x, flip_p, generator=generator)
    return x


def prepare_clips(clips: torch.Tensor, size: int, crop_scale: tuple[float, float] = (1.0, 1.0),
                  flip_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`prepare_images` for clips, with one draw of the crop and the flip per clip, applied to
    every frame alike (a crop that moved between frames would be motion the clip does not have).
    The frames are folded into the channels, so each clip is one sample of the batched ops.

    Shape: clips (B, T, C, H, W) uint8 (or float in [0, 1]) → (B, T, C, size, size) float32.
    """
    if clips.ndim != 5:
        raise ValueError(f"clips must be (B, T, C, H, W), got shape {tuple(clips.shape)}")
    b, t, c, h, w = clips.shape
    x = prepare_images(clips.reshape(b, t * c, h, w), size, crop_scale, flip_p, generator)
    return x.reshape(b, t, c, size, size)


def normalize_input(x: torch.Tensor) -> torch.Tensor:
    """Map a [0, 1] batch to what backbones are fed: (x − mean) / std with the contrastive views'
    defaults (``augment.ViewConfig``: 0.5 / 0.5, so [−1, 1]).

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    return normalize(x, ViewConfig.mean, ViewConfig.std)

__all__ = [
    "prepare_clips", "ViewConfig", "to_float", "random_resized_crop", "horizontal_flip", "color_jitter", "random_grayscale",
    "rgb_to_grayscale", "gaussian_blur", "blur_kernel_size", "solarize", "normalize", "view", "two_views",
    "multi_crop", "resolve_view_config", "check_images", "prepare_images", "normalize_input",
]
