"""Cycle consistency of time: a random walk on the frames' feature graph, forward and back, returns home."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import normalize_input, prepare_clips
from ssl_models.dense import dense_map, dense_shape
from ssl_models.objectives.base import Objective
from ssl_models.rng import randint, uniform

EPS = 1e-20   # log(R + ε) as the reference code: a round trip that never comes back costs −log ε ≈ 46, not ∞


class CycleConsistency(Objective):
    """Cycle consistency of time (Wang, Jabri & Efros 2019, "Learning Correspondence from the
    Cycle-Consistency of Time"), in the formulation of its successor, the contrastive random walk
    (Jabri, Owens & Efros 2020, "Space-Time Correspondence as a Contrastive Random Walk").

    From a clip, F frames at a stride drawn per clip. Each frame x_t goes through the backbone f; the
    h·w cells of its dense map ``feature_maps(x_t)[0]`` are the frame's N nodes, each embedded by a
    1×1 projection g (``embed_dim``; 0: none) and L2-normalised: q_t = normalise(g(f(x_t))), (N, E).
    Consecutive frames are joined by row-stochastic transition matrices, each edge dropped (its
    affinity set to −∞ before the softmax) with probability ``edge_dropout`` in training:

        A_t = softmax_j(q_t q_{t+1}ᵀ / τ)      A_t[i, j] = P(at node j of frame t+1 | at node i of frame t)
        Ā_t = softmax_j(q_{t+1} q_tᵀ / τ)      the step back, frame t+1 → frame t

    A walk multiplies its steps left to right, in the order it takes them. The palindrome
    t_0 → t_1 → … → t_k → … → t_0 has the round-trip matrix R_k, whose target is the identity (every
    node comes back to itself); the loss averages the cross-entropy over the cycle lengths
    k = 1 … F − 1 (the reference code starts at k = 2):

        R_k = A_0 A_1 ⋯ A_{k−1} Ā_{k−1} ⋯ Ā_1 Ā_0
        L = (1/(F − 1)) Σ_k −(1/(B N)) Σ_{b,i} log R_k[b, i, i]

    The trap: the code behind the contrastive random walk's published numbers composed the steps in
    the wrong order (``_a @ aal``, left-multiplying), which shuffles transitions much like edge
    dropout does; with the product fixed, the temperature had to come down to τ = 0.01–0.05 for the
    model to train (the paper reports 0.07), hence τ = 0.05 here. :func:`walk` and :func:`round_trips` hold the order
    and a test checks it on hand-made features whose frames permute each other.

    Where this differs from the papers: the nodes are the cells of one frame's dense map (the
    reference code's ``--frame-aug none``), not a grid of jittered patches each encoded alone (its
    default), and the clip gets one crop and flip for all its frames. A network that encodes absolute
    position, which zero padding lets a CNN learn, satisfies every palindrome with the identity walk;
    patches encoded one by one (and the reference code's reflect padding) hide position, a dense map
    does not. The frames' content has to out-compete that shortcut, so judge the backbone by the
    probes and label propagation, not by the round-trip accuracy alone.

    Args:
        backbone: an image backbone with ``feature_maps`` (dense features before pooling).
        image_size: side of the square frames it sees.
        frames: F, frames per walk (the reference code's ``--clip-len``: 4 to 6).
        max_stride: the stride between them is drawn in [1, max_stride] per clip.
        temperature: τ.
        edge_dropout: probability of dropping each edge in training (the reference code: 0.1).
        embed_dim: E, output of the 1×1 projection (the reference code's linear head: 128); 0 uses
            the backbone's dense features as they are (E = D).
        crop_scale, flip_p: one crop and one horizontal flip per clip, for all its frames.

    Shapes: clips (B, T, C, H, W) uint8 → views {"frames": (B, F, C, S, S)}; the backbone sees
    (B·F, C, S, S), its dense map is (B·F, D, h, w), the nodes (B, F, N, E) with N = h·w, the
    transition matrices (B, F − 1, N, N). Logged: ``round_trip_accuracy`` (share of nodes whose most
    likely round trip, over all cycle lengths, ends where it started) and
    ``round_trip_accuracy_longest`` (the cycle through all F frames).
    """

    name = "cycle_consistency"
    contrastive = True
    modality = "clip"

    def __init__(self, backbone: nn.Module, image_size: int, frames: int = 6, max_stride: int = 2,
                 temperature: float = 0.05, edge_dropout: float = 0.1, embed_dim: int = 128,
                 crop_scale: tuple[float, float] = (0.6, 1.0), flip_p: float = 0.5):
        super().__init__(backbone, image_size)
        if frames < 2 or max_stride < 1:
            raise ValueError(f"cycle_consistency: frames must be >= 2 and max_stride >= 1, got {frames}, {max_stride}")
        if not temperature > 0:
            raise ValueError(f"cycle_consistency: temperature must be > 0, got {temperature}; "
                             f"0.01-0.05 once the walk's product is in the right order")
        if not 0.0 <= edge_dropout < 1.0 or embed_dim < 0:
            raise ValueError(f"cycle_consistency: edge_dropout in [0, 1) and embed_dim >= 0, got {edge_dropout}, "
                             f"{embed_dim}")
        if not hasattr(backbone, "feature_maps"):
            raise ValueError(f"cycle_consistency walks between the cells of dense feature maps, but "
                             f"{type(backbone).__name__} has no feature_maps(); use a ResNet or a ViT")
        self.frames, self.max_stride = int(frames), int(max_stride)
        self.temperature, self.edge_dropout = float(temperature), float(edge_dropout)
        self.crop_scale, self.flip_p = tuple(crop_scale), float(flip_p)
        dim, _ = dense_shape(backbone, self.in_channels, self.image_size)
        self.projection = nn.Conv2d(dim, embed_dim, kernel_size=1) if embed_dim else nn.Identity()

    def sample_frames(self, clips: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``frames`` frames of each clip at a random stride and start. Shape: (B, T, C, H, W) → (B, F, C, H, W)."""
        b, t = clips.shape[:2]
        if t < self.frames:
            raise ValueError(f"cycle_consistency needs clips of at least {self.frames} frames, got {t}; "
                             f"re-ingest with a larger --clip-frames or lower objective_params.frames")
        top = max(1, min(self.max_stride, (t - 1) // max(1, self.frames - 1)))
        stride = randint(1, top + 1, (b,), generator, clips.device)                       # (B,)
        start = (uniform((b,), 0.0, 1.0, generator, clips.device) * (t - (self.frames - 1) * stride)).long()
        idx = start[:, None] + stride[:, None] * torch.arange(self.frames, device=clips.device)  # (B, F)
        return clips[torch.arange(b, device=clips.device)[:, None], idx]

    def make_views(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Shape: images = clips (B, T, C, H, W) uint8 → {"frames": (B, F, C, S, S) normalised}."""
        if images.ndim != 5:
            raise ValueError(f"cycle_consistency takes clips (B, T, C, H, W), got shape {tuple(images.shape)}")
        x = prepare_clips(self.sample_frames(images, generator), self.image_size, self.crop_scale, self.flip_p,
                          generator)
        return {"frames": normalize_input(x.flatten(0, 1)).view_as(x)}

    def embed(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The nodes of every frame: projected, L2-normalised cells of the dense map, in float32; and
        the zero of :func:`dense_map` to add to the loss.

        Shape: frames (B, F, C, S, S) → (B, F, N, E), N = h·w in row-major order; a scalar.
        """
        b, f = frames.shape[:2]
        dense, zero = dense_map(self.backbone, frames.flatten(0, 1))                     # (B·F, D, h, w)
        q = self.projection(dense).float().flatten(2).transpose(1, 2)                    # (B·F, N, E)
        return F.normalize(q, dim=-1).view(b, f, *q.shape[1:]), zero                     # (B, F, N, E)

    def transitions(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps forward A_t and back Ā_t between consecutive frames (edges dropped in training).

        Shape: q (B, F, N, E) → (A, Ā), each (B, F − 1, N, N), rows summing to 1.
        """
        with torch.autocast(q.device.type, enabled=False):
            q = q.float()
            affinity = torch.einsum("btne,btme->btnm", q[:, :-1], q[:, 1:])             # (B, F−1, N, N): q_t·q_{t+1}
            return self._stochastic(affinity), self._stochastic(affinity.transpose(-1, -2))

    def _stochastic(self, affinity: torch.Tensor) -> torch.Tensor:
        """Row softmax of affinity / τ, each edge dropped with probability ``edge_dropout`` in training
        (the global RNG, as ``nn.Dropout``). Shape: (..., N, N) → (..., N, N)."""
        if self.training and self.edge_dropout > 0:
            drop = torch.rand_like(affinity) < self.edge_dropout                        # (..., N, N)
            drop &= ~drop.all(-1, keepdim=True)  # a row that lost every edge (probability p^N) keeps them: no NaN
            affinity = affinity.masked_fill(drop, float("-inf"))
        return torch.softmax(affinity / self.temperature, dim=-1)

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: frames (B, F, C, S, S) → {"loss": scalar, "round_trip_accuracy", "round_trip_accuracy_longest"}."""
        q, zero = self.embed(views["frames"])                                            # (B, F, N, E)
        forward, backward = self.transitions(q)                                          # (B, F−1, N, N) each
        with torch.autocast(forward.device.type, enabled=False):
            trips = round_trips(forward, backward)                                       # (B, F−1, N, N)
            back_home = torch.diagonal(trips, dim1=-2, dim2=-1)                          # (B, F−1, N): R_k[i, i]
            loss = -torch.log(back_home + EPS).mean() + zero
            n = trips.shape[-1]
            hit = trips.argmax(-1) == torch.arange(n, device=trips.device)               # (B, F−1, N)
        return {"loss": loss, "round_trip_accuracy": hit.float().mean().detach(),
                "round_trip_accuracy_longest": hit[:, -1].float().mean().detach()}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, frames={self.frames}, max_stride={self.max_stride}, "
                f"temperature={self.temperature}, edge_dropout={self.edge_dropout}")


def walk(steps: torch.Tensor) -> torch.Tensor:
    """Where a walk that takes ``steps`` in order has got to after each of them: P_k = S_0 S_1 ⋯ S_{k−1}
    (left to right: row i of P_k is the distribution over the nodes reached from node i).

    Shape: steps (B, K, N, N) row-stochastic → (B, K, N, N), entry k − 1 being P_k.
    """
    p = steps[:, 0]                                                                      # (B, N, N): P_1 = S_0
    out = [p]
    for k in range(1, steps.shape[1]):
        p = p @ steps[:, k]                                                              # (B, N, N): P_{k+1} = P_k S_k
        out.append(p)
    return torch.stack(out, 1)


def round_trips(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """The palindromes' round-trip matrices R_k = (A_0 ⋯ A_{k−1}) (Ā_{k−1} ⋯ Ā_0), k = 1 … K.

    The way back is built by left-multiplying, Q_k = Ā_{k−1} Q_{k−1}: the last step out is the
    first step back.

    Shape: forward, backward (B, K, N, N), entry t the step between frames t and t + 1 →
    (B, K, N, N), entry k − 1 being R_k.
    """
    out_walks = walk(forward)                                                            # (B, K, N, N): P_k
    trips, q = [], None
    for k in range(forward.shape[1]):
        q = backward[:, k] if q is None else backward[:, k] @ q                          # (B, N, N): Q_{k+1}
        trips.append(out_walks[:, k] @ q)                                                # (B, N, N): R_{k+1}
    return torch.stack(trips, 1)
