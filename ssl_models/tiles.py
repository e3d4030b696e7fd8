"""Tiles of an image for the context-prediction objectives (relative position, jigsaw), batched.

- :func:`patch_grid`: a G×G grid of tiles with a gap between tiles and per-tile jitter, cut for the
  whole batch with one ``unfold`` and one index;
- :func:`grid_geometry` / :func:`resolve_grid`: tile side, gap and jitter for an image size;
- :func:`tile_input_size` / :func:`resize_tiles`: the side tiles are resized to before the backbone.

Random numbers follow ``ssl_models.rng`` (drawn on the generator's device, moved to the batch's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.rng import randint


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

