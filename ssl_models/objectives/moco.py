"""MoCo v2: a momentum key encoder and a queue of keys as negatives."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models import distributed as D
from ssl_models.augment import ViewConfig, check_images, resolve_view_config, two_views
from ssl_models.heads import ProjectionMLP
from ssl_models.losses import info_nce
from ssl_models.objectives.base import Objective

KEY_BN = ("shuffle", "sync", "none")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters do not require grad (a momentum/target encoder).

    No gradient flows into it, and DistributedDataParallel, which only reduces parameters that
    require grad, leaves it alone; every rank updates it identically from the synchronised
    online parameters.
    """
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def momentum_update(target: Iterable[nn.Parameter], online: Iterable[nn.Parameter], m: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online, parameter by parameter (buffers untouched)."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"momentum_update: {len(target)} target vs {len(online)} online parameters; "
                         f"the target must be a copy of the online network")
    for t, o in zip(target, online):
        t.mul_(m).add_(o.detach(), alpha=1.0 - m)


class MoCo(Objective):
    """MoCo v2: momentum contrast with an MLP head and strong augmentation.

    He, Fan, Wu, Xie, Girshick (2020), "Momentum Contrast for Unsupervised Visual Representation
    Learning"; Chen, Fan, Girshick, He (2020), "Improved Baselines with Momentum Contrastive
    Learning". A query q = g(f(x̃₁)) and a key k = g_k(f_k(x̃₂)) from a momentum copy of the
    encoder, both L2-normalised; the queue holds the keys of the previous batches as negatives.
    InfoNCE, eq. (1) of MoCo::

        L_q = −log [ exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_{k₋ ∈ queue} exp(q·k₋/τ)) ]

    and after each optimizer step (in :meth:`after_step`) θ_k ← m·θ_k + (1 − m)·θ_q, then the keys
    of that step, gathered from every rank (so every rank holds the same queue), replace the
    oldest entries. The queue is therefore updated exactly once per optimizer step, with the
    keys of every ``forward`` made since the last step (several with gradient accumulation), and
    never while a backward pass could still need it.

    ``key_bn`` keeps the key encoder's BatchNorm from leaking which key matches which query
    (MoCo §3.3): ``"shuffle"`` (distributed: gather the key images from all ranks, permute them
    with a permutation from rank 0, encode this rank's share, un-shuffle the keys; single process:
    permute the batch and encode it in ``shuffle_groups`` separate sub-batches, each with its own
    BatchNorm statistics, then un-permute); ``"sync"`` (the key encoder's BatchNorm layers become
    ``SyncBatchNorm``, global statistics under DDP; needs GPUs with NCCL); ``"none"``.

    Args:
        temperature: τ (0.2 in MoCo v2).
        momentum: m (0.999 in the paper's 65536-key ImageNet runs; 0.99 suits small runs).
        queue_size: number of keys K in the queue.
        hidden_dim, out_dim: MoCo v2's 2-layer MLP head (no BatchNorm).
        key_bn: "shuffle", "sync" or "none".
        shuffle_groups: sub-batches for the single-process shuffle.
        view: the augmentation (MoCo v2 = SimCLR's with crop scale from 0.2).
    """

    name = "moco"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 temperature: float = 0.2, momentum: float = 0.99, queue_size: int = 4096,
                 hidden_dim: Optional[int] = None, out_dim: int = 128, key_bn: str = "shuffle",
                 shuffle_groups: int = 2, view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if temperature <= 0:
            raise ValueError(f"MoCo: temperature must be > 0 (MoCo v2 uses 0.2), got {temperature}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MoCo: momentum must be in [0, 1] (e.g. 0.99 or 0.999), got {momentum}")
        if queue_size < 1:
            raise ValueError(f"MoCo: queue_size must be >= 1 (e.g. 4096 or 65536), got {queue_size}")
        if key_bn not in KEY_BN:
            raise ValueError(f"MoCo: key_bn must be one of {KEY_BN}, got {key_bn!r}")
        if shuffle_groups < 1:
            raise ValueError(f"MoCo: shuffle_groups must be >= 1, got {shuffle_groups}")
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.queue_size = int(queue_size)
        self.key_bn = key_bn
        self.shuffle_groups = int(shuffle_groups)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim,
                                        layers=2, batch_norm=False)
        self.key_backbone = momentum_copy(backbone)
        self.key_projection = momentum_copy(self.projection)
        if key_bn == "sync":
            self.key_backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.key_backbone)
        # The queue: (K, out_dim) L2-normalised keys and the next slot to write. Buffers, so a
        # checkpoint restores them (DDP's buffer broadcast is harmless: all ranks hold the same).
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: list[torch.Tensor] = []        # gathered keys awaiting after_step
        self.view_config = resolve_view_config(view, ViewConfig(size=self.image_size))

    # ------------------------------------------------------------------ views
    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Query and key views. Shape: images (B, C, H, W) uint8 → {"query", "key"}: (B, C, S, S)."""
        check_images(images, self.in_channels, "MoCo")
        q, k = two_views(images, self.view_config, generator=generator)
        return {"query": q, "key": k}

    # ------------------------------------------------------------------ keys
    def _encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (N, C, S, S) → (N, out_dim), L2-normalised."""
        return F.normalize(self.key_projection(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of the local key views, with the BatchNorm treatment ``key_bn`` asks for.

        Shape: x (B, C, S, S) → (B, out_dim).
        """
        if self.key_bn != "shuffle":
            return self._encode_keys(x)
        if D.world_size() > 1:
            return self._keys_shuffled_across_ranks(x)
        return self._keys_shuffled_locally(x)

    def _keys_shuffled_across_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """MoCo's batch shuffle across ranks. Shape: x (B, C, S, S) → (B, out_dim)."""
        n, r = x.shape[0], D.rank()
        x_all = D.concat_all_gather_no_grad(x)                           # (W·B, C, S, S)
        perm = D.broadcast(torch.randperm(x_all.shape[0], device=x.device), src=0)   # same on every rank
        k_mine = self._encode_keys(x_all[perm[r * n:(r + 1) * n]])       # (B, out_dim), shuffled share
        k_all = D.concat_all_gather_no_grad(k_mine)                      # (W·B, out_dim), k_all[j] ↔ x_all[perm[j]]
        unperm = torch.argsort(perm)                                     # k_all[unperm[i]] ↔ x_all[i]
        return k_all[unperm[r * n:(r + 1) * n]]

    def _keys_shuffled_locally(self, x: torch.Tensor) -> torch.Tensor:
        """Single-process stand-in: permute, encode in sub-batches, un-permute. Shape: (B, ...) → (B, out_dim)."""
        n = x.shape[0]
        groups = max(1, min(self.shuffle_groups, n // 2))                # BatchNorm needs >= 2 per group
        perm = torch.randperm(n, device=x.device)
        k = torch.cat([self._encode_keys(chunk) for chunk in x[perm].chunk(groups)], dim=0)   # (B, out_dim)
        return k[torch.argsort(perm)]

    # ------------------------------------------------------------------ loss
    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["query"], views["key"] (B, C, S, S) → {"loss": (), "pos_cosine": (), "neg_cosine": ()}."""
        q = F.normalize(self.projection(self.backbone(views["query"])), dim=1)   # (B, out_dim)
        k = self._keys(views["key"])                                              # (B, out_dim), no grad
        queue = self.queue.clone()                    # (K, out_dim); after_step writes the buffer in place
        loss = info_nce(q, k, queue, self.temperature, normalize=False)
        if self.training:
            self._pending_keys.append(D.concat_all_gather_no_grad(k))             # (W·B, out_dim)
        with torch.no_grad():
            pos = (q * k).sum(dim=1).mean()
            neg = (q @ queue.T).mean()
        return {"loss": loss, "pos_cosine": pos, "neg_cosine": neg}

    # ------------------------------------------------------------------ after the optimizer step
    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum-update the key encoder, then enqueue the keys of this step (once)."""
        momentum_update(self.key_parameters(), self.query_parameters(), self.momentum)
        for keys in self._pending_keys:
            self._enqueue(keys)
        self._pending_keys.clear()

    def query_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projection.parameters())

    def key_parameters(self) -> list[nn.Parameter]:
        return list(self.key_backbone.parameters()) + list(self.key_projection.parameters())

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write keys over the oldest entries (a ring buffer). Shape: keys (N, out_dim)."""
        keys = keys[-self.queue_size:]                                   # more keys than slots: keep the newest
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size   # (N,)
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % self.queue_size))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, temperature={self.temperature}, momentum={self.momentum}, "
                f"queue_size={self.queue_size}, key_bn={self.key_bn!r}")
