"""Jigsaw puzzles: classify which permutation shuffled a 3×3 grid of tiles."""
from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.heads import ClassifierHead
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint
from ssl_models.tiles import patch_grid, resize_tiles, resolve_grid, tile_input_size


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


class Jigsaw(Objective):
    """Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by
    Solving Jigsaw Puzzles").

    A 3×3 grid of tiles (with gap and jitter, see :func:`~ssl_models.tiles.patch_grid`) is cut
    from each image and shuffled by a permutation π_k from a fixed set {π_1 … π_K} chosen far
    apart in Hamming distance (:func:`~ssl_models.objectives.jigsaw.hamming_permutations`, K = ``n_perms``,
    100 by default); the position i of the shuffled sequence holds tile π_k(i). Every tile goes
    through the same backbone f (the paper's Siamese "context-free network"), the 9 features are
    concatenated in sequence order and a classifier h predicts k:

        L = −log softmax(h([f(t_{π_k(1)}); …; f(t_{π_k(9)})]))_k,   averaged over the batch.

    As in the paper, each tile is normalised by its own mean and standard deviation
    (``tile_norm``) so that low-level statistics shared by neighbours give no shortcut; its
    per-tile colour jitter is not implemented. The permutation set is a buffer, so it travels
    with the checkpoint.

    Args:
        backbone: any backbone with ``feature_dim``.
        image_size: side of the square image the grid is cut from.
        n_perms: size K of the permutation set; ``perm_seed`` and ``perm_criterion`` as in
            :func:`~ssl_models.objectives.jigsaw.hamming_permutations`.
        patch, gap, jitter, tile_size: tile geometry (defaults as in
            :class:`~ssl_models.objectives.relative_position.RelativePosition`).
        tile_norm: per-tile mean/std normalisation (else the usual input normalisation).
        head_hidden_dim: hidden width of the classifier (the paper's fc7).
        flip_p: probability of a horizontal flip of the whole image before cutting.

    Logged: ``accuracy`` over the K permutations.
    """

    name = "jigsaw"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, n_perms: int = 100, perm_seed: int = 0,
                 perm_criterion: str = "maximin", patch: int | None = None, gap: int | None = None,
                 jitter: int | None = None, tile_size: int | None = None, tile_norm: bool = True,
                 head_hidden_dim: int = 256, flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        self.patch, self.gap, self.jitter = resolve_grid(self.image_size, patch, gap, jitter)
        self.tile_size = int(tile_size if tile_size is not None else tile_input_size(backbone, self.patch))
        self.tile_norm = bool(tile_norm)
        self.flip_p = float(flip_p)
        self.register_buffer("permutations", hamming_permutations(n_perms, 9, perm_seed, perm_criterion))  # (K, 9)
        self.n_perms = int(n_perms)
        self.head = ClassifierHead(9 * backbone.feature_dim, n_perms, hidden_dim=head_hidden_dim)

    def _normalize_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Shape: tiles (B, 9, C, t, t) in [0, 1] → (B, 9, C, t, t)."""
        if not self.tile_norm:
            return normalize_input(tiles.flatten(0, 1)).view_as(tiles)
        mean = tiles.mean(dim=(2, 3, 4), keepdim=True)                 # (B, 9, 1, 1, 1)
        std = tiles.std(dim=(2, 3, 4), keepdim=True)                   # (B, 9, 1, 1, 1)
        return (tiles - mean) / (std + 1e-3)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"tiles": (B, 9, C, t, t) shuffled, "labels": (B,) in [0, K)}."""
        x = prepare_images(images, self.image_size, (1.0, 1.0), self.flip_p, generator)
        tiles = patch_grid(x, 3, self.patch, self.gap, self.jitter, generator)   # (B, 9, C, p, p)
        B = x.shape[0]
        labels = randint(0, self.n_perms, (B,), generator, x.device)             # (B,)
        order = self.permutations.to(x.device)[labels]                           # (B, 9) tile at each position
        shuffled = tiles[torch.arange(B, device=x.device)[:, None], order]       # (B, 9, C, p, p)
        shuffled = self._normalize_tiles(resize_tiles(shuffled, self.tile_size)) # (B, 9, C, t, t)
        return {"tiles": shuffled, "labels": labels}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["tiles"] (B, 9, C, t, t), views["labels"] (B,)."""
        tiles = views["tiles"]
        B = tiles.shape[0]
        feats = self.backbone(tiles.flatten(0, 1))             # (9B, D)
        logits = self.head(feats.reshape(B, -1))               # (B, 9D) → (B, K)
        loss = F.cross_entropy(logits, views["labels"])
        accuracy = (logits.argmax(dim=1) == views["labels"]).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}
