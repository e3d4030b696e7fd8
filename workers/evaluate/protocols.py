"""The evaluation protocols: each runs one protocol on one feature source of an ``Evaluation``.

``run_probe`` / ``run_knn`` read frozen features (``Evaluation.features``, cached in the run);
``run_finetune`` trains the pretrained backbone plus a new head; ``run_fewshot`` does either on
a class-balanced 1 % / 10 % label subset; ``run_supervised`` trains the architecture from scratch
with labels (the supervised reference) and registers its backbone as the feature source
``supervised``. Each returns a :class:`Result` whose ``rows`` are the report table's cells.
"""
from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from workers.evaluate import features
from workers.evaluate.finetune import classifier_metrics, predict, train_classifier
from workers.evaluate.metrics import multilabel_ap, topk_accuracy
from workers.evaluate.probe import Standardizer, linear_probe
from workers.knn import knn_predict, knn_scores_multilabel

# A ``workers.evaluate.evaluation.Evaluation``. Not imported, not even for type checkers: that module imports
# this one, and the protocols only read its attributes.
Evaluation = Any

FEWSHOT = {"fewshot_1pct": 0.01, "fewshot_10pct": 0.10}

def fewshot_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced, seeded subset holding ``fraction`` of the labels.

    Every class gets ``max(1, round(fraction · N / C))`` samples (fewer only if it has fewer),
    drawn by a per-class permutation seeded with (seed, class): the same seed gives the same
    subset on every run and for every checkpoint, and the 1 % subset lies inside the 10 % one.
    Shape: labels (N,) int → sorted indices (M,).
    """
    classes = sorted(set(labels.tolist()) - {-1})
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    picked = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(c))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


@dataclass
class Result:
    """One protocol on one feature source: its table cells, its details, its duration."""

    protocol: str
    features: str
    rows: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, protocol: str, metric: str, value: float, **extra) -> None:
        self.rows.append({"protocol": protocol, "features": self.features, "metric": metric, "split": "test",
                          "value": float(value), **extra})


# ----------------------------------------------------------------------------- protocols

def timed(fn):
    def wrapper(ev: Evaluation, *args, **kwargs) -> Result:
        t0 = time.perf_counter()
        result = fn(ev, *args, **kwargs)
        result.seconds = time.perf_counter() - t0
        return result
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@timed
def run_probe(ev: Evaluation, source: str, train_idx: Optional[torch.Tensor] = None,
              protocol: str = "probe") -> Result:
    """Linear probe on frozen ``source`` features (λ chosen on val), reported on test."""
    split_data = {}
    for s in ("train", "val", "test"):
        x = ev.features(source, s)
        y, ig = ev.frozen_targets(s)
        if s == "train" and train_idx is not None:  # indices into the whole train split
            pos = ev.frozen_positions(train_idx)
            x, y, ig = x[pos], y[pos], (ig[pos] if ig is not None else None)
        split_data[s] = (x, y, ig)
    grid = ev.config.probe_weight_decays
    with ev.bar(len(grid), f"{protocol} {source} (λ grid)", "λ") as bar:
        d = linear_probe(split_data["train"], split_data["val"], split_data["test"], ev.n_classes, ev.multilabel,
                         grid, ev.config.probe_max_iter, progress=bar.update)
    r = Result(protocol, source, details=d)
    extra = {"via": "probe"} if protocol.startswith("fewshot") else {}
    for metric in ("mAP", "top1", "top5"):
        if metric in d:
            r.add(protocol, metric, d[metric], **extra)
    return r


def knn_k(asked: int, bank_targets: torch.Tensor, multilabel: bool) -> int:
    """The k the kNN protocol uses: the configured one, lowered to the smallest class's count in the
    bank (single-label; a bank of 12 images per class outvotes every class with k=200) or to the
    bank's size (multi-label). Recorded in the report and its table when lowered."""
    if multilabel:
        return max(1, min(asked, len(bank_targets)))
    counts = torch.bincount(bank_targets[bank_targets >= 0])
    counts = counts[counts > 0]
    return max(1, min(asked, int(counts.min()) if len(counts) else asked))


@timed
def run_knn(ev: Evaluation, source: str) -> Result:
    """Weighted cosine kNN (k, T from the config): train features as the bank, test as queries."""
    bank, queries = ev.features(source, "train"), ev.features(source, "test")
    if ev.sources[source].standardize_for_knn:
        std = Standardizer.fit(bank)
        bank, queries = std(bank), std(queries)
    (ytr, _), (yte, igte) = ev.frozen_targets("train"), ev.frozen_targets("test")
    k, t = knn_k(ev.config.knn_k, ytr, ev.multilabel), ev.config.knn_t
    r = Result("knn", source, details={"k": k, "temperature": t})
    if k != ev.config.knn_k:
        r.details["k_asked"] = ev.config.knn_k
    if ev.multilabel:
        d = multilabel_ap(knn_scores_multilabel(bank, ytr, queries, k, t), yte, igte)
        r.details |= d
        r.add("knn", "mAP", d["mAP"])
    else:
        scores = knn_predict(bank, ytr, queries, ev.n_classes, k, t)
        r.details["top1"] = topk_accuracy(scores, yte, 1)
        r.add("knn", "top1", r.details["top1"])
    return r


