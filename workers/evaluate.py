"""Downstream evaluation: linear probe, kNN, fine-tune and few-label protocols, with baselines.

Plain functions, no Prefect (``flows/evaluate.py`` wraps them in tasks). The pieces:

* :class:`EvalConfig` — what to run, typed and validated before any work;
* :class:`Evaluation` — one run being evaluated: its manifest, the checkpoint (checked against the
  run), the splits held in memory and the feature sources, with features extracted once per
  source and split (``workers/features.py``, cached under ``RUN/eval/features/``);
* ``run_probe`` / ``run_knn`` / ``run_finetune`` / ``run_fewshot`` / ``run_supervised``
  (``workers/protocols.py``, re-exported here) — one protocol on one feature source each,
  returning a ``Result`` whose ``rows`` are the cells of the report's table;
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
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers import checkpoint as ckpt
from workers import features
from workers.config import ConfigError
from workers.data import load_split
from workers.probe import DEFAULT_WEIGHT_DECAYS
from workers.protocols import (FEWSHOT, Result, fewshot_subset, run_fewshot, run_finetune, run_knn,
                               run_probe, run_supervised)
from workers.shards import read_manifest
from workers.storage import RunLocation

PROTOCOLS = ("probe", "knn", "finetune", "fewshot")
BASELINES = ("raw_pixels", "random_init", "supervised")
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
    # AdamW; 1e-2 for the head (behind a parameter-free batch norm) and 1e-3 for the backbone fine-tuned
    # small CNNs/ResNets best in short schedules on Fashion-MNIST; lower it for ViTs.
    finetune_lr: float = Field(1e-2, gt=0, description="head learning rate (AdamW); also the supervised reference's")
    finetune_backbone_lr_ratio: float = Field(0.1, gt=0, le=1, description="backbone lr = ratio × head lr")
    finetune_weight_decay: float = Field(1e-4, ge=0)
    finetune_batch_size: int = Field(128, ge=2)
    fewshot_epochs: Optional[int] = Field(None, ge=1, description="default: 4 × finetune_epochs")
    supervised_epochs: Optional[int] = Field(None, ge=1, description="default: the pretraining's epochs")
    batch_size: int = Field(256, ge=1, description="feature extraction batch")
    frozen_input_size: Optional[int] = Field(
        None, ge=8, description="resolution the frozen backbones see (probe, kNN, few-label probe); default: "
                                "the pretraining image_size. Fine-tuning stays at image_size. Pick it on val "
                                "(see workers.features.at_size)")
    frozen_grid: int = Field(
        1, ge=1, le=4, description="frozen features (probe, kNN, few-label probe): each of the last frozen_stages "
                                   "feature maps average-pooled to a grid × grid grid and concatenated (Goyal et "
                                   "al. 2019); 1 with frozen_stages 1 is the backbone's own output (global pool)")
    frozen_stages: int = Field(1, ge=1, le=2, description="how many of the last stages frozen_grid pools (1 or 2)")
    precision: Literal["fp32", "bf16"] = Field(
        "bf16", description="bf16 autocast + channels_last for feature extraction and fine-tuning (CPU and GPU)")
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
        size = config.frozen_input_size if config.frozen_input_size not in (None, self.image_size) else None
        if size is not None and self.checkpoint.config.backbone.startswith("vit"):
            raise ConfigError(f"evaluate: frozen_input_size {size} differs from the ViT's image_size "
                              f"{self.image_size}; its position embeddings are fixed, leave frozen_input_size unset")
        self.frozen_input_size = size               # None: the frozen backbones see image_size
        self.frozen_view = features.FrozenView(size, config.frozen_grid, config.frozen_stages)
        self.classes = manifest.get("classes") or []
        self.multilabel = bool(manifest.get("multilabel"))
        self.protocols, self.refused = plan(manifest, config)
        self.sources: dict[str, features.FeatureSource] = {
            "pretrained": features.pretrained(self.checkpoint, self.device, self.frozen_view)}
        if "random_init" in config.baselines:
            self.sources["random_init"] = features.random_init(self.checkpoint.config, manifest["channels"],
                                                               config.seed, self.device, self.frozen_view)
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

    def feature_jobs(self) -> list[tuple[str, str]]:
        """(source, split) pairs whose frozen features the protocols (and the embedding plot) read."""
        frozen = set().union(*(NEEDS[p] for p in self.protocols if p in ("probe", "knn", "fewshot")))
        jobs = []
        for source in frozen_sources(self):
            need = frozen | ({self.embedding_split} if source == "pretrained" else set())
            jobs += [(source, s) for s in ("train", "val", "test") if s in need]
        return jobs

    def loaded_splits(self) -> dict[str, int]:
        """Samples of each split this evaluation read."""
        with self._lock:
            return {s: len(self._splits[s]["key"]) for s in ("train", "val", "test") if s in self._splits}

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
                                                           self.device, self.config.batch_size, self.fs,
                                                           self.config.precision)
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
    for source, split in ev.feature_jobs():
        ev.features(source, split)
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


__all__ = ["BASELINES", "FEWSHOT", "NEEDS", "PROTOCOLS", "EvalConfig", "Evaluation", "Result", "eval_config",
           "evaluate", "fewshot_subset", "frozen_sources", "plan", "run_fewshot", "run_finetune", "run_knn",
           "run_probe", "run_protocols", "run_supervised"]
