"""Masked autoencoder: reconstruct masked patches from the visible ones with a ViT."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.objectives.base import Objective
from ssl_models.rng import rand
from ssl_models.vit import Block, VisionTransformer, init_transformer_weights, sincos_pos_embed_2d


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into non-overlapping p×p patches, each flattened in (row, column, channel) order.

    Shape: x (B, C, H, W) with H, W divisible by p → (B, N, p·p·C), N = (H/p)·(W/p), patches row-major.
    """
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}×{W} is not divisible by the patch size {p}; resize or change p")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)                  # (B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)            # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)            # (B, N, p·p·C)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`. ``grid`` = (h, w) patches; square if omitted.

    Shape: x (B, N, p·p·C) → (B, C, h·p, w·p).
    """
    B, N, D = x.shape
    if D != p * p * channels:
        raise ValueError(f"last dimension {D} != p·p·channels = {p * p * channels}; check p and channels")
    if grid is None:
        h = w = int(round(N ** 0.5))
        if h * w != N:
            raise ValueError(f"{N} patches do not form a square grid; pass grid=(h, w)")
    else:
        h, w = grid
    x = x.reshape(B, h, w, p, p, channels)           # (B, h, w, p, p, C)
    x = torch.einsum("bhwpqc->bchpwq", x)            # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)      # (B, C, H, W)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix_loss: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """MAE's loss: mean squared error per patch, averaged over the masked patches only.

        L = Σ_i m_i · ‖x̂_i − t_i‖² / (D · Σ_i m_i),   t_i = (x_i − mean(x_i)) / √(var(x_i) + ε) if norm_pix_loss else x_i

    Shape:
        pred: (B, N, D) predicted patches.
        target: (B, N, D) patchified images (see :func:`~ssl_models.objectives.mae.patchify`).
        mask: (B, N), 1 = masked (counted), 0 = visible (ignored).
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)       # (B, N)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAE(Objective):
    """Masked autoencoder (He, Chen, Xie, Li, Dollár & Girshick 2021, "Masked Autoencoders Are
    Scalable Vision Learners").

    The image is cut into N patches; a random ``mask_ratio`` of them is dropped and the ViT encoder
    sees only the visible ones. A light transformer decoder gets the encoded visible tokens plus a
    shared learned mask token at every masked position (all with fixed sin-cos position
    embeddings) and predicts the pixels of every patch. The loss (:func:`masked_patch_loss`) is
    the squared error on the masked patches only; with ``norm_pix_loss`` each target patch is
    normalised by its own mean and standard deviation (the paper's better variant).

    Args:
        backbone: a :class:`~ssl_models.vit.VisionTransformer` (``backbones.build("vit_tiny", ...)``)
            whose ``image_size`` equals ``image_size``.
        image_size: side of the square views.
        mask_ratio: share of patches masked (0.75 in the paper).
        norm_pix_loss: normalise each target patch (see above).
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer (the paper's is 512 wide
            and 8 deep for ViT-L; small images need far less).
        crop_scale, flip_p: the light view (the paper: random resized crop, scale (0.2, 1), and flip).

    Views: ``{"images": (B, C, S, S) in [0, 1], "noise": (B, N)}``; the mask keeps the patches with
    the lowest noise, so a view fixes its mask. An optional ``"target"`` entry (default: the
    images) is what the loss reconstructs.
    """

    name = "mae"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, mask_ratio: float = 0.75, norm_pix_loss: bool = False,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 crop_scale: tuple[float, float] = (0.5, 1.0), flip_p: float = 0.5):
        if not isinstance(backbone, VisionTransformer):
            name = getattr(backbone, "name", type(backbone).__name__)
            raise ValueError(f"MAE needs a VisionTransformer backbone, got {name!r}; build one with "
                             f"backbones.build('vit_tiny', in_channels=..., image_size={image_size})")
        super().__init__(backbone, image_size)
        if backbone.image_size != self.image_size:
            raise ValueError(f"the ViT was built for image_size={backbone.image_size} but MAE got "
                             f"image_size={image_size}; build both with the same size")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}; the paper uses 0.75")
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.crop_scale = tuple(crop_scale)
        self.flip_p = float(flip_p)
        self.patch_size = backbone.patch_size
        self.num_patches = backbone.num_patches
        grid = backbone.grid_size
        patch_dim = self.patch_size ** 2 * self.in_channels

        self.decoder_embed = nn.Linear(backbone.feature_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, grid, grid)[None],
                             persistent=False)                                   # (1, 1 + N, Dd)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        init_transformer_weights(self.decoder_blocks)
        for m in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"images": (B, C, S, S), "noise": (B, N)}."""
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        noise = rand((x.shape[0], self.num_patches), generator, x.device)
        return {"images": x, "noise": noise}

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch from the encoded visible tokens.

        Shape: latent (B, 1 + N_keep, dim), ids_restore (B, N) → (B, N, p·p·C).
        """
        x = self.decoder_embed(latent)                                           # (B, 1 + K, Dd)
        B, K1, Dd = x.shape
        N = ids_restore.shape[1]
        masks = self.mask_token.expand(B, N + 1 - K1, Dd)                        # (B, N − K, Dd)
        tokens = torch.cat([x[:, 1:], masks], dim=1)                             # (B, N, Dd), shuffled order
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, Dd))  # (B, N, Dd), patch order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed        # (B, 1 + N, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]                    # (B, N, p·p·C)

    def reconstruct(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches and the mask.

        Shape: returns pred (B, N, p·p·C) in the normalised input space, mask (B, N) with 1 = masked.
        """
        x = normalize_input(views["images"])
        latent, mask, ids_restore = self.backbone.forward_encoder(x, self.mask_ratio, noise=views["noise"])
        return self.decode(latent, ids_restore), mask

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["images"] (B, C, S, S) in [0, 1], views["noise"] (B, N)."""
        pred, mask = self.reconstruct(views)
        target = patchify(normalize_input(views.get("target", views["images"])), self.patch_size)  # (B, N, p·p·C)
        loss = masked_patch_loss(pred, target, mask, self.norm_pix_loss)
        return {"loss": loss, "mask_ratio": mask.mean().detach()}