def _train(ev: Evaluation, objective, idx: Optional[torch.Tensor], epochs: float, backbone_lr_ratio: float,
           desc: str = "fine-tune"):
    """Fine-tune ``objective.backbone`` + a new head on train (or its subset ``idx``)."""
    train = ev.split("train")
    y, ig = ev.targets("train")
    images = train["image"]
    if idx is not None:
        images, y, ig = images[idx], y[idx], (ig[idx] if ig is not None else None)
    c = ev.config
    steps = max(1, round(epochs * max(1, len(images) // min(c.finetune_batch_size, len(images)))))
    with ev.bar(steps, desc, "step") as bar:
        return train_classifier(objective.backbone, objective.preprocess, images, y, ev.n_classes,
                                image_size=ev.image_size, epochs=epochs, head_lr=c.finetune_lr,
                                backbone_lr=c.finetune_lr * backbone_lr_ratio, weight_decay=c.finetune_weight_decay,
                                batch_size=c.finetune_batch_size, seed=c.seed, device=ev.device,
                                multilabel=ev.multilabel, ignore=ig, execution=ev.execution, progress=bar.update)


def _finetune_result(ev: Evaluation, model, preprocess, protocol: str, source: str, **extra) -> Result:
    logits = predict(model, preprocess, ev.split("test")["image"], ev.device, ev.config.batch_size,
                     ev.execution)
    d = classifier_metrics(logits, ev.split("test"), ev.n_classes, ev.multilabel)
    r = Result(protocol, source, details=d)
    r.add(protocol, "mAP" if ev.multilabel else "top1", d["mAP"] if ev.multilabel else d["top1"], **extra)
    return r


@timed
def run_finetune(ev: Evaluation) -> Result:
    """The pretrained backbone + a new head, all trained on train (backbone at a lower lr)."""
    obj, c = ev.checkpoint.objective, ev.config
    model = _train(ev, obj, None, c.finetune_epochs, c.finetune_backbone_lr_ratio)
    r = _finetune_result(ev, model, obj.preprocess, "finetune", "pretrained")
    r.details |= {"epochs": c.finetune_epochs, "head_lr": c.finetune_lr,
                  "backbone_lr": c.finetune_lr * c.finetune_backbone_lr_ratio}
    return r


def fewshot_indices(ev: Evaluation) -> dict[str, torch.Tensor]:
    labels = ev.split("train")["label"]
    return {name: fewshot_subset(labels, frac, ev.config.seed) for name, frac in FEWSHOT.items()}


@timed
def run_fewshot(ev: Evaluation, source: str, via: Literal["probe", "finetune"]) -> Result:
    """1 % and 10 % class-balanced label subsets of train: probe on ``source`` features, or fine-tune.

    Fine-tuning ``pretrained`` starts from the checkpoint; ``supervised`` trains the architecture
    from scratch on the subset (the supervised reference in the few-label regime).
    """
    out = Result(f"fewshot_{via}", source, details={"via": via})
    epochs = ev.config.fewshot_epochs or 4 * ev.config.finetune_epochs
    for name, idx in fewshot_indices(ev).items():
        if via == "probe":
            r = run_probe(ev, source, train_idx=idx, protocol=name)
        elif source == "pretrained":
            model = _train(ev, ev.checkpoint.objective, idx, epochs, ev.config.finetune_backbone_lr_ratio,
                           f"fine-tune {name}")
            r = _finetune_result(ev, model, ev.checkpoint.objective.preprocess, name, source, via="finetune")
        else:  # supervised from scratch on the subset
            obj = features.random_init(ev.checkpoint.config, ev.manifest["channels"], ev.config.seed, "cpu")
            model = _train(ev, _Wrapped(obj), idx, epochs, 1.0, f"supervised {name}")
            r = _finetune_result(ev, model, obj.preprocess, name, source, via="finetune")
        out.rows += r.rows
        out.details[name] = r.details | {"labels": len(idx), "epochs": epochs if via == "finetune" else None}
    return out


class _Wrapped:
    """A FeatureSource seen as an objective (``.backbone`` + ``.preprocess``) for :func:`_train`."""

    def __init__(self, source: features.FeatureSource):
        self.backbone, self.preprocess = source.module, source.preprocess


@timed
def run_supervised(ev: Evaluation) -> Result:
    """The supervised reference: the architecture trained from scratch with all train labels.

    Its test figure is the ``finetune`` cell of the ``supervised`` column; its frozen backbone
    becomes the feature source ``supervised`` for the probe and kNN (saved to
    ``RUN/eval/supervised/backbone.pt``, whose hash keys its feature cache).
    """
    epochs = ev.supervised_epochs()
    init = features.random_init(ev.checkpoint.config, ev.manifest["channels"], ev.config.seed, "cpu")
    model = _train(ev, _Wrapped(init), None, epochs, 1.0, "supervised reference")
    r = _finetune_result(ev, model, init.preprocess, "finetune", "supervised")
    r.details |= {"epochs": epochs, "lr": ev.config.finetune_lr}
    buf = io.BytesIO()
    torch.save({"backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
                "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                "backbone_name": ev.checkpoint.config.backbone, "epochs": epochs, "seed": ev.config.seed}, buf)
    data = buf.getvalue()
    ev.loc.write_atomic("eval/supervised/backbone.pt", data, ev.fs)
    objective = _Wrapped(init)
    objective.backbone = model.backbone
    ev.sources["supervised"] = features.trained("supervised", objective, hashlib.sha256(data).hexdigest(), ev.device,
                                                ev.frozen_view)
    return r
