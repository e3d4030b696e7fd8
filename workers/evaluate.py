"""Downstream evaluation: linear probe, kNN, fine-tune and few-label protocols, with baselines.

Plain functions, no Prefect (``flows/evaluate.py`` wraps them in tasks). The pieces:

* :class:`EvalConfig` — what to run, typed and validated before any work;
* :class:`Evaluation` — one run being evaluated: its manifest, the checkpoint (checked against the
  run), the splits held in memory and the feature sources, with features extracted once per
  source and split (``workers/features.py``, cached under ``RUN/eval/features/``);
* ``run_probe`` / ``run_knn`` / ``run_finetune`` / ``run_fewshot`` / ``run_supervised`` — one
  protocol on one feature source each, returning a :class:`Result` whose ``rows`` are the cells of
  the report's table;
* :func:`evaluate` — everything in order, then the report (``workers/report.py``).

Every protocol is reported on ``test``. The same splits, samples and protocol serve the
pretrained backbone and every baseline: ``raw_pixels`` (flattened, standardised pixels),
``random_init`` (the same architecture, seeded random weights) and ``supervised`` (the same
architecture trained from scratch with labels; optional since it is a training run). A protocol
that cannot run (unlabelled source, missing split) is refused with its reason, and the rest runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers import checkpoint as ckpt
from workers import features
from workers.config import ConfigError
from workers.data import load_split
from workers.finetune import classifier_metrics, predict, train_classifier
from workers.knn import knn_predict, knn_scores_multilabel
from workers.metrics import multilabel_ap, topk_accuracy
from workers.probe import DEFAULT_WEIGHT_DECAYS, Standardizer, linear_probe
from workers.shards import read_manifest
from workers.storage import RunLocation

PROTOCOLS = ("probe", "knn", "finetune", "fewshot")
BASELINES = ("raw_pixels", "random_init", "supervised")
FEWSHOT = {"fewshot_1pct": 0.01, "fewshot_10pct": 0.10}
NEEDS = {"probe": ("train", "val", "test"), "knn": ("train", "test"), "finetune": ("train", "test"),
         "fewshot": ("train", "val", "test"), "supervised": ("train", "test")}


class EvalConfig(BaseModel):
    """Everything ``gelato evaluate`` needs; defaults follow the protocols of the literature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocols: tuple[Literal["probe", "knn", "finetune", "fewshot"], ...] = PROTOCOLS
    baselines: tuple[Literal["raw_pixels", "random_init", "supervised"], ...] = ("raw_pixels", "random_init")
    checkpoint: Optional[str] = None          # default: RUN/checkpoints/final/backbone.pt
    seed: int = 0
    knn_k: int = Field(200, ge=1)             # InstDisc's protocol
    knn_t: float = Field(0.1, gt=0)
    probe_weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    probe_max_iter: int = Field(100, ge=1)
    finetune_epochs: int = Field(5, ge=1)
    finetune_lr: float = Field(1e-3, gt=0, description="head learning rate (AdamW)")
    finetune_backbone_lr_ratio: float = Field(0.1, gt=0, le=1, description="backbone lr = ratio × head lr")
    finetune_weight_decay: float = Field(1e-4, ge=0)
    finetune_batch_size: int = Field(128, ge=2)
    fewshot_epochs: Optional[int] = Field(None, ge=1, description="default: 4 × finetune_epochs")
    supervised_epochs: Optional[int] = Field(None, ge=1, description="default: the pretraining's epochs")
    batch_size: int = Field(256, ge=1, description="feature extraction batch")
    limit: Optional[int] = Field(None, ge=2, description="at most this many samples per split (quick runs)")
    device: str = "auto"

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def eval_config(**kwargs) -> EvalConfig:
    """Build an :class:`EvalConfig`; an invalid value fails with a ConfigError naming the key."""
    try:
        return EvalConfig(**kwargs)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(x) for x in err['loc'][:1])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("evaluate: " + "; ".join(msgs)) from None


