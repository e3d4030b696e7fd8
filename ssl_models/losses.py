"""Plain loss functions, usable without the objectives.

Each returns the mean over the batch; distances are Euclidean. The ones that need other
workers' samples (``nt_xent``'s negatives, ``sinkhorn``'s marginals) gather or reduce across
ranks when torch.distributed is initialised and do nothing extra in a single process.

>>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
>>> loss = nt_xent(z1, z2, temperature=0.5)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_models import distributed as D


def _fp32(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upcast float16/bfloat16 (autocast outputs) to float32 for distance arithmetic; others unchanged."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts)


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str, names: str = "z1, z2") -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: {names} must both be (N, D) with the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}; flatten features with x.flatten(1)")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

    Chen, Kornblith, Norouzi, Hinton (2020), "A Simple Framework for Contrastive Learning of
    Visual Representations", eq. (1). With u = z/‖z‖ and sim(u, v) = uᵀv, for anchor i whose
    positive is j (the other view of the same image)::

        ℓ(i, j) = −log [ exp(sim(u_i, u_j)/τ) / Σ_{k ≠ i} exp(sim(u_i, u_k)/τ) ]

    where k runs over both views of every image in the (global) batch; the loss is the mean of
    ℓ over all 2M anchors (both views of every image in the global batch of M). When distributed
    and ``gather`` is true, both views are gathered from every rank in one ``all_gather``
    (:func:`ssl_models.distributed.gather_for_global_loss`) and every rank computes the same
    global loss; the backward needs no collective, and DDP's averaging of parameter gradients
    gives the gradient of the global-batch loss, as one process on the whole batch would.

    Shape:
        z1: (N, D) embeddings of the first view.
        z2: (N, D) embeddings of the second view, row i pairs with z1 row i.
        returns: () scalar.
    """
    _check_pair(z1, z2, "nt_xent")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    if gather and D.world_size() > 1:
        both = D.gather_for_global_loss(torch.cat([u1, u2], dim=1))      # (M, 2D), M = W·N
        u1, u2 = both[:, :u1.shape[1]], both[:, u1.shape[1]:]
    m = u1.shape[0]
    z = torch.cat([u1, u2], dim=0)                        # (2M, D): anchors and candidates
    logits = z @ z.T / temperature                        # (2M, 2M)
    i = torch.arange(m, device=z1.device)
    logits = logits.masked_fill(torch.eye(2 * m, dtype=torch.bool, device=z1.device), float("-inf"))
    return F.cross_entropy(logits, torch.cat([m + i, i]))  # the positive of view-1 row i is view-2 row i


def info_nce(query: torch.Tensor, key_pos: torch.Tensor, key_neg: torch.Tensor, temperature: float = 0.2,
             normalize: bool = True) -> torch.Tensor:
    """InfoNCE with one positive key per query and a shared set of negative keys (MoCo).

    van den Oord, Li, Vinyals (2018), "Representation Learning with Contrastive Predictive
    Coding", eq. (4); in MoCo's form (He et al. 2020, eq. 1)::

        L = −log [ exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_{k₋} exp(q·k₋/τ)) ]

    averaged over the queries. With ``normalize`` the rows are L2-normalised first (cosine).

    Shape:
        query: (N, D).
        key_pos: (N, D), row i is the positive of query i.
        key_neg: (M, D), negatives shared by all queries (e.g. MoCo's queue).
        returns: () scalar.
    """
    _check_pair(query, key_pos, "info_nce", "query, key_pos")
    if key_neg.ndim != 2 or key_neg.shape[1] != query.shape[1]:
        raise ValueError(f"info_nce: key_neg must be (M, {query.shape[1]}), got {tuple(key_neg.shape)}")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    if normalize:
        query, key_pos, key_neg = (F.normalize(t, dim=1) for t in (query, key_pos, key_neg))
    pos = (query * key_pos).sum(dim=1, keepdim=True)      # (N, 1)
    neg = query @ key_neg.T                               # (N, M)
    logits = torch.cat([pos, neg], dim=1) / temperature   # (N, 1 + M)
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


