"""Distributed helpers for the objectives, each a no-op in a single process.

The contrastive losses need tensors from every worker: SimCLR's negatives, MoCo's keys for the
queue, SwAV's Sinkhorn sums. The subtle one is :func:`gather_with_grad`. A plain
``torch.distributed.all_gather`` has no backward, so gradient only flows through the local
slice, and only from the local loss: the other ranks' losses also depend on this rank's
embeddings (as their negatives), and that part of the gradient is lost. Here the backward sums
the incoming gradient over all ranks (``all_reduce``) and returns the local slice, which is
exactly ∂(Σ_r L_r)/∂x_local. DistributedDataParallel then averages parameter gradients over the
W ranks, so the step follows ∂((1/W)·Σ_r L_r)/∂θ: the gradient of the mean loss over the global
batch, the same as one process on the whole batch. (Scaling the sum by W instead, or skipping the
``all_reduce``, gives the "off by the world size" gradients.)

All ranks must pass tensors of the same shape (equal per-rank batch sizes), as ``all_gather``
requires; :func:`gather_with_grad` checks this and says so.

A loss that every rank can compute whole from the gathered tensors (SimCLR's: every anchor
against every candidate) needs no collective in the backward: :func:`gather_for_global_loss`
returns the same (W·N, ...) tensor, and its backward hands this rank W × the local slice of
∂L/∂(all). With L the mean over the global batch, L = (1/W)·Σ_r L_r, so that is exactly
Σ_r ∂L_r/∂x_local, what :func:`gather_with_grad` computes with its ``all_reduce``. One
synchronisation point fewer per step: with two CPU workers, whose speeds drift apart between
collectives, each one is a wait.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if is_distributed() else 0


def rank_offset(local_batch: int) -> int:
    """Index of this rank's first sample in a gathered batch: ``rank() · local_batch``.

    After :func:`gather_with_grad` of (N, D) tensors, sample i of this rank sits at row
    ``rank_offset(N) + i`` of the (W·N, D) result: that is where its positive is.
    """
    return rank() * int(local_batch)


def _check_same_shape(x: torch.Tensor) -> None:
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"gather across ranks needs the same shape on every rank, got "
                         f"{[tuple(s.tolist()) for s in shapes]}; use equal per-rank batch sizes "
                         f"(drop_last=True in the data loader)")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward = local slice of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)                    # (W·N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()                # (W·N, ...) this rank's dL_r/d(all)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)     # Σ_r dL_r/d(all)
        start = dist.get_rank() * ctx.n
        return grad[start:start + ctx.n]                # (N, ...) d(Σ_r L_r)/dx_local


class _GatherForGlobalLoss(torch.autograd.Function):
    """all_gather forward; backward = W × the local slice of the gradient (no communication)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n, ctx.w = x.shape[0], dist.get_world_size()
        out = [torch.empty_like(x) for _ in range(ctx.w)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)                    # (W·N, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        start = dist.get_rank() * ctx.n                 # grad = dL/d(all), L the global-batch loss
        return grad[start:start + ctx.n] * ctx.w        # (N, ...) = Σ_r dL_r/dx_local


def gather_for_global_loss(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks, for a loss computed over the whole global batch on every rank.

    The caller must compute the *same* loss on every rank, the mean over all W·N gathered rows
    (not only the local ones); the backward then needs no communication and gives DDP the same
    gradients as :func:`gather_with_grad` with per-rank losses. Single process: returns ``x``.

    Shape: x (N, ...) → (W·N, ...), rank r's rows at [r·N, (r+1)·N).
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherForGlobalLoss.apply(x)


def gather_with_grad(x: torch.Tensor, check_shapes: bool = False) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, with gradient to the local slice.

    Single process: returns ``x`` itself. ``check_shapes`` first verifies that every rank has
    the same shape (one extra small collective) and raises ``ValueError`` otherwise.

    Shape: x (N, ...) → (W·N, ...), rank r's rows at [r·N, (r+1)·N).
    """
    if not is_distributed() or world_size() == 1:
        return x
    if check_shapes:
        _check_same_shape(x)
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradient (MoCo's keys).

    Shape: x (N, ...) → (W·N, ...).
    """
    if not is_distributed() or world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` itself is untouched). Shape: unchanged."""
    if not is_distributed() or world_size() == 1:
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over ranks (a new tensor). Shape: unchanged."""
    if not is_distributed() or world_size() == 1:
        return x.clone()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor), e.g. for logging a loss. Shape: unchanged."""
    return all_reduce_sum(x) / world_size()


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` from rank ``src`` on every rank (in place; returned for convenience)."""
    if is_distributed() and world_size() > 1:
        dist.broadcast(x, src=src)
    return x


__all__ = [
    "is_distributed", "world_size", "rank", "rank_offset", "gather_with_grad", "gather_for_global_loss",
    "concat_all_gather_no_grad", "all_reduce_sum", "all_reduce_max", "all_reduce_mean", "broadcast",
]
