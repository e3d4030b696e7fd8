"""SwAV: swapped prediction of Sinkhorn cluster assignments between multi-crop views."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models import distributed as D
from ssl_models.augment import ViewConfig, check_images, multi_crop, resolve_view_config
from ssl_models.heads import ProjectionMLP, SwAVPrototypes
from ssl_models.losses import sinkhorn
from ssl_models.objectives.base import Objective


class SwAV(Objective):
    """Swapping Assignments between Views.

    Caron, Misra, Mairal, Goyal, Bojanowski, Joulin (2020), "Unsupervised Learning of Visual
    Features by Contrasting Cluster Assignments". Each crop t gives z_t = g(f(x_t))/‖·‖ and
    prototype scores z_tᵀC (C: K unit-norm prototypes). For each of the 2 global crops s, codes
    q_s = Sinkhorn(z_sᵀC; ε, iterations) (:func:`ssl_models.losses.sinkhorn`, equipartitioned
    over the global batch across ranks, no gradient); every other crop t (global or local)
    predicts them, eq. (1)-(2)::

        ℓ(z_t, q_s) = −Σ_k q_s^(k) · log softmax_k(z_tᵀC / τ)

        L = 1/n_global · Σ_s 1/(n_crops − 1) · Σ_{t ≠ s} mean_batch ℓ(z_t, q_s)

    Multi-crop (§3.2): ``n_global`` crops at ``image_size`` (scale ``global_scale``) and
    ``n_local`` small crops (side ``local_size``, scale ``local_scale``). The prototypes are
    renormalised to the unit sphere after every step (:meth:`after_step`), and frozen for the
    first ``freeze_prototypes_steps`` steps: their gradient is exactly zero then (the scores use
    ``C.detach() + 0·C``, so DDP still sees the parameter used; with zero gradient any weight
    decay only rescales C, which the renormalisation undoes).

    Optional queue (§4.3, small batches): the global-crop embeddings of the last
    ``queue_length`` samples of the *global* batch are kept; once ``self.step >=
    queue_start_steps`` the queue is filled, and once full its scores are prepended to the
    batch's for Sinkhorn, so the equipartition is over batch + queue. The queue is written in
    :meth:`after_step`, once per step, with the embeddings gathered from every rank, so every
    rank holds the same queue (DDP's buffer broadcast cannot disturb it) and rank r feeds its
    share, rows r, r + W, r + 2W, …, to the distributed Sinkhorn: each queued sample counts once,
    as with SwAV's per-rank queues of length queue_length / W.

    ``self.step`` counts steps: :meth:`after_step` increments it, and ``set_progress`` (called by
    the training loop) sets it.

    Args:
        n_prototypes: K. out_dim: embedding size. hidden_dim: projection MLP width (feature_dim
            if None). batch_norm: BatchNorm in the projection MLP.
        temperature: τ (0.1). epsilon: ε (0.05). sinkhorn_iterations: 3.
        n_global, n_local, local_size, global_scale, local_scale: multi-crop.
        freeze_prototypes_steps: steps with frozen prototypes.
        queue_length, queue_start_steps: the optional queue (0 = none).
        global_view, local_view: further augmentation overrides (ViewConfig or dict).
    """

    name = "swav"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 n_prototypes: int = 300, out_dim: int = 128, hidden_dim: Optional[int] = None,
                 batch_norm: bool = True, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, n_global: int = 2, n_local: int = 4,
                 local_size: Optional[int] = None, global_scale: tuple[float, float] = (0.14, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.14), freeze_prototypes_steps: int = 100,
                 queue_length: int = 0, queue_start_steps: int = 0,
                 global_view: "ViewConfig | dict | None" = None, local_view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        if temperature <= 0 or epsilon <= 0:
            raise ValueError(f"SwAV: temperature and epsilon must be > 0 (0.1 and 0.05), got {temperature}, {epsilon}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"SwAV: sinkhorn_iterations must be >= 1 (3 in the paper), got {sinkhorn_iterations}")
        if n_global < 1 or n_local < 0 or n_global + n_local < 2:
            raise ValueError(f"SwAV: need n_global >= 1, n_local >= 0 and at least 2 crops, got {n_global}, {n_local}")
        if n_prototypes < 2:
            raise ValueError(f"SwAV: n_prototypes must be >= 2 (e.g. 300 or 3000), got {n_prototypes}")
        if queue_length < 0 or queue_start_steps < 0 or freeze_prototypes_steps < 0:
            raise ValueError("SwAV: queue_length, queue_start_steps and freeze_prototypes_steps must be >= 0")
        self.n_prototypes = int(n_prototypes)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.n_global, self.n_local = int(n_global), int(n_local)
        self.local_size = int(local_size) if local_size else max(8, round(self.image_size * 96 / 224))
        self.freeze_prototypes_steps = int(freeze_prototypes_steps)
        self.queue_length = int(queue_length)
        self.queue_start_steps = int(queue_start_steps)
        self.projection = ProjectionMLP(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim,
                                        layers=2, batch_norm=batch_norm)
        self.prototypes = SwAVPrototypes(out_dim, n_prototypes)
        # Queue of global-crop embeddings, newest first, and how many rows hold real embeddings.
        self.register_buffer("queue", torch.zeros(self.n_global, self.queue_length, out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: list[torch.Tensor] = []
        self.global_view_config = resolve_view_config(global_view, ViewConfig(size=self.image_size, scale=tuple(global_scale)))
        self.local_view_config = resolve_view_config(local_view, ViewConfig(size=self.local_size, scale=tuple(local_scale)))

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Multi-crop.

        Shape: images (B, C, H, W) uint8 → {"global": (n_global, B, C, S, S),
        "local": (n_local, B, C, s, s)} with S = image_size, s = local_size.
        """
        check_images(images, self.in_channels, "SwAV")
        crops = multi_crop(images, self.global_view_config, self.local_view_config,
                           self.n_global, self.n_local, generator=generator)
        B, C = images.shape[:2]
        local = (torch.stack(crops[self.n_global:]) if self.n_local else
                 crops[0].new_zeros(0, B, C, self.local_size, self.local_size))
        return {"global": torch.stack(crops[:self.n_global]), "local": local}

    @property
    def view_config(self) -> ViewConfig:
        """The global crops' augmentation (its mean/std are what ``preprocess`` normalises with)."""
        return self.global_view_config

    @property
    def prototypes_frozen(self) -> bool:
        return int(self.step) < self.freeze_prototypes_steps

    def _embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Shape: crops (n, B, C, s, s) → (n·B, out_dim), L2-normalised."""
        return F.normalize(self.projection(self.backbone(crops.flatten(0, 1))), dim=1)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["global"] (n_global, B, C, S, S), views["local"] (n_local, B, C, s, s) → {"loss": (), ...}."""
        g, loc = views["global"], views.get("local")
        n_g, B = g.shape[:2]
        z = self._embed(g)                                                       # (n_g·B, D)
        if loc is not None and loc.shape[0] > 0:
            z = torch.cat([z, self._embed(loc)], dim=0)                          # (n_crops·B, D)
        n_crops = z.shape[0] // B
        if n_crops < 2:
            raise ValueError("SwAV.forward needs at least 2 crops; build the views with make_views")
        w = self.prototypes.layer.weight                                         # (K, D)
        if self.prototypes_frozen:
            w = w.detach() + 0.0 * w                                             # zero gradient, still "used"
        scores = (z @ w.T).view(n_crops, B, -1)                                  # (n_crops, B, K)
        use_queue = self.queue_length > 0 and int(self.queue_filled) >= self.queue_length
        loss = torch.zeros((), device=z.device)                                  # float32, also under autocast
        entropy = torch.zeros((), device=z.device)
        for s in range(n_g):
            with torch.no_grad():
                sc = scores[s].detach()                                          # (B, K)
                if use_queue:
                    share = self.queue[s, D.rank()::D.world_size()]              # (≈Q/W, D)
                    sc = torch.cat([share @ w.detach().T, sc], dim=0)            # (Q/W + B, K)
                q = sinkhorn(sc, self.epsilon, self.sinkhorn_iterations)[-B:]    # (B, K)
                entropy += -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean()
            sub = torch.zeros((), device=z.device)
            for t in range(n_crops):
                if t != s:
                    logp = F.log_softmax(scores[t] / self.temperature, dim=1)    # (B, K)
                    sub = sub - (q * logp).sum(dim=1).mean()
            loss = loss + sub / (n_crops - 1)
        loss = loss / n_g
        if self.training and self.queue_length > 0:
            mine = z[: n_g * B].detach().view(n_g, B, -1).transpose(0, 1)       # (B, n_g, D)
            self._pending.append(D.concat_all_gather_no_grad(mine.contiguous()).transpose(0, 1))   # (n_g, W·B, D)
        return {"loss": loss, "code_entropy": entropy / n_g, "prototypes_frozen": float(self.prototypes_frozen),
                "queue_in_use": float(use_queue)}

    @torch.no_grad()
    def after_step(self) -> None:
        """Renormalise the prototypes, fill the queue (once started), count the step."""
        self.prototypes.normalize()
        if self.queue_length > 0 and int(self.step) >= self.queue_start_steps:
            for emb in self._pending:
                self._enqueue(emb)
        self._pending.clear()
        self.step.add_(1)

    @torch.no_grad()
    def _enqueue(self, emb: torch.Tensor) -> None:
        """Newest first: shift the queue down by N and write the batch on top. Shape: emb (n_global, N, D)."""
        b = min(emb.shape[1], self.queue_length)
        self.queue[:, b:] = self.queue[:, :-b].clone() if b < self.queue_length else self.queue[:, b:]
        self.queue[:, :b] = emb[:, -b:].to(self.queue.dtype)
        self.queue_filled.fill_(min(self.queue_length, int(self.queue_filled) + b))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_prototypes={self.n_prototypes}, temperature={self.temperature}, "
                f"epsilon={self.epsilon}, crops={self.n_global}+{self.n_local}, queue_length={self.queue_length}")
