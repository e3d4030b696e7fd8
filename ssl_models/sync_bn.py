"""Batch norm over the global batch, on any device: what ``sync_bn: true`` turns on.

SimCLR and BYOL normalise with the statistics of the whole batch across workers (SimCLR, Chen
et al. 2020, §B.8 "Global BN"): with per-worker statistics the network can tell which samples
share a worker and "cheat" the contrastive task. torch's ``nn.SyncBatchNorm`` does it on CUDA
only (it raises on CPU tensors), so a laptop run of a config with ``sync_bn: true`` would stop
at the first step. :func:`convert_sync_batchnorm` picks torch's module on GPU and
:class:`GlobalBatchNorm` on CPU:

    n = Σ_r n_r,   μ = (1/n) Σ_r Σ_{i∈r} x_i,   σ² = (1/n) Σ_r Σ_{i∈r} x_i² − μ²,
    y = γ · (x − μ) / √(σ² + ε) + β,

per channel, with the three sums all-reduced in one call. That all-reduce is differentiable:
its backward all-reduces the incoming gradient, ∂(Σ_s L_s)/∂(local sums) = Σ_s ∂L_s/∂(global
sums), which DDP's averaging turns into the gradient of the mean loss, as for one process on the
whole batch (tests/ssl_models/test_distributed.py checks outputs, gradients and running
statistics against that). The sums are taken in float64, so E[x²] − μ² does not cancel badly.
Outside a process group, in eval mode, or with one rank, it is plain batch norm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradient over ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the global batch (any device)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                           xd.new_full((1,), x.numel() // x.shape[1])])
        sums = _AllReduceSum.apply(local)
        c = x.shape[1]
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps)
        scale = inv if self.weight is None else inv * self.weight.double()
        shift = -mean * scale if self.bias is None else self.bias.double() - mean * scale
        # x·scale + shift in x's working precision (float32 under CPU bf16 autocast, as batch_norm)
        dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        y = x.to(dtype) * scale.to(dtype).view(shape) + shift.to(dtype).view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm*d in ``module`` normalised over the global batch: torch's ``SyncBatchNorm``
    on CUDA (its fused kernels), :class:`GlobalBatchNorm` elsewhere (CPU and the rest)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global(module)


def _to_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=_device_of(module), dtype=_dtype_of(module))
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global(child))
    return out


def _device_of(m: nn.Module):
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return None if t is None else t.device


def _dtype_of(m: nn.Module):
    t = next(iter(m.parameters()), None)
    return None if t is None else t.dtype


__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm"]
