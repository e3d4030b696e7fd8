"""A small Vision Transformer (Dosovitskiy et al. 2021), usable as a backbone and as MAE's encoder.

Conv patch embedding, a learnable class token, fixed 2-D sine-cosine position embeddings (as in
MAE, He et al. 2021), pre-norm blocks using ``F.scaled_dot_product_attention``, and a final
LayerNorm. ``forward`` returns the class-token feature, so the ViT drops into every place a
ResNet does; ``forward_encoder`` runs only the visible patches, for MAE.

    >>> vit = VisionTransformer(in_channels=1, image_size=28, patch_size=4, dim=32, depth=2, heads=2)
    >>> vit(torch.rand(8, 1, 28, 28)).shape
    torch.Size([8, 32])
    >>> latent, mask, ids_restore = vit.forward_encoder(torch.rand(8, 1, 28, 28), mask_ratio=0.75)
    >>> latent.shape, mask.shape                     # 49 patches, 12 kept, plus the class token
    (torch.Size([8, 13, 32]), torch.Size([8, 49]))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.rng import rand


def random_masking(B: int, N: int, ratio: float, generator: torch.Generator | None = None, device=None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's random masking: shuffle the N patches of each sample, keep the first N_keep.

    N_keep = ⌊N · (1 − ratio)⌋ (as in MAE; with a 1e−6 tolerance so 10 · (1 − 0.9) keeps 1), at least
    1, the same for every sample (so the kept tokens batch).
    The patches with the lowest ``noise`` are kept; ``noise`` is drawn uniformly if not given.

    Shape:
        noise: (B, N), optional.
        Returns ids_keep (B, N_keep), the indices of the visible patches; mask (B, N) float with
        1 = masked, 0 = visible; ids_restore (B, N), the inverse of the shuffle.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}; MAE uses 0.75")
    n_keep = max(1, int(N * (1.0 - ratio) + 1e-6))
    if noise is None:
        noise = rand((B, N), generator, device)
    elif tuple(noise.shape) != (B, N):
        raise ValueError(f"noise must have shape (B, N) = {(B, N)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)                  # (B, N) ascending: kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)            # (B, N)
    ids_keep = ids_shuffle[:, :n_keep]                         # (B, N_keep)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)                  # (B, N) back in patch order
    return ids_keep, mask, ids_restore


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, one row per patch (row-major), zeros for the cls token.

    Half of the channels encode the patch row, half the column; each half is [sin(pos·ω), cos(pos·ω)]
    with ω_k = 1 / 10000^(k / (dim/4)), k = 0 … dim/4 − 1.

    Shape: returns (1 + grid_h·grid_w, dim) if ``cls_token`` else (grid_h·grid_w, dim).
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got dim={dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)   # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    angle_r = rows.reshape(-1, 1) * omega[None]                                     # (N, dim/4)
    angle_c = cols.reshape(-1, 1) * omega[None]                                     # (N, dim/4)
    emb = torch.cat([angle_r.sin(), angle_r.cos(), angle_c.sin(), angle_c.cos()], dim=1)  # (N, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)         # (1 + N, dim)
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash/memory-efficient
    kernels where the device has them).

    Shape: x (B, T, dim) → (B, T, dim).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}); change one of them")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 × (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v)                    # (B, h, T, d)
        y = y.transpose(1, 2).reshape(B, T, D)                         # (B, T, h·d)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    Shape: x (B, T, dim) → (B, T, dim).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT encoder: image (B, C, H, W) → class-token feature (B, dim).

    Args:
        in_channels: image channels (1 for Fashion-MNIST, 3 for RGB).
        image_size: side of the (square) input; fixed, because the position embeddings are.
        patch_size: side of each patch; must divide ``image_size``.
        dim, depth, heads, mlp_ratio: width, number of blocks, attention heads, MLP expansion.
        name: reported as ``backbone.name`` (``vit_tiny``/``vit_small`` from ``backbones``).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, dim: int = 192,
                 depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, name: str = "vit"):
        super().__init__()
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size}); "
                             f"pick a patch size that divides it, e.g. {_divisors_hint(image_size)}")
        if in_channels < 1 or depth < 1:
            raise ValueError(f"in_channels and depth must be >= 1, got {in_channels}, {depth}")
        if dim % heads != 0 or dim % 4 != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) and by 4 (sin-cos position embeddings)")
        self.name = name
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.feature_dim = dim
        self.dim = dim

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, a function of the geometry only; not saved (persistent=False) since it is rebuilt here.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid_size, self.grid_size)[None],
                             persistent=False)                                  # (1, 1 + N, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

        init_transformer_weights(self)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{self.name} expects images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}; resize the input or build the ViT "
                             f"with image_size={x.shape[-1]}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embeddings (no class token).

        Shape: x (B, C, H, W) → (B, N, dim), N = (H / patch_size)².
        """
        self._check_input(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, dim, h, w) → (B, N, dim)
        return tokens + self.pos_embed[:, 1:]

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)  # (B, 1, dim)
        return torch.cat([cls, tokens], dim=1)                                          # (B, 1 + T, dim)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm.

        Shape: x (B, C, H, W) → (B, 1 + N, dim), the class token first.
        """
        return self._run_blocks(self._with_cls(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (B, C, H, W) float → (B, dim), the class-token feature."""
        return self.forward_features(x)[:, 0]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens of the last two blocks (final LayerNorm applied), laid out on the patch grid.

        Shape: x (B, C, H, W) → [(B, dim, H/patch, W/patch)] × 2 (for frozen-feature evaluation).
        """
        h = self._with_cls(self.embed(x))
        outs = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i >= len(self.blocks) - 2:
                outs.append(self.norm(h)[:, 1:])
        if len(outs) == 1:  # a one-block ViT: its embedding stands in for the earlier stage
            outs.insert(0, self.norm(self.embed(x)))
        g = self.grid_size
        return [t.transpose(1, 2).reshape(t.shape[0], self.dim, g, g) for t in outs]

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE encoder: drop a random ``mask_ratio`` of the patches, encode the visible ones.

        ``noise`` (one uniform number per patch; the lowest are kept) may be given to fix the mask;
        otherwise it is drawn from ``generator``.

        Shape:
            x: (B, C, H, W).
            noise: (B, N), optional.
            Returns latent (B, 1 + N_keep, dim) with the class token first, mask (B, N) with
            1 = masked and 0 = visible, and ids_restore (B, N), the permutation that puts the
            shuffled tokens back in patch order.
        """
        tokens = self.embed(x)                                                    # (B, N, dim)
        B, N, D = tokens.shape
        ids_keep, mask, ids_restore = random_masking(B, N, mask_ratio, generator=generator,
                                                     device=x.device, noise=noise)
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, D))  # (B, N_keep, dim)
        latent = self._run_blocks(self._with_cls(visible))                        # (B, 1 + N_keep, dim)
        return latent, mask, ids_restore

    def extra_repr(self) -> str:
        return (f"name={self.name}, image_size={self.image_size}, patch_size={self.patch_size}, "
                f"num_patches={self.num_patches}, dim={self.dim}, depth={len(self.blocks)}")


def _divisors_hint(n: int) -> list[int]:
    return [d for d in range(2, min(n, 16) + 1) if n % d == 0]
