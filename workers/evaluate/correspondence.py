"""Label propagation and cross-view alignment: how the temporal objectives' papers judge features.

Plain tensor functions, no I/O (``workers/evaluate/video.py`` feeds them a run's test clips).

* :func:`propagate` — the label-propagation protocol of the cycle-consistency and colorization
  papers (Wang, Jabri & Efros 2019; Vondrick et al. 2018; the procedure of Jabri, Owens & Efros
  2020's code): the first frame's masks are carried through the clip by feature affinity. Each node
  (feature-map cell) of frame t takes the labels of its ``topk`` most similar nodes among the first
  frame and the ``context`` frames before t, within ``radius``, weighted by softmax(cos / τ);
  the predictions of earlier frames are the labels of the later ones.
* :func:`j_score` — the region similarity J of DAVIS: intersection over union of the propagated and
  the true mask of each object, averaged over the frames after the first.
* :func:`alignment` — TCN's cross-view alignment (Sermanet et al. 2018): for each frame of view A,
  the nearest frame of view B in feature space; the share that is the same time step, and the mean
  distance |t − t'| / T (their "alignment error").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def first_labels(mask: torch.Tensor, n_labels: int, size: tuple[int, int]) -> torch.Tensor:
    """A frame's mask (H, W) of ids 0..n_labels-1 as soft one-hot labels on the feature grid:
    the share of each cell's pixels per id. Shape: (H, W) → (n_labels, h, w)."""
    one_hot = F.one_hot(mask.long(), n_labels).permute(2, 0, 1).float()            # (K, H, W)
    return F.adaptive_avg_pool2d(one_hot[None], size)[0]


def _window(h: int, w: int, radius: Optional[float]) -> Optional[torch.Tensor]:
    """(h·w, h·w) bool: cells within ``radius`` (a fraction of the larger side) of each other."""
    if radius is None:
        return None
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()                     # (hw, 2)
    return torch.cdist(pos, pos) <= radius * max(h, w)


def propagate(features: torch.Tensor, first: torch.Tensor, topk: int = 10, temperature: float = 0.05,
              context: int = 4, radius: Optional[float] = None) -> torch.Tensor:
    """Labels of every frame, propagated from the first by feature affinity.

    For frame t the reference frames are R_t = {0} ∪ {t − context, …, t − 1}; with f_i the
    L2-normalised feature of node i of frame t and f_j, y_j those of reference node j
    (y_j: the labels given or predicted there),

        y_i = Σ_{j ∈ topk_i} softmax_j(f_i · f_j / τ) y_j,

    over the ``topk`` most similar reference nodes within ``radius`` of i.

    Shapes: features (T, D, h, w), first (K, h, w) → labels (T, K, h, w) (frame 0 = ``first``).
    """
    t_len, _, h, w = features.shape
    nodes = F.normalize(features.float().flatten(2), dim=1).transpose(1, 2)        # (T, hw, D)
    allowed = _window(h, w, radius)
    preds = [first.float().flatten(1).T]                                           # (hw, K) per frame
    for t in range(1, t_len):
        refs = [0] + list(range(max(1, t - context), t))
        keys = nodes[refs]                                                         # (R, hw, D)
        values = torch.stack([preds[r] for r in refs])                             # (R, hw, K)
        aff = torch.einsum("qd,rkd->qrk", nodes[t], keys)                          # (hw, R, hw)
        if allowed is not None:
            aff = aff.masked_fill(~allowed[:, None, :], float("-inf"))
        aff = aff.flatten(1)                                                       # (hw, R·hw)
        top, idx = aff.topk(min(topk, aff.shape[1]), dim=1)                        # (hw, k)
        weights = torch.softmax(top / temperature, dim=1).nan_to_num(0.0)          # -inf (outside radius): 0
        preds.append((weights[..., None] * values.flatten(0, 1)[idx]).sum(1))      # (hw, K)
    return torch.stack(preds).transpose(1, 2).reshape(t_len, -1, h, w)


def j_score(labels: torch.Tensor, masks: torch.Tensor) -> dict[int, float]:
    """J of each object of the first frame: the mean over frames 1..T−1 of IoU(predicted, true).

    ``labels`` (T, K, h, w) soft labels (:func:`propagate`) are upsampled bilinearly to the masks'
    size and each pixel takes its most likely id; a frame where the object is neither predicted nor
    present is left out. Shapes: labels (T, K, h, w), masks (T, H, W) ids → {object id: J}.
    """
    pred = F.interpolate(labels.float(), size=tuple(masks.shape[-2:]), mode="bilinear",
                         align_corners=False).argmax(1)                            # (T, H, W)
    out = {}
    for k in sorted(set(masks[0].unique().tolist()) - {0}):
        if k >= labels.shape[1]:
            continue
        ious = []
        for t in range(1, len(masks)):
            p, g = pred[t] == k, masks[t] == k
            union = int((p | g).sum())
            if union:
                ious.append(int((p & g).sum()) / union)
        if ious:
            out[int(k)] = sum(ious) / len(ious)
    return out


def alignment(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(accuracy, error) of aligning view A's frames to view B's by nearest neighbour (cosine).

    accuracy: the share of frames of A whose nearest frame of B is the same time step; error: the
    mean |t − t'| / T. Shapes: a, b (T, D) features of the same T time steps."""
    sim = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T         # (T, T)
    nearest = sim.argmax(1)
    steps = torch.arange(len(a))
    return float((nearest == steps).float().mean()), float((nearest - steps).abs().float().mean() / len(a))
