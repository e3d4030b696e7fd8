"""Optimizers and schedules for pretraining: SGD, AdamW, LARS; how many steps a run takes; warm-up +
cosine computed up front."""
from __future__ import annotations

import math

import torch
from torch import nn

from workers.config import PretrainConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017), as used by SimCLR and BYOL.

    For each parameter w with gradient g (weight decay λ folded in: g ← g + λw), the update is
    scaled by the trust ratio η‖w‖ / ‖g‖ before SGD momentum. Parameters in groups with
    ``lars_exclude=True`` (biases and norm layers, by convention) take plain SGD steps with no
    weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"LARS: lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / (g_norm + group["eps"]), torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and normalisation parameters without (nor LARS scaling)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer: unknown {name!r}; choose sgd, adamw or lars")


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> list[float]:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine down to ``min_ratio·base_lr``."""
    out = []
    for s in range(total_steps):
        if s < warmup_steps:
            out.append(base_lr * (s + 1) / warmup_steps)
        else:
            t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
            out.append(base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))))
    return out


def schedule_length(config: PretrainConfig, manifest: dict) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) of a run: ``steps`` if set, else ``epochs`` worth.

    With ``budget_minutes`` the total is provisional: the loop replaces it with the steps that fit
    (:func:`workers.pretrain.budget.fit_steps`) after measuring its first steps."""
    from workers.data.loader import steps_per_epoch

    spe = steps_per_epoch(manifest["splits"]["train"]["count"], config.batch_size)
    return spe, config.steps or max(1, math.ceil(config.epochs * spe))