def contrastive_margin(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise contrastive loss with a margin.

    Hadsell, Chopra, LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping",
    eq. (4), with D = ‖x1 − x2‖₂ and Y = 0 for a similar pair, Y = 1 for a dissimilar one::

        L = mean[ (1 − Y)·½·D² + Y·½·max(0, m − D)² ]

    D² is computed directly (smooth at D = 0); the norm's gradient at D = 0 is taken as 0.

    Shape:
        x1: (N, D).
        x2: (N, D).
        y: (N,) 0/1 (bool, int or float).
        returns: () scalar.
    """
    _check_pair(x1, x2, "contrastive_margin", "x1, x2")
    if y.shape != (x1.shape[0],):
        raise ValueError(f"contrastive_margin: y must be ({x1.shape[0]},) with 0 = similar, 1 = dissimilar, "
                         f"got {tuple(y.shape)}")
    if margin <= 0:
        raise ValueError(f"contrastive_margin: margin must be > 0, got {margin}")
    x1, x2 = _fp32(x1, x2)
    diff = x1 - x2                                        # (N, D)
    d2 = diff.pow(2).sum(dim=1)                           # (N,)
    d = torch.linalg.vector_norm(diff, dim=1)             # (N,)
    y = y.to(d.dtype)
    return ((1 - y) * 0.5 * d2 + y * 0.5 * F.relu(margin - d).pow(2)).mean()


def triplet_margin(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                   margin: float = 1.0) -> torch.Tensor:
    """Triplet ranking loss.

    Weinberger & Saul (2009); Schroff, Kalenichenko, Philbin (2015), "FaceNet", eq. (1)-(2),
    with Euclidean (not squared) distances d::

        L = mean[ max(0, m + d(a, p) − d(a, n)) ]

    Shape:
        anchor: (N, D).
        positive: (N, D).
        negative: (N, D).
        returns: () scalar.
    """
    _check_pair(anchor, positive, "triplet_margin", "anchor, positive")
    _check_pair(anchor, negative, "triplet_margin", "anchor, negative")
    if margin < 0:
        raise ValueError(f"triplet_margin: margin must be >= 0, got {margin}")
    anchor, positive, negative = _fp32(anchor, positive, negative)
    d_ap = torch.linalg.vector_norm(anchor - positive, dim=1)   # (N,)
    d_an = torch.linalg.vector_norm(anchor - negative, dim=1)   # (N,)
    return F.relu(margin + d_ap - d_an).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition of a batch over K prototypes (SwAV's codes).

    Caron, Misra, Mairal, Goyal, Bojanowski, Joulin (2020), "Unsupervised Learning of Visual
    Features by Contrasting Cluster Assignments", eq. (3) and Algorithm 1 / Appendix A.1;
    Cuturi (2013). Solves max_Q Tr(QᵀCᵀZ) + ε·H(Q) over the transportation polytope where
    each of the K prototypes receives B/K of the (global) batch of B samples::

        Q = Diag(u) · exp(CᵀZ / ε) · Diag(v)

    by ``iterations`` alternating normalisations of the prototype rows (sums reduced over all
    ranks) and the sample columns. The returned assignments Q, one row per local sample, each
    sum to 1; over the global batch, each prototype's column sums to ≈ B/K (exactly in the limit
    of many iterations). The scores are divided by ε and shifted by their global maximum before
    ``exp`` (a constant factor that the normalisations remove), so bounded scores such as cosine
    similarities never overflow.

    Shape:
        scores: (B, K) prototype scores zᵀc of the local samples.
        returns: (B, K) soft assignments, rows summing to 1, no gradient; float32 (float64 for
            float64 scores), also under autocast, since they are targets.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn: scores must be (B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 0:
        raise ValueError(f"sinkhorn: need epsilon > 0 and iterations >= 0, got {epsilon}, {iterations}")
    B, K = scores.shape
    s = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32) / epsilon
    s = s - D.all_reduce_max(s.max())                      # global shift, exp(·) <= 1
    q = torch.exp(s).T                                     # (K, B)
    b_total = D.all_reduce_sum(torch.tensor(float(B), device=q.device))   # global batch size
    q = q / D.all_reduce_sum(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        row = D.all_reduce_sum(q.sum(dim=1, keepdim=True))                # (K, 1) over all ranks
        q = q / row.clamp_min(1e-30) / K                   # each prototype gets mass 1/K
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / b_total     # each sample gets 1/B
    q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30)    # (K, B) columns sum to 1 exactly
    return q.T.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)   # (B, K)


__all__ = ["nt_xent", "info_nce", "contrastive_margin", "triplet_margin", "sinkhorn"]
