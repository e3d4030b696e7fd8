"""Classification figures for the evaluation stage: top-k, confusion matrix, per-class accuracy, AP.

Average precision is written out here rather than imported (scikit-learn is not a dependency);
the tests compare it with ``sklearn.metrics.average_precision_score`` and a hand-computed case.

Two AP definitions, both over the ranking of one class's scores:

* area under the precision-recall curve, step-wise (what scikit-learn and VOC 2010+ report):
  ``AP = Σ_n (R_n − R_{n−1}) · P_n`` over the distinct score thresholds, highest first;
* VOC 2007's 11-point interpolated AP (what VOC07 classification papers report):
  ``AP = 1/11 · Σ_{t ∈ {0, 0.1, …, 1}} max_{R ≥ t} P`` with precision and recall taken at every
  rank, as in the VOC07 devkit.

Samples marked "difficult" for a class are left out of that class's ranking (VOC's rule).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose true label is among the k highest scores.

    Shape: scores (N, C), labels (N,) int.
    """
    if len(labels) == 0:
        raise ValueError("topk_accuracy: no samples")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices                              # (N, k)
    return float((top == labels[:, None]).any(dim=1).float().mean())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Counts, rows = true class, columns = predicted class. Shape: pred, labels (N,) → (C, C) int64."""
    idx = labels.long() * n_classes + pred.long()
    return torch.bincount(idx, minlength=n_classes * n_classes).view(n_classes, n_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[Optional[float]]:
    """Recall of each class from a confusion matrix; None for a class absent from the labels."""
    totals = confusion.sum(dim=1)
    return [float(confusion[c, c] / totals[c]) if totals[c] > 0 else None for c in range(len(totals))]


def _ranked(scores: torch.Tensor, target: torch.Tensor, ignore: Optional[torch.Tensor]):
    """Scores sorted high → low with their 0/1 targets, ignored samples removed. float64."""
    scores, target = scores.double().flatten(), target.double().flatten()
    if ignore is not None:
        keep = ~ignore.bool().flatten()
        scores, target = scores[keep], target[keep]
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], target[order]


def average_precision(scores: torch.Tensor, target: torch.Tensor, ignore: Optional[torch.Tensor] = None) -> float:
    """Area under the step-wise precision-recall curve of one class (scikit-learn's definition).

    Tied scores form one threshold. Returns NaN when there is no positive sample.
    Shape: scores (N,), target (N,) in {0, 1}, ignore (N,) bool or None.
    """
    s, t = _ranked(scores, target, ignore)
    n_pos = float(t.sum())
    if n_pos == 0:
        return math.nan
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
    last = torch.ones_like(s, dtype=torch.bool)                      # the last sample of each tied run
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / n_pos
    prev = torch.cat([torch.zeros(1, dtype=recall.dtype), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def voc07_average_precision(scores: torch.Tensor, target: torch.Tensor,
                            ignore: Optional[torch.Tensor] = None) -> float:
    """VOC 2007 11-point interpolated AP of one class (precision and recall at every rank).

    Returns NaN when there is no positive sample. Shape: as :func:`average_precision`.
    """
    _, t = _ranked(scores, target, ignore)
    n_pos = float(t.sum())
    if n_pos == 0:
        return math.nan
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
    precision, recall = tp / (tp + fp), tp / n_pos
    points = []
    for thr in torch.linspace(0, 1, 11, dtype=torch.float64):
        ok = recall >= thr - 1e-12
        points.append(float(precision[ok].max()) if ok.any() else 0.0)
    return sum(points) / 11


def multilabel_ap(scores: torch.Tensor, targets: torch.Tensor, ignore: Optional[torch.Tensor] = None) -> dict:
    """Per-class AP (both definitions) and their means over the classes that have a positive.

    Shape: scores (N, C), targets (N, C) in {0, 1}, ignore (N, C) bool or None.
    Returns {"mAP", "voc07_mAP", "per_class_ap", "per_class_voc07_ap"} (None for a class with no
    positive; such classes are left out of the means, and the count is returned as "classes_scored").
    """
    auc, voc = [], []
    for c in range(scores.shape[1]):
        ig = ignore[:, c] if ignore is not None else None
        auc.append(average_precision(scores[:, c], targets[:, c], ig))
        voc.append(voc07_average_precision(scores[:, c], targets[:, c], ig))
    scored = [i for i, a in enumerate(auc) if not math.isnan(a)]
    if not scored:
        raise ValueError("multilabel_ap: no class has a positive sample in this split")
    return {
        "mAP": sum(auc[i] for i in scored) / len(scored),
        "voc07_mAP": sum(voc[i] for i in scored) / len(scored),
        "per_class_ap": [None if math.isnan(a) else a for a in auc],
        "per_class_voc07_ap": [None if math.isnan(a) else a for a in voc],
        "classes_scored": len(scored),
    }