def plan(manifest: dict, config: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """(protocols that can run, {protocol or "supervised": why it cannot})."""
    have = {s for s, v in manifest["splits"].items() if v.get("count", 0) > 0}
    wanted = list(config.protocols) + (["supervised"] if "supervised" in config.baselines else [])
    run, refused = [], {}
    for p in wanted:
        missing = [s for s in NEEDS[p] if s not in have]
        if not manifest.get("classes"):
            refused[p] = (f"{p} needs labels but the source is unlabelled (manifest.json has no classes); "
                          f"ingest an ImageFolder, Fashion-MNIST or VOC to evaluate with labels")
        elif missing:
            refused[p] = (f"{p} needs the split(s) {', '.join(missing)} but the run has only "
                          f"{', '.join(sorted(have))}; re-ingest with --val-fraction > 0 or a source with a test split")
        elif p == "fewshot" and manifest.get("multilabel"):
            refused[p] = "fewshot: class-balanced label subsets are defined for single-label sources only"
        elif p != "supervised":
            run.append(p)
    return run, refused


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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for but CUDA is not available here")
    return device


class Evaluation:
    """One run under evaluation. Thread-safe: protocols may run concurrently (Prefect threads)."""

    def __init__(self, run: str, config: EvalConfig, storage_options: Optional[dict] = None):
        self.loc = RunLocation(run, storage_options or {})
        self.config = config
        manifest = read_manifest(self.loc)
        if manifest is None:
            raise FileNotFoundError(f"{run}: no manifest.json; run `gelato ingest SOURCE --out {run}` first")
        self.manifest = manifest
        self.fs = self.loc.fs()  # one instance for the whole evaluation (threads share it)
        self.checkpoint = ckpt.load(self.loc, manifest, config.checkpoint, self.fs)
        self.device = resolve_device(config.device)
        self.image_size = self.checkpoint.config.image_size
        self.classes = manifest.get("classes") or []
        self.multilabel = bool(manifest.get("multilabel"))
        self.protocols, self.refused = plan(manifest, config)
        self.sources: dict[str, features.FeatureSource] = {
            "pretrained": features.pretrained(self.checkpoint, self.device)}
        if "random_init" in config.baselines:
            self.sources["random_init"] = features.random_init(self.checkpoint.config, manifest["channels"],
                                                               config.seed, self.device)
        if "raw_pixels" in config.baselines:
            self.sources["raw_pixels"] = features.raw_pixels(self.image_size)
        self.computed: list[tuple[str, str]] = []   # features computed (not loaded from the cache) here
        self.durations: dict[str, float] = {}
        self._splits: dict[str, dict] = {}
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._locks: dict[object, threading.Lock] = {}

    # --- data and features, each computed once
    def _lock_for(self, key) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def embedding_split(self) -> str:
        return next(s for s in ("test", "val", "train") if s in self.manifest["splits"])

    def feature_splits(self) -> list[str]:
        """Splits whose frozen features some protocol (or the embedding plot) needs."""
        need = {self.embedding_split}
        for p in self.protocols:
            need |= set(NEEDS[p])
        return [s for s in ("train", "val", "test") if s in need]

    def split(self, name: str) -> dict:
        with self._lock_for(("split", name)):
            if name not in self._splits:
                self._splits[name] = load_split(self.loc, self.manifest, name, self.config.limit, self.image_size)
            return self._splits[name]

    def features(self, source: str, split: str) -> torch.Tensor:
        with self._lock_for((source, split)):
            if (source, split) not in self._features:
                t0 = time.perf_counter()
                feats, computed = features.cached_features(self.loc, self.sources[source], split, self.split(split),
                                                           self.device, self.config.batch_size, self.fs)
                self._features[source, split] = feats
                if computed:
                    self.computed.append((source, split))
                    self.durations[f"features/{source}/{split}"] = time.perf_counter() - t0
            return self._features[source, split]

    def targets(self, split: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(targets, ignore): labels (N,) or multi-hot (N, C) with the difficult mask."""
        s = self.split(split)
        return (s["labels"], s["difficult"]) if self.multilabel else (s["label"], None)

    def supervised_epochs(self) -> int:
        if self.config.supervised_epochs:
            return self.config.supervised_epochs
        c = self.checkpoint.config
        if c.steps:
            return max(1, math.ceil(c.steps * c.batch_size / self.manifest["splits"]["train"]["count"]))
        return max(1, math.ceil(c.epochs))


# ----------------------------------------------------------------------------- protocols

def _timed(fn):
    def wrapper(ev: Evaluation, *args, **kwargs) -> Result:
        t0 = time.perf_counter()
        result = fn(ev, *args, **kwargs)
        result.seconds = time.perf_counter() - t0
        return result
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_timed
def run_probe(ev: Evaluation, source: str, train_idx: Optional[torch.Tensor] = None,
              protocol: str = "probe") -> Result:
    """Linear probe on frozen ``source`` features (λ chosen on val), reported on test."""
    split_data = {}
    for s in ("train", "val", "test"):
        x = ev.features(source, s)
        y, ig = ev.targets(s)
        if s == "train" and train_idx is not None:
            x, y, ig = x[train_idx], y[train_idx], (ig[train_idx] if ig is not None else None)
        split_data[s] = (x, y, ig)
    d = linear_probe(split_data["train"], split_data["val"], split_data["test"], ev.n_classes, ev.multilabel,
                     ev.config.probe_weight_decays, ev.config.probe_max_iter)
    r = Result(protocol, source, details=d)
    extra = {"via": "probe"} if protocol.startswith("fewshot") else {}
    for metric in ("mAP", "top1", "top5"):
        if metric in d:
            r.add(protocol, metric, d[metric], **extra)
    return r


@_timed
def run_knn(ev: Evaluation, source: str) -> Result:
    """Weighted cosine kNN (k, T from the config): train features as the bank, test as queries."""
    bank, queries = ev.features(source, "train"), ev.features(source, "test")
    if ev.sources[source].standardize_for_knn:
        std = Standardizer.fit(bank)
        bank, queries = std(bank), std(queries)
    (ytr, _), (yte, igte) = ev.targets("train"), ev.targets("test")
    k, t = ev.config.knn_k, ev.config.knn_t
    r = Result("knn", source, details={"k": k, "temperature": t})
    if ev.multilabel:
        d = multilabel_ap(knn_scores_multilabel(bank, ytr, queries, k, t), yte, igte)
        r.details |= d
        r.add("knn", "mAP", d["mAP"])
    else:
        scores = knn_predict(bank, ytr, queries, ev.n_classes, k, t)
        r.details["top1"] = topk_accuracy(scores, yte, 1)
        r.add("knn", "top1", r.details["top1"])
    return r


def _train(ev: Evaluation, objective, idx: Optional[torch.Tensor], epochs: int, backbone_lr_ratio: float):
    """Fine-tune ``objective.backbone`` + a new head on train (or its subset ``idx``)."""
    train = ev.split("train")
    y, ig = ev.targets("train")
    images = train["image"]
    if idx is not None:
        images, y, ig = images[idx], y[idx], (ig[idx] if ig is not None else None)
    c = ev.config
    return train_classifier(objective.backbone, objective.preprocess, images, y, ev.n_classes,
                            image_size=ev.image_size, epochs=epochs, head_lr=c.finetune_lr,
                            backbone_lr=c.finetune_lr * backbone_lr_ratio, weight_decay=c.finetune_weight_decay,
                            batch_size=c.finetune_batch_size, seed=c.seed, device=ev.device,
                            multilabel=ev.multilabel, ignore=ig)


def _finetune_result(ev: Evaluation, model, preprocess, protocol: str, source: str, **extra) -> Result:
    logits = predict(model, preprocess, ev.split("test")["image"], ev.device, ev.config.batch_size)
    d = classifier_metrics(logits, ev.split("test"), ev.n_classes, ev.multilabel)
    r = Result(protocol, source, details=d)
    r.add(protocol, "mAP" if ev.multilabel else "top1", d["mAP"] if ev.multilabel else d["top1"], **extra)
    return r


@_timed
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


@_timed
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
            model = _train(ev, ev.checkpoint.objective, idx, epochs, ev.config.finetune_backbone_lr_ratio)
            r = _finetune_result(ev, model, ev.checkpoint.objective.preprocess, name, source, via="finetune")
        else:  # supervised from scratch on the subset
            obj = features.random_init(ev.checkpoint.config, ev.manifest["channels"], ev.config.seed, "cpu")
            model = _train(ev, _Wrapped(obj), idx, epochs, 1.0)
            r = _finetune_result(ev, model, obj.preprocess, name, source, via="finetune")
        out.rows += r.rows
        out.details[name] = r.details | {"labels": len(idx), "epochs": epochs if via == "finetune" else None}
    return out


class _Wrapped:
    """A FeatureSource seen as an objective (``.backbone`` + ``.preprocess``) for :func:`_train`."""

    def __init__(self, source: features.FeatureSource):
        self.backbone, self.preprocess = source.module, source.preprocess


@_timed
def run_supervised(ev: Evaluation) -> Result:
    """The supervised reference: the architecture trained from scratch with all train labels.

    Its test figure is the ``finetune`` cell of the ``supervised`` column; its frozen backbone
    becomes the feature source ``supervised`` for the probe and kNN (saved to
    ``RUN/eval/supervised/backbone.pt``, whose hash keys its feature cache).
    """
    import io

    epochs = ev.supervised_epochs()
    init = features.random_init(ev.checkpoint.config, ev.manifest["channels"], ev.config.seed, "cpu")
    model = _train(ev, _Wrapped(init), None, epochs, 1.0)
    r = _finetune_result(ev, model, init.preprocess, "finetune", "supervised")
    r.details |= {"epochs": epochs, "lr": ev.config.finetune_lr}
    buf = io.BytesIO()
    torch.save({"backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
                "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                "backbone_name": ev.checkpoint.config.backbone, "epochs": epochs, "seed": ev.config.seed}, buf)
    data = buf.getvalue()
    features.write_file(ev.loc, "eval/supervised/backbone.pt", data, ev.fs)
    objective = _Wrapped(init)
    objective.backbone = model.backbone
    ev.sources["supervised"] = features.trained("supervised", objective, hashlib.sha256(data).hexdigest(), ev.device)
    return r


# ----------------------------------------------------------------------------- the whole stage

def frozen_sources(ev: Evaluation) -> list[str]:
    return [s for s in ("pretrained", "random_init", "raw_pixels") if s in ev.sources]


def evaluate(run: str, config: EvalConfig, storage_options: Optional[dict] = None, log=print) -> dict:
    """Every protocol in sequence, then the report; returns report.json's content.

    ``flows/evaluate.py`` runs the same functions as dependent Prefect tasks, concurrently.
    """
    from workers.report import write_report

    t0 = time.perf_counter()
    ev = Evaluation(run, config, storage_options)
    for p, why in ev.refused.items():
        log(f"refused {p}: {why}")
    for split in ev.feature_splits():
        for s in frozen_sources(ev):
            ev.features(s, split)
    results = [r for r in run_protocols(ev)]
    return write_report(ev, results, total_seconds=time.perf_counter() - t0)


def run_protocols(ev: Evaluation):
    """Yield every Result the config asks for, in the order the flow's tasks run them."""
    sources = frozen_sources(ev)
    for s in sources:
        if "probe" in ev.protocols:
            yield run_probe(ev, s)
        if "knn" in ev.protocols:
            yield run_knn(ev, s)
        if "fewshot" in ev.protocols:
            yield run_fewshot(ev, s, "probe")
    if "finetune" in ev.protocols:
        yield run_finetune(ev)
    if "fewshot" in ev.protocols:
        yield run_fewshot(ev, "pretrained", "finetune")
    if "supervised" in ev.config.baselines and "supervised" not in ev.refused:
        yield run_supervised(ev)
        for p, fn in (("probe", run_probe), ("knn", run_knn)):
            if p in ev.protocols:
                yield fn(ev, "supervised")
        if "fewshot" in ev.protocols:
            yield run_fewshot(ev, "supervised", "finetune")
