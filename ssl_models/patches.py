"""Masking and patching ops for the predictive objectives, batched on whatever device the batch is on.

- :func:`patchify` / :func:`unpatchify`: image ↔ sequence of flattened patches (MAE's targets).
- :func:`random_masking`: MAE's per-sample random shuffle that keeps a fixed number of patches.
- :func:`patch_grid`: a G×G grid of tiles with a gap between tiles and per-tile jitter
  (relative position, jigsaw), cut for the whole batch with one ``unfold`` and one index.
- :func:`hamming_permutations`: the maximal-Hamming-distance permutation set of jigsaw.
- :func:`gaussian_noise`, :func:`masking_noise`: the corruptions of the denoising autoencoder.
- :func:`prepare_images`, :func:`normalize_input`, :func:`resize_tiles`, :func:`tile_input_size`:
  the light view every predictive objective starts from (uint8 → float, resize or mild crop,
  flip) and the normalisation the backbone sees, the same as the contrastive views'
  (``augment.ViewConfig``'s mean/std), so a backbone meets one input range whichever objective
  trained it.

Random numbers come from an optional ``torch.Generator`` (torch's default CPU generator when it is
``None``), drawn on the generator's device (the CPU unless a CUDA generator is passed) and moved to
the batch's, as in ``ssl_models.augment``: a seed reproduces a batch exactly on any device.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import ViewConfig, horizontal_flip, normalize, random_resized_crop, resize, to_float

_VIEW_DEFAULTS = ViewConfig()


# --------------------------------------------------------------------------- random numbers

def _gen_device(generator: torch.Generator | None, device) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def rand(shape: Sequence[int], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform numbers in [0, 1) from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device)).to(device)


def randn(shape: Sequence[int], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Standard normal numbers from ``generator`` (on its own device), moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device)).to(device)


def randint(low: int, high: int, shape: Sequence[int], generator: torch.Generator | None = None,
            device=None) -> torch.Tensor:
    """Integers uniform in [low, high) from ``generator`` (on its own device), moved to ``device``."""
    return torch.randint(low, high, tuple(shape), generator=generator,
                         device=_gen_device(generator, device)).to(device)


# --------------------------------------------------------------------------- patches

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into non-overlapping p×p patches, each flattened in (row, column, channel) order.

    Shape: x (B, C, H, W) with H, W divisible by p → (B, N, p·p·C), N = (H/p)·(W/p), patches row-major.
    """
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}×{W} is not divisible by the patch size {p}; resize or change p")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)                  # (B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)            # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)            # (B, N, p·p·C)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`. ``grid`` = (h, w) patches; square if omitted.

    Shape: x (B, N, p·p·C) → (B, C, h·p, w·p).
    """
    B, N, D = x.shape
    if D != p * p * channels:
        raise ValueError(f"last dimension {D} != p·p·channels = {p * p * channels}; check p and channels")
    if grid is None:
        h = w = int(round(N ** 0.5))
        if h * w != N:
            raise ValueError(f"{N} patches do not form a square grid; pass grid=(h, w)")
    else:
        h, w = grid
    x = x.reshape(B, h, w, p, p, channels)           # (B, h, w, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)            # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)      # (B, C, H, W)


def random_masking(B: int, N: int, ratio: float, generator: torch.Generator | None = None, device=None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's random masking: shuffle the N patches of each sample, keep the first N_keep.

    N_keep = ⌊N · (1 − ratio)⌋ (as in MAE; with a 1e−6 tolerance so 10 · (1 − 0.9) keeps 1), at least
    1, the same for every sample (so the kept tokens batch).
    The patches with the lowest ``noise`` are kept; ``noise`` is drawn uniformly if not given.

    Shape:
        noise: (B, N), optional.
        Returns ids_keep (B, N_keep), the indices of the visible patches; mask (B, N) float with
        1 = masked, 0 = visible; ids_restore (B, N), the inverse of the shuffle.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}; MAE uses 0.75")
    n_keep = max(1, int(N * (1.0 - ratio) + 1e-6))
    if noise is None:
        noise = rand((B, N), generator, device)
    elif tuple(noise.shape) != (B, N):
        raise ValueError(f"noise must have shape (B, N) = {(B, N)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)                  # (B, N) ascending: kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)            # (B, N)
    ids_keep = ids_shuffle[:, :n_keep]                         # (B, N_keep)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)                  # (B, N) back in patch order
    return ids_keep, mask, ids_restore


def patch_grid(x: torch.Tensor, grid: int = 3, patch: int = 8, gap: int = 0, jitter: int = 0,
               generator: torch.Generator | None = None, return_coords: bool = False):
    """Crop a grid × grid arrangement of square tiles from every image (Doersch et al. 2015; Noroozi
    & Favaro 2016).

    Tile (i, j) nominally starts at origin + (i·(patch + gap), j·(patch + gap)); the origin is
    random per image, and each tile is then shifted by its own random offset in [−jitter, jitter]
    on each axis, so tiles never touch when ``gap > 2·jitter`` and edges cannot be continued across
    tiles. All crops are taken at once: ``unfold`` gives a view of every p×p window, and one
    advanced index picks B·G² of them.

    Shape:
        x: (B, C, H, W) with H, W >= grid·patch + (grid − 1)·gap + 2·jitter.
        Returns tiles (B, G·G, C, patch, patch), tiles in row-major grid order, and with
        ``return_coords`` also their top-left corners (B, G·G, 2) as (row, column).
    """
    B, C, H, W = x.shape
    if grid < 1 or patch < 1 or gap < 0 or jitter < 0:
        raise ValueError(f"need grid >= 1, patch >= 1, gap >= 0, jitter >= 0; got {grid}, {patch}, {gap}, {jitter}")
    span = grid * patch + (grid - 1) * gap
    if span + 2 * jitter > min(H, W):
        raise ValueError(f"a {grid}×{grid} grid of {patch}px tiles with gap {gap} and jitter {jitter} needs "
                         f"{span + 2 * jitter}px but the images are {H}×{W}; use smaller tiles, gap or jitter")
    dev = x.device
    T = grid * grid
    oy = randint(jitter, H - span - jitter + 1, (B, 1, 1), generator, dev)   # (B, 1, 1)
    ox = randint(jitter, W - span - jitter + 1, (B, 1, 1), generator, dev)   # (B, 1, 1)
    steps = torch.arange(grid, device=dev) * (patch + gap)                   # (G,)
    top = (oy + steps.view(1, grid, 1)).expand(B, grid, grid).reshape(B, T)  # (B, G·G) row-major
    left = (ox + steps.view(1, 1, grid)).expand(B, grid, grid).reshape(B, T) # (B, G·G)
    if jitter:
        top = top + randint(-jitter, jitter + 1, (B, T), generator, dev)
        left = left + randint(-jitter, jitter + 1, (B, T), generator, dev)
    windows = x.unfold(2, patch, 1).unfold(3, patch, 1)   # (B, C, H−p+1, W−p+1, p, p), a view
    b = torch.arange(B, device=dev)[:, None].expand(B, T)  # (B, T)
    tiles = windows[b, :, top, left]                        # (B, T, C, p, p)
    if return_coords:
        return tiles, torch.stack([top, left], dim=-1)      # (B, T, 2)
    return tiles


def grid_geometry(image_size: int, grid: int = 3) -> tuple[int, int, int]:
    """Default (patch, gap, jitter) for a ``grid``×``grid`` tiling of an ``image_size`` image.

    gap ≈ image_size / 14 and jitter ≈ image_size / 32 (at least 1 each): for 28 px that is
    tiles of 7 px with gap 2 and jitter 1; for 64 px, tiles of 16 px with gap 5 and jitter 2.
    """
    gap = max(1, round(image_size / 14))
    jitter = max(1, image_size // 32)
    patch = (image_size - (grid - 1) * gap - 2 * jitter) // grid
    if patch < 2:
        raise ValueError(f"image_size {image_size} is too small for a {grid}×{grid} grid of tiles")
    return patch, gap, jitter


# --------------------------------------------------------------------------- permutations


def resolve_grid(image_size: int, patch: int | None, gap: int | None, jitter: int | None,
                 grid: int = 3) -> tuple[int, int, int]:
    """(patch, gap, jitter) of a ``grid``×``grid`` tile layout: given values, else :func:`grid_geometry`'s
    defaults; raises ValueError when the tiles, gaps and jitter do not fit in ``image_size``."""
    d_patch, d_gap, d_jitter = grid_geometry(image_size, grid)
    patch = int(patch if patch is not None else d_patch)
    gap = int(gap if gap is not None else d_gap)
    jitter = int(jitter if jitter is not None else d_jitter)
    need = grid * patch + (grid - 1) * gap + 2 * jitter
    if need > image_size:
        raise ValueError(f"{grid} tiles of {patch}px with gap {gap} and jitter {jitter} need "
                         f"{need}px > image_size {image_size}; lower patch, gap or jitter")
    return patch, gap, jitter

def hamming_permutations(n_perms: int = 100, n_tiles: int = 9, seed: int = 0,
                         criterion: str = "maximin") -> torch.Tensor:
    """A set of permutations far apart in Hamming distance (Noroozi & Favaro 2016, Algorithm 1).

    Greedy: start from a random permutation (drawn with ``seed``), then repeatedly add the
    permutation of {0 … n_tiles−1} that scores highest against the set chosen so far, with ties
    going to the first in lexicographic order, so the result depends only on the arguments.

    ``criterion="mean"`` is the paper's score, the mean Hamming distance to the chosen set. It
    maximises the average distance but, as the paper's own Table 3 shows, can leave pairs only 2
    apart. ``criterion="maximin"`` (default) scores by the minimum distance to the set first and
    breaks ties by the mean, which keeps the average about as high and makes the closest pair as
    far apart as the greedy can.

    Shape: returns a LongTensor (n_perms, n_tiles), each row a permutation.
    """
    if not 2 <= n_tiles <= 10:
        raise ValueError(f"n_tiles must be between 2 and 10 (all n_tiles! permutations are scored), got {n_tiles}")
    total = 1
    for k in range(2, n_tiles + 1):
        total *= k
    if not 1 <= n_perms <= total:
        raise ValueError(f"n_perms must be between 1 and {n_tiles}! = {total}, got {n_perms}")
    if criterion not in ("maximin", "mean"):
        raise ValueError(f"criterion must be 'maximin' or 'mean', got {criterion!r}")
    return _hamming_permutations(n_perms, n_tiles, seed, criterion).clone()


@functools.lru_cache(maxsize=8)
def _hamming_permutations(n_perms: int, n_tiles: int, seed: int, criterion: str) -> torch.Tensor:
    n = n_tiles
    every = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int8)  # (n!, n) lexicographic
    M = every.shape[0]
    # hits[k·n + v, m] = 1 if permutation m puts v at position k; then the Hamming distance to
    # permutation p is n − Σ_k hits[k·n + p_k], a sum of n gathered rows (much faster than
    # comparing the (n!, n) table with p at every step).
    hits = (every.t()[:, None, :] == torch.arange(n, dtype=torch.int8)[None, :, None])   # (n, n, n!)
    hits = hits.reshape(n * n, M).to(torch.uint8)                                         # (n·n, n!)
    offsets = torch.arange(n) * n                                                         # (n,)
    g = torch.Generator().manual_seed(seed)
    j = int(torch.randint(M, (1,), generator=g))
    min_d = torch.full((M,), n + 1, dtype=torch.long)    # distance to the closest chosen permutation
    sum_d = torch.zeros(M, dtype=torch.long)             # summed distance to the chosen set
    chosen = []
    for i in range(n_perms):
        chosen.append(j)
        rows = offsets + every[j].long()                                                  # (n,)
        d = n - hits.index_select(0, rows).sum(dim=0, dtype=torch.int16).long()           # (n!,) to the newest
        min_d = torch.minimum(min_d, d)
        sum_d += d
        if i == n_perms - 1:
            break
        if criterion == "maximin":
            score = min_d * (n * n_perms + 1) + sum_d    # lexicographic: the minimum first, then the sum
        else:
            score = sum_d.clone()
        score[chosen] = -1                               # (their own min distance is 0 anyway)
        j = int(torch.argmax(score))                     # first maximum: deterministic
    return every[chosen].long()


# --------------------------------------------------------------------------- corruptions

def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None,
                   clamp: bool = False) -> torch.Tensor:
    """Additive isotropic Gaussian noise x̃ = x + ε, ε ~ N(0, std²) (Vincent et al. 2010).

    Shape: x (B, C, H, W) → (B, C, H, W); clipped to [0, 1] if ``clamp``.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    out = x + std * randn(x.shape, generator, x.device).to(x.dtype)
    return out.clamp(0, 1) if clamp else out


