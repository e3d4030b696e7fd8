"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018, InstDisc).

Cosine similarity between L2-normalised features; each of the k nearest bank samples votes for
its class with weight exp(s/T). Used by the online monitor during pretraining (k=20) and by the
``knn`` evaluation protocol (k=200, T=0.1 by default).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 512,
                     device: str | torch.device = "cpu",
                     progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Apply ``fn`` (uint8 batch → features) in batches; ``progress(n)`` after each batch of n images.

    Shape: images (N, C, H, W) → (N, D) float32."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(fn(images[i:i + batch_size].to(device)).float().cpu())
        if progress is not None:
            progress(len(out[-1]))
    return torch.cat(out)


@torch.no_grad()
def extract_features_sharded(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 512,
                             device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`extract_features` with the work split over the ranks of the process group: each rank
    embeds one contiguous share of ``images`` and every rank gets all N features, in order. A
    collective: every rank calls it with the same images. Without a process group it is
    :func:`extract_features`. Shape: images (N, C, H, W) → (N, D) float32 on the CPU."""
    from ssl_models import distributed as D

    world, rank = D.world_size(), D.rank()
    if not D.is_distributed() or world == 1:
        return extract_features(fn, images, batch_size, device)
    n = len(images)
    share = -(-n // world)
    # the last shares repeat the final image, so that every rank sends the same shape
    idx = torch.arange(rank * share, (rank + 1) * share).clamp(max=n - 1)
    mine = extract_features(fn, images[idx], batch_size, device)
    return D.concat_all_gather_no_grad(mine.to(device)).cpu()[:n]


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, n_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of each query: Σ over its k nearest bank rows of exp(cos/T) for that row's class.

    Shape: bank (N, D), bank_labels (N,), queries (M, D) → scores (M, n_classes).
    """
    if len(bank) == 0:
        raise ValueError("knn: empty feature bank")
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    scores = []
    for i in range(0, len(queries), chunk):
        q = F.normalize(queries[i:i + chunk].float(), dim=1)
        sim = q @ bank.T                                            # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)                       # (m, k)
        weights = (top_sim / temperature).exp()                     # (m, k)
        votes = torch.zeros(len(q), n_classes)
        votes.scatter_add_(1, bank_labels[top_idx], weights)        # (m, C)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 n_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy (fraction) of weighted kNN."""
    pred = knn_predict(bank, bank_labels, queries, n_classes, k, temperature).argmax(1)
    return float((pred == query_labels).float().mean())


@torch.no_grad()
def knn_scores_multilabel(bank: torch.Tensor, bank_targets: torch.Tensor, queries: torch.Tensor, k: int = 200,
                          temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Multi-label kNN: each of the k nearest bank rows adds exp(cos/T) to every class it holds.

    Shape: bank (N, D), bank_targets (N, C) multi-hot, queries (M, D) → scores (M, C).
    """
    if len(bank) == 0:
        raise ValueError("knn: empty feature bank")
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    targets = bank_targets.float()
    scores = []
    for i in range(0, len(queries), chunk):
        q = F.normalize(queries[i:i + chunk].float(), dim=1)
        top_sim, top_idx = (q @ bank.T).topk(k, dim=1)                          # (m, k)
        weights = (top_sim / temperature).exp()                                 # (m, k)
        scores.append(torch.einsum("mk,mkc->mc", weights, targets[top_idx]))    # (m, C)
    return torch.cat(scores)
