"""Colour ops for colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization").

- :func:`rgb_to_lab`, :func:`lab_to_rgb`: sRGB (D65 white, IEC 61966-2-1 transfer curve) ↔ CIE
  L*a*b*, batched, differentiable, on any device.
- :class:`ABQuantizer`: the ab plane cut into square bins of side 10 on [−110, 110]² (23 × 23 = 529
  bins), of which the in-gamut ones are kept by default (a bin is in gamut when some colour in
  its cell is a valid sRGB colour for some lightness: Q = 262 bins, the same set that quantising
  every colour of a 128³ sRGB grid reaches; the paper's Q = 313 came from its own gamut
  computation, which the paper does not spell out); hard and soft (5 nearest bins, Gaussian σ = 5)
  encoding of ab to bins, and the annealed-mean decoding back to ab.
- :func:`rebalancing_weights`: the class-rebalancing weights of eq. (3-4),
  w ∝ ((1 − λ) p̃ + λ / Q)^−1 normalised so that E_p̃[w] = Σ_q p̃_q w_q = 1, where p̃ is the
  empirical ab-bin distribution smoothed by a Gaussian kernel (σ = 5) and λ = 0.5.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ssl_models.augment import prepare_images

# sRGB (linear) → XYZ for the D65 white point, and that white point (X, Y, Z).
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0   # CIE's f(t) switches from the cube root to a line at t = δ³


def _check_three_channels(x: torch.Tensor, what: str) -> None:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{what} expects (..., 3, H, W) with 3 colour channels, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} expects a float tensor, got {x.dtype}; convert uint8 with x.float() / 255")


def lightness_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """What the colorization objectives' backbones see of un-augmented images: L/50 − 1 (in [−1, 1])
    of the images in [0, 1] resized to ``size``. Shape: uint8 (B, 3, H, W) → (B, 1, size, size)."""
    return rgb_to_lab(prepare_images(images, size))[:, :1] / 50.0 - 1.0


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → CIE L*a*b* (L in [0, 100], a and b roughly in [−110, 110]).

    Shape: rgb (..., 3, H, W) float → (..., 3, H, W) as (L, a, b).
    """
    _check_three_channels(rgb, "rgb_to_lab")
    # sRGB transfer curve → linear light.
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0.0) + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    xyz = torch.einsum("ij,...jhw->...ihw", m, linear) / white        # (..., 3, H, W), white → (1, 1, 1)
    f = torch.where(xyz > _DELTA ** 3, xyz.clamp_min(_DELTA ** 3) ** (1.0 / 3.0),
                    xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)                                          # each (..., H, W)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """CIE L*a*b* → sRGB. Out-of-gamut colours are clipped to [0, 1] when ``clamp`` (the default);
    otherwise the linear values outside [0, 1] are returned through the transfer curve's
    linear segment / sign-preserving power, so they show how far out of gamut a colour is.

    Shape: lab (..., 3, H, W) float → (..., 3, H, W).
    """
    _check_three_channels(lab, "lab_to_rgb")
    L, a, b = lab.unbind(-3)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-3)      # (..., 3, H, W) as (fx, fy, fz)
    t = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))
    white = torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    m_inv = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,...jhw->...ihw", m_inv, t * white)      # (..., 3, H, W)
    if clamp:
        linear = linear.clamp(0.0, 1.0)
    mag = linear.abs().clamp_min(0.0031308)
    srgb = torch.where(linear.abs() <= 0.0031308, 12.92 * linear,
                       torch.sign(linear) * (1.055 * mag ** (1.0 / 2.4) - 0.055))
    return srgb


@functools.lru_cache(maxsize=4)
def _grid_in_gamut(grid_step: int, ab_max: int, samples_per_side: int = 3, lightness_steps: int = 101) -> torch.Tensor:
    """Which cells of the ab grid hold at least one valid sRGB colour (for some L in [0, 100]).

    Each cell (centre ± step/2) is probed at samples_per_side² points × ``lightness_steps`` values of L.
    Shape: returns bool (n, n), n = 2·ab_max / grid_step + 1, indexed [a bin, b bin].
    """
    centres = torch.arange(-ab_max, ab_max + 1, grid_step, dtype=torch.float64)           # (n,)
    n = centres.numel()
    offs = torch.linspace(-grid_step / 2, grid_step / 2, samples_per_side, dtype=torch.float64)  # (s,)
    a = (centres[:, None] + offs[None]).reshape(n, 1, samples_per_side, 1)                 # (n, 1, s, 1)
    b = (centres[:, None] + offs[None]).reshape(1, n, 1, samples_per_side)                 # (1, n, 1, s)
    a, b = torch.broadcast_tensors(a, b)                                                   # (n, n, s, s)
    L = torch.linspace(0, 100, lightness_steps, dtype=torch.float64).view(-1, 1, 1, 1, 1)  # (l, 1, 1, 1, 1)
    lab = torch.stack(torch.broadcast_tensors(L, a[None], b[None]), dim=-3)                # (l, n, n, 3, s, s)
    rgb = lab_to_rgb(lab, clamp=False)                                                     # (l, n, n, 3, s, s)
    ok = ((rgb >= -1e-6) & (rgb <= 1 + 1e-6)).all(dim=-3)                                  # (l, n, n, s, s)
    return ok.any(dim=-1).any(dim=-1).any(dim=0)                                           # (n, n)


class ABQuantizer(nn.Module):
    """The ab plane quantised into Q bins: grid of side ``grid_step`` on [−ab_max, ab_max]².

    ``in_gamut_only`` keeps the bins whose cell holds a valid sRGB colour (the default: Q = 262 for
    step 10), otherwise all (2·ab_max/step + 1)² bins are classes. The bin centres and the map
    from grid cell to class index are buffers, so a checkpoint fixes the meaning of each logit.
    """

    def __init__(self, grid_step: int = 10, ab_max: int = 110, in_gamut_only: bool = True):
        super().__init__()
        if grid_step <= 0 or ab_max <= 0 or (2 * ab_max) % grid_step:
            raise ValueError(f"2·ab_max ({2 * ab_max}) must be a positive multiple of grid_step ({grid_step})")
        self.grid_step = grid_step
        self.ab_max = ab_max
        self.n = 2 * ab_max // grid_step + 1
        keep = _grid_in_gamut(grid_step, ab_max) if in_gamut_only else torch.ones(self.n, self.n, dtype=torch.bool)
        flat_keep = keep.flatten()                                                   # (n·n,)
        lut = torch.full((self.n * self.n,), -1, dtype=torch.long)
        lut[flat_keep] = torch.arange(int(flat_keep.sum()))
        ia, ib = torch.meshgrid(torch.arange(self.n), torch.arange(self.n), indexing="ij")
        centres = torch.stack([ia, ib], dim=-1).reshape(-1, 2)[flat_keep].float() * grid_step - ab_max  # (Q, 2)
        self.register_buffer("centers", centres)   # (Q, 2) as (a, b)
        self.register_buffer("lut", lut)           # (n·n,) grid cell → class index, −1 if not a class
        self.num_bins = centres.shape[0]

    def _nearest_node(self, ab: torch.Tensor) -> torch.Tensor:
        """Shape: ab (B, 2, H, W) → grid coordinates of the nearest grid node (B, 2, H, W), long."""
        return ((ab + self.ab_max) / self.grid_step).round().clamp(0, self.n - 1).long()

    def encode_hard(self, ab: torch.Tensor) -> torch.Tensor:
        """Index of the nearest bin centre for every pixel.

        Shape: ab (B, 2, H, W) → (B, H, W) long in [0, Q).
        """
        node = self._nearest_node(ab)                                     # (B, 2, H, W)
        idx = self.lut[node[:, 0] * self.n + node[:, 1]]                  # (B, H, W), −1 off the kept bins
        missing = idx < 0
        if missing.any():  # nearest grid node is not a class (rare: far out of gamut) → nearest kept centre
            pts = ab.permute(0, 2, 3, 1)[missing]                         # (P, 2)
            idx = idx.masked_scatter(missing, torch.cdist(pts, self.centers).argmin(dim=1))
        return idx

    def encode_soft(self, ab: torch.Tensor, k: int = 5, sigma: float = 5.0) -> torch.Tensor:
        """Soft encoding: weights exp(−d²/2σ²) on the k nearest bins, normalised to sum to 1.

        The k nearest are searched among the 3×3 grid nodes around the nearest one (bins further
        away are at least 1.5 steps off and would weigh < 1e−2 at σ = step/2).

        Shape: ab (B, 2, H, W) → (B, Q, H, W), each pixel a distribution over the Q bins.
        """
        if not 1 <= k <= 9:
            raise ValueError(f"soft encoding uses 1 to 9 nearest bins, got k={k}")
        B, _, H, W = ab.shape
        node = self._nearest_node(ab)                                                    # (B, 2, H, W)
        offs = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], device=ab.device)  # (9, 2)
        nb = node[:, None] + offs.view(1, 9, 2, 1, 1)                                    # (B, 9, 2, H, W)
        inside = ((nb >= 0) & (nb < self.n)).all(dim=2)                                  # (B, 9, H, W)
        nb = nb.clamp(0, self.n - 1)
        bins = self.lut[nb[:, :, 0] * self.n + nb[:, :, 1]]                              # (B, 9, H, W)
        valid = inside & (bins >= 0)
        d2 = ((nb.to(ab.dtype) * self.grid_step - self.ab_max - ab[:, None]) ** 2).sum(dim=2)  # (B, 9, H, W)
        d2 = d2.masked_fill(~valid, float("inf"))
        d2k, pick = d2.topk(k, dim=1, largest=False)                                     # (B, k, H, W)
        w = torch.exp(-d2k / (2 * sigma ** 2))                                           # 0 where d² = inf
        binsk = bins.gather(1, pick).clamp_min(0)                                        # (B, k, H, W)
        total = w.sum(dim=1, keepdim=True)                                               # (B, 1, H, W)
        w = w / total.clamp_min(1e-12)
        out = torch.zeros(B, self.num_bins, H, W, dtype=ab.dtype, device=ab.device)
        out.scatter_add_(1, binsk, w)
        none = total <= 0                                                                # no kept bin nearby
        if none.any():
            out.scatter_add_(1, self.encode_hard(ab)[:, None], none.to(ab.dtype))
        return out

    def decode(self, logits: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
        """Annealed mean (eq. 5): softmax(logits / T) averaged over the bin centres; T = 0.38 as in the paper.

        Shape: logits (B, Q, H, W) → ab (B, 2, H, W).
        """
        probs = torch.softmax(logits / temperature, dim=1)                       # (B, Q, H, W)
        return torch.einsum("bqhw,qc->bchw", probs, self.centers.to(probs.dtype))  # (B, 2, H, W)


def smooth_distribution(counts: torch.Tensor, centers: torch.Tensor | None, sigma: float = 5.0) -> torch.Tensor:
    """Empirical bin distribution p = counts / Σ counts, smoothed in ab space by a Gaussian of width σ.

    Shape: counts (Q,), centers (Q, 2) → (Q,), sums to 1. σ = 0 returns p unsmoothed.
    """
    p = counts.double() / counts.double().sum().clamp_min(1e-12)
    if sigma <= 0:
        return p
    if centers is None:
        raise ValueError("pass the bin centers to smooth the distribution, or sigma=0 to skip smoothing")
    d2 = torch.cdist(centers.double(), centers.double()) ** 2                     # (Q, Q)
    p = torch.exp(-d2 / (2 * sigma ** 2)) @ p                                      # (Q,)
    return p / p.sum()


def rebalancing_weights(counts: torch.Tensor, centers: torch.Tensor | None = None, lam: float = 0.5,
                        sigma: float = 5.0) -> torch.Tensor:
    """Class-rebalancing weights of Zhang et al. (2016), eq. (4).

        p̃ = smoothed empirical distribution,  w ∝ ((1 − λ) p̃ + λ / Q)^−1,  Σ_q p̃_q w_q = 1.

    λ = 1 gives uniform weights; λ → 0 weighs each bin by its inverse frequency. With no
    counts yet, all weights are 1.

    Shape: counts (Q,) bin counts (a running histogram), centers (Q, 2) (needed when σ > 0) → (Q,) float32.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam (mixing with the uniform distribution) must be in (0, 1], got {lam}; the paper uses 0.5")
    Q = counts.numel()
    p = smooth_distribution(counts, centers, sigma)
    w = 1.0 / ((1 - lam) * p + lam / Q)
    w = w / (p * w).sum().clamp_min(1e-12)
    empty = counts.sum() <= 0          # no counts yet: uniform weights (no host sync on GPU)
    return torch.where(empty, torch.ones_like(w), w).float()