def masking_noise(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None,
                  return_mask: bool = False):
    """Masking noise (Vincent et al. 2008): set a random ``fraction`` of each image's pixels to 0.

    Exactly round(fraction · H · W) pixel positions per image are zeroed, across all channels.

    Shape: x (B, C, H, W) → (B, C, H, W), and with ``return_mask`` the mask (B, 1, H, W), True = zeroed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"masking fraction must be in [0, 1], got {fraction}")
    B, C, H, W = x.shape
    k = int(round(fraction * H * W))
    scores = rand((B, H * W), generator, x.device)                   # (B, H·W)
    idx = scores.topk(k, dim=1, largest=False).indices               # (B, k) the k lowest
    mask = torch.zeros(B, H * W, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
    mask = mask.view(B, 1, H, W)                                      # (B, 1, H, W)
    out = x.masked_fill(mask, 0.0)
    return (out, mask) if return_mask else out


# --------------------------------------------------------------------------- light views

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


def normalize_input(x: torch.Tensor) -> torch.Tensor:
    """Map a [0, 1] batch to what backbones are fed: (x − mean) / std with the contrastive views'
    defaults (``augment.ViewConfig``: 0.5 / 0.5, so [−1, 1]).

    Shape: x (B, C, H, W) → (B, C, H, W).
    """
    return normalize(x, _VIEW_DEFAULTS.mean, _VIEW_DEFAULTS.std)


def tile_input_size(backbone: nn.Module, patch: int, minimum: int = 16) -> int:
    """Side to resize tiles to before the backbone: a ViT's fixed ``image_size``, otherwise the tile
    side but at least ``minimum`` (small_cnn pools three times, so a 7 px tile would vanish).
    """
    fixed = getattr(backbone, "image_size", None)
    if fixed is not None and hasattr(backbone, "patch_size"):
        return int(fixed)
    return max(int(patch), int(minimum))


def resize_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of every tile to ``size``×``size`` (a no-op when already that size).

    Shape: tiles (B, T, C, p, p) → (B, T, C, size, size).
    """
    B, T, C, p, _ = tiles.shape
    if p == size:
        return tiles
    flat = tiles.reshape(B * T, C, p, p)                                                  # (B·T, C, p, p)
    flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)  # (B·T, C, s, s)
    return flat.view(B, T, C, size, size)
