"""Tracking by colorization: colour a grey frame by copying the colours of the pixels it points to in
colour reference frames."""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import prepare_clips
from ssl_models.color import lightness_input, rgb_to_lab
from ssl_models.dense import dense_map, dense_shape
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint, uniform


class ColorizationTracking(Objective):
    """Tracking by colorization (Vondrick, Shrivastava, Fathi, Guadarrama & Murphy 2018, "Tracking
    Emerges by Colorizing Videos").

    From a clip, R reference frames and, after them, the target frame, at a stride drawn per clip.
    Every frame is converted to CIE Lab; the backbone f sees only the lightness L (scaled to
    [−1, 1], so it must be built with ``in_channels=1``, as for colorization). The cells of its dense
    map ``feature_maps(L)[0]``, through a 1×1 projection g (``embed_dim``; 0: none), embed each
    pixel of the h × w grid: e_i for the N = h·w target pixels, e_j for the R·N reference pixels.
    The colours (ab), average-pooled to h × w, are quantised to the nearest of K = 16 ab clusters,
    c_j for the references and c_i for the target. Each target pixel's colour distribution is an
    attention-weighted copy of the reference pixels' colours, and the loss is its cross-entropy:

        A_ij = exp(e_i·e_j / T) / Σ_m exp(e_i·e_m / T)       (N, R·N), over every reference pixel j
        p_i = Σ_j A_ij onehot(c_j)                            (N, K)
        L = −(1/|V|) Σ_{b, i ∈ V} log p_i[c_i]

    with T = 1 in training, as in the paper; the paper sharpens the copy with T = 0.5 at test time,
    which is for the evaluation's label propagation (:meth:`copy_colours` takes T), not for this
    loss. V: the target pixels whose colour some reference pixel has (no copy can be right for the
    others; −log 0 would be an infinite constant). Embeddings are not normalised (the paper's are
    not; T = 1 scales raw dot products).

    Where this differs from the paper: the K = 16 clusters are fixed, not fitted to the training
    video: k-means of the ab plane over the whole sRGB gamut (a 16³ RGB grid, farthest-point start
    from grey, so the same 16 every time; :func:`ab_palette`). Since colours are copied, never
    predicted per cluster, the palette only has to tell the colours apart; a fixed one needs no pass
    over the data before training and is the same on every worker. The backbone is the image
    backbone (the paper: a ResNet-18 with a 3D-convolutional head over the frames), so the
    pretrained network is scored by the image protocols as well; its L input is what
    :meth:`preprocess` gives the evaluation.

    Args:
        backbone: a backbone built with ``in_channels=1`` and with ``feature_maps``.
        image_size: side of the square frames it sees.
        references: R, reference frames before the target (the paper: 3).
        max_stride: the stride between frames is drawn in [1, max_stride] per clip.
        temperature: T of the copy in training (the paper: 1).
        embed_dim: E, output of the 1×1 projection (the paper's embedding: 64); 0 uses the
            backbone's dense features as they are.
        clusters: K, colour clusters (the paper: 16).
        crop_scale, flip_p: one crop and one horizontal flip per clip, for all its frames.

    Shapes: clips (B, T, 3, H, W) uint8 → views {"L": (B, R + 1, 1, S, S) in [−1, 1], "ab":
    (B, R + 1, 2, S, S) in Lab units}, the target last; the backbone sees (B·(R + 1), 1, S, S), its
    dense map is (B·(R + 1), D, h, w), the attention (B, N, R·N). Logged: ``accuracy`` (share of
    target pixels whose most likely copied colour is their own, over all of them),
    ``chromatic_accuracy`` (the same over the target pixels that are not grey, i.e. not in cluster 0:
    on Moving Fashion-MNIST ~90 % of the pixels are grey background, which copying from the same
    place gets right, so the items' pixels tell more; 0 when a batch has none) and ``copyable``
    (share of target pixels whose colour the references have: the accuracy's ceiling).
    """

    name = "colorization_tracking"
    contrastive = False
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, references: int = 3, max_stride: int = 2,
                 temperature: float = 1.0, embed_dim: int = 64, clusters: int = 16,
                 crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5):
        backbone_channels = getattr(backbone, "in_channels", 1)
        if backbone_channels != 1:
            raise ValueError(f"colorization_tracking feeds the backbone the L channel only, but this backbone "
                             f"takes {backbone_channels} channels; build it with in_channels=1, e.g. "
                             f"backbones.build('resnet18', in_channels=1)")
        if references < 1 or max_stride < 1:
            raise ValueError(f"colorization_tracking: references >= 1 and max_stride >= 1, got {references}, "
                             f"{max_stride}")
        if not temperature > 0 or embed_dim < 0 or not 2 <= clusters <= 64:
            raise ValueError(f"colorization_tracking: temperature > 0, embed_dim >= 0 and 2 <= clusters <= 64, "
                             f"got {temperature}, {embed_dim}, {clusters}")
        if not hasattr(backbone, "feature_maps"):
            raise ValueError(f"colorization_tracking copies colours between the cells of dense feature maps, but "
                             f"{type(backbone).__name__} has no feature_maps(); use a ResNet or a ViT")
        super().__init__(backbone, image_size, in_channels=3)
        self.references, self.max_stride = int(references), int(max_stride)
        self.temperature = float(temperature)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        dim, _ = dense_shape(backbone, 1, self.image_size)
        self.projection = nn.Conv2d(dim, embed_dim, kernel_size=1) if embed_dim else nn.Identity()
        self.register_buffer("palette", ab_palette(int(clusters)).clone())            # (K, 2) ab centres

    @classmethod
    def backbone_channels(cls, image_channels: int) -> int:
        """1: the backbone sees the lightness L only. Refuses clips without colour, before anything is built."""
        if image_channels != 3:
            raise ValueError(f"colorization_tracking needs colour clips (3 channels) but these have "
                             f"{image_channels}: it learns by copying colours (ab of Lab) between frames from "
                             f"their lightness L; use an RGB video source such as moving-fashion-mnist")
        return 1

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone sees the lightness channel only: L/50 − 1 of the un-augmented frame (as
        colorization's ``preprocess``).

        Shape: images (B, 3, H, W) uint8 → (B, 1, image_size, image_size).
        """
        return lightness_input(images, self.image_size)

    def sample_frames(self, clips: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """R + 1 frames of each clip at a random stride and start, the target last.
        Shape: (B, T, C, H, W) → (B, R + 1, C, H, W)."""
        b, t = clips.shape[:2]
        f = self.references + 1
        if t < f:
            raise ValueError(f"colorization_tracking needs clips of at least {f} frames, got {t}; re-ingest with a "
                             f"larger --clip-frames or lower objective_params.references")
        top = max(1, min(self.max_stride, (t - 1) // (f - 1)))
        stride = randint(1, top + 1, (b,), generator, clips.device)                       # (B,)
        start = (uniform((b,), 0.0, 1.0, generator, clips.device) * (t - (f - 1) * stride)).long()
        idx = start[:, None] + stride[:, None] * torch.arange(f, device=clips.device)   # (B, R+1)
        return clips[torch.arange(b, device=clips.device)[:, None], idx]

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, 3, H, W) uint8 → {"L": (B, R + 1, 1, S, S) in [−1, 1],
        "ab": (B, R + 1, 2, S, S)}, the target frame last."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"colorization_tracking needs colour clips (B, T, 3, H, W): it copies colours (ab of "
                             f"Lab) between frames, but got shape {tuple(images.shape)}")
        x = prepare_clips(self.sample_frames(images, generator), self.image_size, self.crop_scale, self.flip_p,
                          generator)                                                     # (B, R+1, 3, S, S)
        lab = rgb_to_lab(x)
        return {"L": lab[:, :, :1] / 50.0 - 1.0, "ab": lab[:, :, 1:]}

    def quantize(self, ab: torch.Tensor) -> torch.Tensor:
        """Nearest palette cluster of every pixel. Shape: ab (..., 2, h, w) → (..., h, w) long in [0, K)."""
        pts = ab.float().movedim(-3, -1)                                                 # (..., h, w, 2)
        d2 = (pts[..., None, :] - self.palette.float()).pow(2).sum(-1)                   # (..., h, w, K)
        return d2.argmin(-1)

    def embed(self, L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Pixel embeddings of every frame, in float32; the zero of :func:`dense_map`; the grid (h, w).

        Shape: L (B, F, 1, S, S) → (B, F, N, E), N = h·w in row-major order.
        """
        b, f = L.shape[:2]
        dense, zero = dense_map(self.backbone, L.flatten(0, 1))                          # (B·F, D, h, w)
        e = self.projection(dense).float()                                               # (B·F, E, h, w)
        h, w = e.shape[-2:]
        return e.flatten(2).transpose(1, 2).reshape(b, f, h * w, -1), zero, (h, w)        # (B, F, N, E)

    @staticmethod
    def copy_colours(target: torch.Tensor, refs: torch.Tensor, ref_labels: torch.Tensor, classes: int,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """p_i = Σ_j softmax_j(e_i·e_j / T) onehot(c_j), and log A (the attention's log) it came from.
        Works for any labels (colours here; masks in label propagation, with T = 0.5 as the paper).

        Shape: target (B, N, E), refs (B, M, E), ref_labels (B, M) long → p (B, N, K), log A (B, N, M).
        """
        with torch.autocast(target.device.type, enabled=False):
            logits = torch.einsum("bne,bme->bnm", target.float(), refs.float()) / temperature  # (B, N, M)
            log_attn = torch.log_softmax(logits, dim=-1)
            onehot = F.one_hot(ref_labels, classes).to(log_attn.dtype)                   # (B, M, K)
            return torch.einsum("bnm,bmk->bnk", log_attn.exp(), onehot), log_attn        # (B, N, K)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: L (B, R + 1, 1, S, S), ab (B, R + 1, 2, S, S) → {"loss": scalar, "accuracy", "copyable",
        "chromatic_accuracy"}."""
        L, ab = views["L"], views["ab"]
        b, f = L.shape[:2]
        e, zero, (h, w) = self.embed(L)                                                  # (B, R+1, N, E)
        with torch.no_grad():
            colours = self.quantize(F.adaptive_avg_pool2d(ab.flatten(0, 1).float(), (h, w)))  # (B·(R+1), h, w)
            colours = colours.view(b, f, h * w)                                          # (B, R+1, N)
        c_ref, c_tgt = colours[:, :-1].flatten(1), colours[:, -1]                        # (B, R·N), (B, N)
        p, log_attn = self.copy_colours(e[:, -1], e[:, :-1].flatten(1, 2), c_ref, self.palette.shape[0],
                                        self.temperature)                               # (B, N, K), (B, N, R·N)
        with torch.autocast(log_attn.device.type, enabled=False):
            same = c_tgt[:, :, None] == c_ref[:, None, :]                                # (B, N, R·N)
            copyable = same.any(-1)                                                      # (B, N)
            # log p_i[c_i] = log Σ_{j: c_j = c_i} A_ij; a pixel no reference shares sums over all j
            # instead (finite, so no NaN in the gradient) and is then left out of the mean
            keep = same | ~copyable[:, :, None]
            log_p = torch.logsumexp(log_attn.masked_fill(~keep, float("-inf")), dim=-1)  # (B, N)
            weight = copyable.float()
            loss = -(log_p * weight).sum() / weight.sum().clamp_min(1.0) + zero
        right = (p.argmax(-1) == c_tgt).float()                                         # (B, N)
        chromatic = (c_tgt != 0).float()                                                 # not grey: cluster 0 is grey
        return {"loss": loss, "accuracy": right.mean().detach(), "copyable": copyable.float().mean().detach(),
                "chromatic_accuracy": ((right * chromatic).sum() / chromatic.sum().clamp_min(1.0)).detach()}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, references={self.references}, max_stride={self.max_stride}, "
                f"temperature={self.temperature}, clusters={self.palette.shape[0]}")


@functools.lru_cache(maxsize=4)
def _ab_palette(k: int, levels: int, iters: int) -> torch.Tensor:
    v = torch.linspace(0, 1, levels, dtype=torch.float64, device="cpu")
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), 0).reshape(3, -1, 1)    # (3, levels³, 1) as an image
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1).T                                          # (n, 2)
    centres = [torch.zeros(2, dtype=torch.float64, device="cpu")]                      # grey first
    for _ in range(k - 1):                                                             # then the farthest colour
        gap = torch.cdist(ab, torch.stack(centres)).min(1).values                      # (n,)
        centres.append(ab[gap.argmax()])
    c = torch.stack(centres)                                                           # (K, 2)
    for _ in range(iters):                                                             # Lloyd's k-means
        assign = torch.cdist(ab, c).argmin(1)                                          # (n,)
        total = torch.zeros_like(c).index_add_(0, assign, ab)
        count = torch.bincount(assign, minlength=k).to(c.dtype)[:, None]
        c = torch.where(count > 0, total / count.clamp_min(1), c)
    return c.float()


def ab_palette(k: int = 16, levels: int = 16, iters: int = 50) -> torch.Tensor:
    """K colour clusters of the ab plane: k-means over the ab of a ``levels``³ sRGB grid (the whole
    gamut, every colour weighed alike), started from grey and then the farthest colours, so the same K
    every time, cluster 0 being grey's (computed on the CPU, also under a ``torch.device("meta")`` context).

    Shape: returns (K, 2) float32 (a, b) centres.
    """
    return _ab_palette(int(k), int(levels), int(iters)).clone()
