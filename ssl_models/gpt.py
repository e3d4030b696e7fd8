"""A small image GPT (Chen et al. 2020): a causal transformer over palette-quantised pixels, usable
as a backbone (features of a middle layer) and as the ``igpt`` objective's next-pixel predictor.

The network takes the same float image every other backbone takes (``objective.preprocess``: in
[0, 1], then normalised with ``mean``/``std``), undoes the normalisation, average-pools the image
to ``seq_size`` × ``seq_size`` and maps each pixel to the nearest colour of a fixed palette: a token
in [0, K). The tokens, in raster order and shifted right behind a start-of-sequence token, go
through pre-norm transformer blocks whose attention is causal, so position i sees pixels < i only.
``forward`` returns the mean over positions of the layer-normalised hidden states after block
``probe_layer`` (the paper probes such a middle layer: the last ones specialise in predicting
pixels); ``forward_tokens`` runs every block and also returns the next-pixel logits.

    >>> gpt = ImageGPT(in_channels=1, seq_size=8, levels=16, dim=32, depth=2, heads=2)
    >>> x = torch.rand(4, 1, 28, 28) * 2 - 1                 # normalised with 0.5 / 0.5
    >>> gpt(x).shape
    torch.Size([4, 32])
    >>> tokens = gpt.tokenize(x)                              # (4, 64) in [0, 16)
    >>> logits, features = gpt.forward_tokens(tokens)
    >>> logits.shape
    torch.Size([4, 64, 16])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.vit import Attention, Block, init_transformer_weights


def grid_palette(channels: int, levels: int) -> torch.Tensor:
    """Every colour whose channels each take one of ``levels`` evenly spaced values in [0, 1]
    (16 grey levels for 1 channel; levels³ colours for RGB, 8 → 512 = the paper's 9 bits).

    Shape: returns (levels ** channels, channels), the last channel varying fastest.
    """
    if levels < 2:
        raise ValueError(f"a palette needs at least 2 levels per channel, got {levels}")
    axis = torch.linspace(0.0, 1.0, levels)
    grids = torch.meshgrid(*([axis] * channels), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def rgb332_palette() -> torch.Tensor:
    """The 3-3-2 bit RGB palette: 8 red × 8 green × 4 blue levels, 256 colours (one byte).

    Shape: returns (256, 3), blue varying fastest.
    """
    r, g, b = (torch.linspace(0.0, 1.0, n) for n in (8, 8, 4))
    return torch.stack([t.reshape(-1) for t in torch.meshgrid(r, g, b, indexing="ij")], dim=1)


class CausalAttention(Attention):
    """:class:`~ssl_models.vit.Attention` with a causal mask: position i attends to positions ≤ i.

    Shape: x (B, T, dim) → (B, T, dim).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 × (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # (B, h, T, d)
        y = y.transpose(1, 2).reshape(B, T, D)                         # (B, T, h·d)
        return self.proj(y)


class CausalBlock(Block):
    """Pre-norm transformer block (:class:`~ssl_models.vit.Block`) with causal attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__(dim, heads, mlp_ratio)
        self.attn = CausalAttention(dim, heads)


class ImageGPT(nn.Module):
    """Causal transformer over palette tokens: image (B, C, H, W) → mean-pooled middle-layer feature (B, dim).

    Args:
        in_channels: image channels (1: grey palette; 3: RGB palette).
        seq_size: side of the pooled image the sequence is read from (N = seq_size² tokens); any
            input size ≥ it works (average pooling), so the input size is not fixed.
        levels: grey levels for 1 channel (default 16); for RGB, None gives the 3-3-2 palette (256
            colours) and an int a uniform grid of levels³ colours.
        dim, depth, heads, mlp_ratio: width, number of blocks, attention heads, MLP expansion.
        probe_layer: the block whose output ``forward`` pools (1-based; default depth // 2).
        mean, std: the normalisation of the input, undone before quantising (the views' 0.5 / 0.5).
        name: reported as ``backbone.name``.
    """

    def __init__(self, in_channels: int = 1, seq_size: int = 14, levels: int | None = None, dim: int = 128,
                 depth: int = 8, heads: int = 4, mlp_ratio: float = 4.0, probe_layer: int | None = None,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), name: str = "igpt"):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"an image GPT has a palette for 1 or 3 channels, got in_channels={in_channels}")
        if seq_size < 2 or depth < 1:
            raise ValueError(f"seq_size must be >= 2 and depth >= 1, got {seq_size}, {depth}")
        probe_layer = max(1, depth // 2) if probe_layer is None else probe_layer
        if not 1 <= probe_layer <= depth:
            raise ValueError(f"probe_layer must be in [1, depth={depth}], got {probe_layer}")
        if in_channels == 1:
            palette = grid_palette(1, 16 if levels is None else levels)
        else:
            palette = rgb332_palette() if levels is None else grid_palette(3, levels)
        self.name = name
        self.in_channels = in_channels
        self.seq_size = seq_size
        self.seq_len = seq_size * seq_size
        self.feature_dim = dim
        self.dim = dim
        self.probe_layer = probe_layer
        self.vocab_size = len(palette)
        # Functions of the arguments only: not saved, rebuilt here (as the ViT's position embeddings).
        self.register_buffer("palette", palette, persistent=False)                      # (K, C)
        self.register_buffer("in_mean", _per_channel(mean, in_channels), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("in_std", _per_channel(std, in_channels), persistent=False)

        self.tok_embed = nn.Embedding(self.vocab_size + 1, dim)   # the last token: start of sequence
        self.pos_embed = nn.Parameter(torch.zeros(1, self.seq_len, dim))
        self.blocks = nn.ModuleList([CausalBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.vocab_size, bias=False)

        init_transformer_weights(self)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)   # near-uniform predictions at first: loss ≈ ln K

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Palette tokens of the normalised image: un-normalise, clamp to [0, 1], average-pool to
        ``seq_size``², nearest palette colour (squared distance), raster order.

        Shape: x (B, C, H, W) float → (B, N) long in [0, K), N = seq_size².
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[-2:]) < self.seq_size:
            raise ValueError(f"{self.name} expects images of shape (B, {self.in_channels}, H, W) with H, W >= "
                             f"{self.seq_size}, got {tuple(x.shape)}")
        x = (x.float() * self.in_std + self.in_mean).clamp(0.0, 1.0)                 # (B, C, H, W) in [0, 1]
        x = F.adaptive_avg_pool2d(x, self.seq_size)                                   # (B, C, s, s)
        pixels = x.flatten(2).transpose(1, 2)                                         # (B, N, C)
        dist = (pixels[:, :, None, :] - self.palette[None, None]).square().sum(-1)   # (B, N, K)
        return dist.argmin(dim=-1)                                                    # (B, N)

    def colours(self, tokens: torch.Tensor) -> torch.Tensor:
        """The palette colours of tokens, as an image in [0, 1].

        Shape: tokens (B, N) → (B, C, seq_size, seq_size).
        """
        s = self.seq_size
        return self.palette[tokens].transpose(1, 2).reshape(tokens.shape[0], self.in_channels, s, s)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input sequence: start token then tokens 0 … N−2 (position i predicts token i).

        Shape: tokens (B, N) → (B, N, dim).
        """
        B, N = tokens.shape
        if N != self.seq_len:
            raise ValueError(f"{self.name} reads {self.seq_len} tokens ({self.seq_size}²), got {N}")
        start = torch.full((B, 1), self.vocab_size, dtype=tokens.dtype, device=tokens.device)
        inputs = torch.cat([start, tokens[:, :-1]], dim=1)                            # (B, N)
        return self.tok_embed(inputs) + self.pos_embed                                # (B, N, dim)

    @staticmethod
    def pool(h: torch.Tensor) -> torch.Tensor:
        """The probe feature of hidden states: layer norm (no affine), mean over positions.

        Shape: h (B, N, dim) → (B, dim).
        """
        return F.layer_norm(h, h.shape[-1:]).mean(dim=1)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-pixel logits from every position, and the probe feature, in one pass.

        Shape: tokens (B, N) → logits (B, N, K) (row i: the distribution of token i given tokens < i),
        features (B, dim).
        """
        h = self.embed(tokens)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)                                                              # (B, N, dim)
            if i == self.probe_layer:
                features = self.pool(h)
        return self.head(self.norm(h)), features

    def _hidden(self, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Hidden states of the image's tokens: the embedding then blocks 1 … ``upto``. Shape: [(B, N, dim)]."""
        hs = [self.embed(self.tokenize(x))]
        for block in self.blocks[:upto]:
            hs.append(block(hs[-1]))
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: x (B, C, H, W) float, normalised → (B, dim), block ``probe_layer``'s pooled feature
        (the blocks above it are not run)."""
        return self.pool(self._hidden(x, self.probe_layer)[-1])

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Layer-normalised hidden states of the block before ``probe_layer`` (the embedding for the
        first) and of ``probe_layer``, on the pooled pixel grid (position i holds the state that
        predicts pixel i); the global average of the last one is ``forward(x)``.

        Shape: x (B, C, H, W) → [(B, dim, seq_size, seq_size)] × 2.
        """
        hs = self._hidden(x, self.probe_layer)[-2:]
        s = self.seq_size
        return [F.layer_norm(h, h.shape[-1:]).transpose(1, 2).reshape(h.shape[0], self.dim, s, s) for h in hs]

    def extra_repr(self) -> str:
        return (f"name={self.name}, seq_size={self.seq_size}, vocab_size={self.vocab_size}, dim={self.dim}, "
                f"depth={len(self.blocks)}, probe_layer={self.probe_layer}")


def _per_channel(v: Sequence[float], channels: int) -> torch.Tensor:
    v = [float(a) for a in v]
    if len(v) not in (1, channels):
        raise ValueError(f"mean/std must have 1 or {channels} entries, got {len(v)}")
    return torch.tensor(v * (channels // len(v))).view(1, channels, 1, 1)
