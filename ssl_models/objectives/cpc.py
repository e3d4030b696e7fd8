"""CPC: contrastive predictive coding over a grid of patch embeddings (rows above predict rows below)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import (ViewConfig, check_images, horizontal_flip, random_resized_crop, resolve_view_config,
                                to_float, view)
from ssl_models.objectives.base import Objective


class CausalRowConv(nn.Module):
    """Context network: residual convolutions that see only the current row and the rows above.

    Each layer pads ``kernel_rows − 1`` rows on top and none below, so output row r depends on
    input rows r − kernel_rows + 1 … r; stacking L layers widens the view upwards (and sideways
    through the 3-wide kernel) without ever looking down. This plays the role of the PixelCNN-style
    autoregressive context of van den Oord et al. (2018) and Hénaff et al. (2019).

    Shape: z (B, in_dim, G, G) → c (B, dim, G, G).
    """

    def __init__(self, in_dim: int, dim: int, layers: int = 2, kernel_rows: int = 2):
        super().__init__()
        if layers < 1 or kernel_rows < 1:
            raise ValueError(f"CausalRowConv needs layers >= 1 and kernel_rows >= 1, got {layers}, {kernel_rows}")
        self.kernel_rows = kernel_rows
        self.inp = nn.Conv2d(in_dim, dim, 1)
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, (kernel_rows, 3)) for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.inp(z)                                                      # (B, dim, G, G)
        for conv in self.convs:
            padded = F.pad(F.relu(c), (1, 1, self.kernel_rows - 1, 0))      # (B, dim, G + k − 1, G + 2)
            c = c + conv(padded)                                             # (B, dim, G, G)
        return c


class CPC(Objective):
    """Contrastive Predictive Coding on image patches (the spatial prediction task).

    van den Oord, Li, Vinyals (2018), "Representation Learning with Contrastive Predictive
    Coding", §3.2 (images); Hénaff, Srinivas, De Fauw, Razavi, Doersch, Eslami, van den Oord
    (2019/2020), "Data-Efficient Image Recognition with Contrastive Predictive Coding". Each image
    is cut into a G×G grid of overlapping p×p patches (stride p/2); the backbone encodes every
    patch, z_{r,c} = f(x_{r,c}) (one batched call on (B·G·G, C, p, p)); a context network g
    (:class:`CausalRowConv`) summarises the rows at and above r, c_{r,c} = g(z_{≤r,·}); a linear
    map W_k per step k = 1…K predicts the patch k rows below, ẑ = W_k c_{r,c}, scored against the
    embeddings of all patches in the batch (the true one and, as negatives, every other patch of
    this and the other images). InfoNCE, eq. (4) of van den Oord et al.::

        L_k = −mean_{b,r,c} log [ exp(ẑ_{b,r,c}ᵀ z_{b,r+k,c}) / Σ_{z_j ∈ batch} exp(ẑ_{b,r,c}ᵀ z_j) ]

        L = mean_k L_k

    Views: one light image-level crop (scale ``image_scale``) and flip, then patches cut and
    augmented one by one, batched (a small random resized crop back to p, flip, colour jitter,
    grayscale: Hénaff et al.'s per-patch augmentation, which keeps low-level cues such as
    chromatic aberration from solving the task). Negatives stay on this rank.

    A note from Hénaff et al.: BatchNorm in the patch encoder lets patches of one image share
    statistics; they replaced it by layer norm. With gelato's BatchNorm backbones the batch
    mixes patches of many images, which weakens that leak; pass a norm-free backbone for the
    paper's setting.

    Args:
        patch_size: p (default max(8, image_size // 4)); stride p // 2;
            G = (image_size − p) // (p // 2) + 1 (6 for 28 px, 7 for 32 px and 224 px / 56).
        prediction_steps: K (default G // 2, at least 1; at most G − 1).
        context_dim, context_layers, context_kernel_rows: the context network.
        image_scale: crop scale of the image-level view.
        patch_view: per-patch augmentation (ViewConfig or dict; its size is p).
    """

    name = "cpc"
    contrastive = True

    def __init__(self, backbone: nn.Module, image_size: int, in_channels: Optional[int] = None,
                 patch_size: Optional[int] = None, prediction_steps: Optional[int] = None,
                 context_dim: Optional[int] = None, context_layers: int = 2, context_kernel_rows: int = 2,
                 image_scale: tuple[float, float] = (0.5, 1.0), patch_view: "ViewConfig | dict | None" = None):
        super().__init__(backbone, image_size, in_channels)
        p = int(patch_size) if patch_size else max(8, self.image_size // 4)
        if p < 2 or p > self.image_size:
            raise ValueError(f"CPC: patch_size must be in [2, image_size={self.image_size}], got {p}")
        self.patch_size = p
        self.stride = max(1, p // 2)
        self.grid = (self.image_size - p) // self.stride + 1
        if self.grid < 2:
            raise ValueError(f"CPC: a {p} px patch with stride {self.stride} gives a {self.grid}×{self.grid} grid "
                             f"on {self.image_size} px images; use a smaller patch_size (at most {self.image_size * 2 // 3})")
        k = int(prediction_steps) if prediction_steps else max(1, self.grid // 2)
        if not 1 <= k <= self.grid - 1:
            raise ValueError(f"CPC: prediction_steps must be in [1, {self.grid - 1}] for a {self.grid}-row grid, got {k}")
        self.prediction_steps = k
        self.image_scale = tuple(image_scale)
        dim = backbone.feature_dim
        cdim = int(context_dim) if context_dim else dim
        self.context = CausalRowConv(dim, cdim, context_layers, context_kernel_rows)
        self.predictors = nn.ModuleList(nn.Linear(cdim, dim, bias=False) for _ in range(k))   # W_1 … W_K
        self.patch_view_config = resolve_view_config(
            patch_view, ViewConfig(size=p, scale=(0.6, 1.0), blur_p=0.0, grayscale_p=0.25, hue=0.1))

    @property
    def view_config(self) -> ViewConfig:
        """The per-patch augmentation (its mean/std are what ``preprocess`` normalises with)."""
        return self.patch_view_config

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Per-patch augmented grid.

        Shape: images (B, C, H, W) uint8 → {"patches": (B, G, G, C, p, p)} float.
        """
        check_images(images, self.in_channels, "CPC")
        B, C = images.shape[:2]
        G, p, s = self.grid, self.patch_size, self.stride
        x = random_resized_crop(to_float(images), self.image_size, self.image_scale, generator=generator)
        x = horizontal_flip(x, 0.5, generator=generator)                        # (B, C, S, S)
        tiles = x.unfold(2, p, s).unfold(3, p, s)                                # (B, C, G', G', p, p)
        tiles = tiles[:, :, :G, :G].permute(0, 2, 3, 1, 4, 5)                    # (B, G, G, C, p, p)
        tiles = tiles.reshape(B * G * G, C, p, p)                                # (B·G·G, C, p, p)
        tiles = view(tiles, self.patch_view_config, generator=generator)         # augmented, normalised
        return {"patches": tiles.view(B, G, G, C, p, p)}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["patches"] (B, G, G, C, p, p) → {"loss": (), "accuracy": ()}."""
        patches = views["patches"]
        B, G = patches.shape[:2]
        z = self.backbone(patches.flatten(0, 2))                                 # (B·G·G, D)
        Dm = z.shape[1]
        grid = z.view(B, G, G, Dm).permute(0, 3, 1, 2)                           # (B, D, G, G)
        c = self.context(grid).permute(0, 2, 3, 1)                               # (B, G, G, Dc)
        idx = torch.arange(B * G * G, device=z.device).view(B, G, G)             # patch index in z
        losses, correct, total = [], torch.zeros((), device=z.device), 0     # float32 count, also under autocast
        for k, W in enumerate(self.predictors, start=1):
            pred = W(c[:, : G - k]).reshape(-1, Dm)                              # (B·(G−k)·G, D)
            target = idx[:, k:].reshape(-1)                                      # (B·(G−k)·G,) row r+k
            logits = pred @ z.T                                                  # (B·(G−k)·G, B·G·G)
            losses.append(F.cross_entropy(logits, target))
            with torch.no_grad():
                correct += (logits.argmax(dim=1) == target).float().sum()
                total += target.numel()
        loss = torch.stack(losses).mean()
        return {"loss": loss, "accuracy": correct / max(1, total)}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, patch_size={self.patch_size}, grid={self.grid}, "
                f"prediction_steps={self.prediction_steps}")
