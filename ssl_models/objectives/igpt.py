"""Image GPT: predict each pixel's palette colour from the pixels before it, in raster order."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_images
from ssl_models.gpt import ImageGPT
from ssl_models.objectives.base import Objective


class IGPT(Objective):
    """Image GPT (Chen, Radford, Child, Wu, Jun, Luan & Sutskever 2020, "Generative Pretraining from
    Pixels").

    The image is average-pooled to s × s (28 → 14 px for Fashion-MNIST) and each pixel replaced by
    the nearest colour of a palette, a token x_i in [0, K) (:meth:`~ssl_models.gpt.ImageGPT.tokenize`;
    16 grey levels, or the 3-3-2 bit RGB palette). A causal transformer p_θ reads the N = s² tokens
    in raster order behind a start token and predicts each from those before it:

        L = −(1/(B·N)) Σ_b Σ_{i=1..N} log p_θ(x_{b,i} | x_{b,1}, …, x_{b,i−1})

    The transformer is the backbone itself (:class:`~ssl_models.gpt.ImageGPT`, ``backbones.build(
    "igpt_tiny", ...)``): ``backbone(preprocess(images))`` quantises internally and returns the
    mean-pooled, layer-normalised hidden states of a middle block, what the paper's linear probes
    read. The paper's palette is 512 colours from k-means on ImageNet (9 bits); a fixed palette here
    needs no pass over the data before training and keeps the backbone a function of its build
    arguments (``levels=8`` on RGB gives a uniform 9-bit palette).

    Args:
        backbone: an :class:`~ssl_models.gpt.ImageGPT` for the images' channels.
        image_size: side of the square views (≥ the backbone's ``seq_size``; pooled to it).
        crop_scale: area range of a random resized crop; (1, 1) = the whole image, resized.
        flip_p: probability of a horizontal flip.

    Shapes: images (B, C, H, W) uint8 → views {"images": (B, C, S, S) normalised}; the transformer
    reads (B, N) tokens and gives (B, N, K) logits. Logged: ``bits_per_pixel`` (L / ln 2) and
    ``accuracy`` (of the most likely next token).

    >>> gpt = backbones.build("igpt_tiny", in_channels=1, seq_size=14)
    >>> obj = IGPT(gpt, image_size=28)
    >>> obj(obj.make_views(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)))["loss"].backward()
    """

    name = "igpt"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int, crop_scale: tuple[float, float] = (1.0, 1.0),
                 flip_p: float = 0.5):
        if not isinstance(backbone, ImageGPT):
            name = getattr(backbone, "name", type(backbone).__name__)
            raise ValueError(f"igpt needs an ImageGPT backbone (the causal transformer is what is pretrained), "
                             f"got {name!r}; build one with backbones.build('igpt_tiny', in_channels=...)")
        super().__init__(backbone, image_size)
        if self.image_size < backbone.seq_size:
            raise ValueError(f"igpt: image_size {image_size} is smaller than the backbone's seq_size "
                             f"{backbone.seq_size}; the images are pooled down to it, never up")
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images (B, C, H, W) uint8 → {"images": (B, C, S, S) normalised, as ``preprocess`` gives}."""
        x = prepare_images(images, self.image_size, self.crop_scale, self.flip_p, generator)
        return {"images": normalize_input(x)}

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["images"] (B, C, S, S) → {"loss": scalar, "bits_per_pixel", "accuracy"}."""
        tokens = self.backbone.tokenize(views["images"])                                 # (B, N)
        logits, _ = self.backbone.forward_tokens(tokens)                                 # (B, N, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        accuracy = (logits.argmax(-1) == tokens).float().mean()
        return {"loss": loss, "bits_per_pixel": loss.detach() / math.log(2), "accuracy": accuracy.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seq_size={self.backbone.seq_size}, vocab_size={self.backbone.vocab_size}"
