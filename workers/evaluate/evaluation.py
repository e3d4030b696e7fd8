"""Downstream evaluation: linear probe, kNN, fine-tune and few-label protocols, with baselines.

Plain functions, no Prefect (``flows/evaluate.py`` wraps them in tasks). The pieces:

* :class:`EvalConfig` — what to run, typed and validated before any work;
* :class:`Evaluation` — one run being evaluated: its manifest, the checkpoint (checked against the
  run), the splits held in memory and the feature sources, with features extracted once per
  source and split (``workers/evaluate/features.py``, cached under ``RUN/eval/features/``);
* ``run_probe`` / ``run_knn`` / ``run_finetune`` / ``run_fewshot`` / ``run_supervised``
  (``workers/evaluate/protocols.py``) — one protocol on one feature source each,
  returning a ``Result`` whose ``rows`` are the cells of the report's table;
* a clip run's ``run_clip_probe`` / ``run_clip_knn`` / ``run_label_propagation`` / ``run_alignment``
  (``workers/evaluate/video.py``), its frame-level protocols reading each clip's middle frame;
* an audio run's ``run_voice_probe`` / ``run_voice_knn`` (``workers/evaluate/audio.py``): a second
  label of each utterance (its voice) on the same frozen features; its input baseline is ``log_mel``;
* :func:`evaluate` — everything in order, then the report (``workers/evaluate/report.py``).

Every protocol is reported on ``test``. The same splits, samples and protocol serve the
pretrained backbone and every baseline: ``raw_pixels`` (flattened, standardised pixels),
``random_init`` (the same architecture, seeded random weights) and ``supervised`` (the same
architecture trained from scratch with labels; optional since it is a training run). A protocol
that cannot run (unlabelled source, missing split) is refused with its reason, and the rest runs.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Optional

import torch

from workers.config import ConfigError
from workers.data import integrity
from workers.data.loader import load_split
from workers.data.manifest import read_manifest
from workers.evaluate import checkpoint as ckpt, features
from workers.evaluate.config import EvalConfig
from workers.evaluate.protocols import (fewshot_subset, run_fewshot, run_finetune, run_knn,
                                        run_probe, run_supervised)
from workers.evaluate.audio import AUDIO_RUNS, NEEDS as AUDIO_NEEDS
from workers.evaluate.audiovisual import AV_RUNS, SOURCES as AV_SOURCES
from workers.evaluate.video import NEEDS as VIDEO_NEEDS, VIDEO_RUNS
from workers.hardware import cap_torch_threads, keep_freed_memory, resolve_here
from workers.model import fixed_input_size
from workers.storage import RunLocation

NEEDS = {"probe": ("train", "val", "test"), "knn": ("train", "test"), "finetune": ("train", "test"),
         "fewshot": ("train", "val", "test"), "supervised": ("train", "test")}


def plan(manifest: dict, config: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """(protocols that can run, {protocol or "supervised": why it cannot}); raises ConfigError, with
    the reasons and what to do, where none can."""
    have = {s for s, v in manifest["splits"].items() if v.get("count", 0) > 0}
    wanted = list(config.protocols) + (["supervised"] if "supervised" in config.baselines else [])
    run, refused = [], {}
    for p in wanted:
        missing = [s for s in NEEDS[p] if s not in have]
        if not manifest.get("classes"):
            refused[p] = (f"{p} needs labels but the source is unlabelled (manifest.json has no classes); "
                          f"ingest an ImageFolder, Fashion-MNIST or VOC to evaluate with labels")
        elif missing:
            how = " and ".join(f"--{s}-fraction 0.1" for s in missing if s in ("val", "test"))
            refused[p] = (f"{p} needs the split(s) {', '.join(missing)} but the run has only "
                          f"{', '.join(sorted(have))}; re-ingest with {how or 'a source that has them'} "
                          f"(a seeded share of train held out)")
        elif p == "fewshot" and manifest.get("multilabel"):
            refused[p] = "fewshot: class-balanced label subsets are defined for single-label sources only"
        elif p != "supervised":
            run.append(p)
    if manifest.get("modality") == "clip":
        for p in config.video_protocols:
            missing = [s for s in VIDEO_NEEDS[p] if s not in have]
            if p.startswith("clip_") and not manifest.get("classes"):
                refused[p] = f"{p} needs the clips' classes but the source is unlabelled (no class sub-folders)"
            elif missing:
                refused[p] = f"{p} needs the split(s) {', '.join(missing)} but the run has only {', '.join(sorted(have))}"
            else:
                run.append(p)
    if manifest.get("modality") == "audio":
        for p in config.audio_protocols:
            missing = [s for s in AUDIO_NEEDS[p] if s not in have]
            if missing:
                refused[p] = f"{p} needs the split(s) {', '.join(missing)} but the run has only {', '.join(sorted(have))}"
            else:
                run.append(p)
    if not run:  # a report of "not run" cells, exiting 0, would hide it
        raise ConfigError("nothing to evaluate: " + "; ".join(refused.values()))
    return run, refused


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for but CUDA is not available here")
    return device


def check_run(run: str, config: EvalConfig, storage_options: Optional[dict] = None) -> tuple[dict[str, str], str]:
    """What ``gelato evaluate`` checks before Prefect starts, without building anything: the manifest,
    the shards' presence, the checkpoint and its match with the run, the frozen input size. Returns
    the protocols that cannot run, with the reason (:func:`plan`), and the checkpoint's sha256."""
    loc = RunLocation(run, storage_options or {})
    manifest, checkpoint = _manifest_and_checkpoint(loc, config, loc.fs())
    _frozen_input_size(config, checkpoint)
    init_path(config, checkpoint)
    return plan(manifest, config)[1], checkpoint.sha256


def init_path(config: EvalConfig, checkpoint) -> Optional[str]:
    """The weights of the init_from column: the config's, else those the pretraining started from;
    None where there is no such column (it comes with random_init, or when asked for by name)."""
    path = config.init_from or checkpoint.config.init_from
    if "init_from" in config.baselines and not path:
        raise ConfigError("evaluate: baselines: init_from needs the weights to compare with: the checkpoint's "
                          "pretraining started from random weights; set init_from: PATH")
    return path if path and ({"init_from", "random_init"} & set(config.baselines)) else None


def _manifest_and_checkpoint(loc: RunLocation, config: EvalConfig, fs) -> tuple[dict, "ckpt.Checkpoint"]:
    manifest = read_manifest(loc)
    if manifest is None:
        raise FileNotFoundError(f"{loc.uri}: no manifest.json; run `gelato ingest SOURCE --out {loc.uri}` first")
    # every shard is there with the manifest's size (one listing, no reads: sha256 is checked as they stream)
    integrity.check_shards(loc, manifest)
    return manifest, ckpt.load(loc, manifest, config.checkpoint, fs)


def _frozen_input_size(config: EvalConfig, checkpoint) -> Optional[int]:
    """The size the frozen backbones see when it differs from the checkpoint's image_size, else None."""
    image_size = checkpoint.config.image_size
    size = config.frozen_input_size if config.frozen_input_size not in (None, image_size) else None
    if size is not None and fixed_input_size(checkpoint.config.backbone):
        raise ConfigError(f"evaluate: frozen_input_size {size} differs from the {checkpoint.config.backbone}'s "
                          f"image_size {image_size}; its input size is fixed (a ViT's position embeddings), "
                          f"leave frozen_input_size unset")
    return size


class Evaluation:
    """One run under evaluation. Thread-safe: protocols may run concurrently (Prefect threads)."""

    def __init__(self, run: str, config: EvalConfig, storage_options: Optional[dict] = None, log=None,
                 show_progress: bool = False):
        self.loc = RunLocation(run, storage_options or {})
        self.requested = config                    # as asked (its hash keys report reuse); self.config: as run
        self.config = config
        self.fs = self.loc.fs()  # one instance for the whole evaluation (threads share it)
        manifest, self.checkpoint = _manifest_and_checkpoint(self.loc, config, self.fs)
        self.manifest = manifest
        self.device = resolve_device(config.device)
        self.execution = resolve_here(config.precision, self.device,
                                      None if config.channels_last == "auto" else bool(config.channels_last))
        # On a CPU one protocol at a time gets every core: two at once each spread over all cores
        # oversubscribe them (OpenMP teams spin-wait). A GPU keeps two busy.
        self.threads = cap_torch_threads() if self.device == "cpu" else None
        if self.device == "cpu":
            keep_freed_memory()  # the fine-tune's steps reuse their memory (workers/hardware.py)
        self.compute_slots = threading.Semaphore(1 if self.device == "cpu" else 2)
        self.image_size = self.checkpoint.config.image_size
        self._splits: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._locks: dict[object, threading.Lock] = {}
        self.clip_run = manifest.get("modality") == "clip"
        self.audio_run = manifest.get("modality") == "audio"
        self._classes = manifest.get("classes") or []
        # a clip run: the clips' classes (clip-level protocols); the frame-level ones use frame_classes()
        self.clip_classes = self._classes if self.clip_run else []
        self._frame_classes: Optional[list[str]] = None
        self.dense_side: Optional[int] = None  # side of the pretrained network's dense map (label propagation)
        self.multilabel = bool(manifest.get("multilabel"))
        self.protocols, self.refused = plan(manifest, config)
        if self.clip_run and getattr(self.checkpoint.objective, "modality", None) == "audiovisual":
            self.protocols += [p for p in config.av_protocols if p not in self.protocols]  # sound and picture
        self.init_from = init_path(config, self.checkpoint)
        self.budget = None
        if config.budget_minutes and self.audio_run:
            raise ConfigError("evaluate: budget_minutes is not measured for audio runs yet; size the evaluation "
                              "with limit, frozen_train_samples and finetune_epochs instead")
        if config.budget_minutes:
            self.budget = self._plan_budget(config)
            config = self.config = config.model_copy(update=self.budget.settings)
            if log is not None:
                log(self.budget.describe())
        size = _frozen_input_size(config, self.checkpoint)
        self.frozen_input_size = size               # None: the frozen backbones see image_size
        self.frozen_view = features.FrozenView(size, config.frozen_grid, config.frozen_stages)
        self.sources: dict[str, features.FeatureSource] = {
            "pretrained": features.pretrained(self.checkpoint, self.device, self.frozen_view)}
        if "random_init" in config.baselines:
            self.sources["random_init"] = features.random_init(self.checkpoint.config, manifest["channels"],
                                                               config.seed, self.device, self.frozen_view)
        if self.init_from:
            self.sources["init_from"] = features.initialised(self.checkpoint.config, manifest["channels"],
                                                             self.init_from, storage_options, self.device,
                                                             self.frozen_view)
        if self.audio_run and {"raw_pixels", "log_mel"} & set(config.baselines):  # the input itself, for audio
            self.sources["log_mel"] = features.log_mel(spans=config.frozen_grid)
        elif "raw_pixels" in config.baselines:
            self.sources["raw_pixels"] = features.raw_pixels(self.image_size)
        self.computed: list[tuple[str, str]] = []   # features computed (not loaded from the cache) here
        self.durations: dict[str, float] = {}
        self.show_progress = show_progress
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._frozen_train: Optional[torch.Tensor] = None

    def _plan_budget(self, config: EvalConfig):
        """Measure this machine's costs on the checkpoint's network and size the evaluation (``workers.evaluate.budget``)."""
        sup = self.supervised_epochs() if "supervised" in config.baselines and "supervised" not in self.refused else 0
        return plan_budget(self.loc, self.manifest, config, self.checkpoint.objective, self.image_size, self.execution,
                           self.device, tuple(self.protocols), sup, init_column=bool(self.init_from))

    # --- data and features, each computed once
    def lock_for(self, key) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())

    @property
    def classes(self) -> list[str]:
        """The classes of the frame-level protocols: the source's, or a clip run's :meth:`frame_classes`."""
        return self.frame_classes() if self.clip_run else self._classes

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def frame_target(self) -> str:
        """What a clip run's frame-level protocols predict: "item" (the item a frame shows) or "clip"."""
        return "item" if self.clip_run and self.frame_classes() is not self._classes else "clip"

    def frame_classes(self) -> list[str]:
        """A clip run's item classes, from the clips' ``info`` (``classes`` and ``class_names``) of
        every split; the clips' classes when no clip lists its items."""
        with self.lock_for("frame_classes"):
            if self._frame_classes is None:
                names: dict[int, str] = {}
                for split in ("train", "val", "test"):
                    if split in self.manifest["splits"] and "item_label" in self.split(split):
                        for info in self.split(split)["info"]:
                            names |= {int(i): str(n) for i, n in zip(info.get("classes", []),
                                                                     info.get("class_names", info.get("classes", [])))}
                self._frame_classes = [names.get(i, str(i)) for i in range(max(names) + 1)] if names else self._classes
            return self._frame_classes

    def refuse(self, protocol: str, why: str) -> None:
        """A protocol found at run time that it cannot run (e.g. the clips have no masks); the report says why."""
        with self._lock:
            self.refused[protocol] = why

    @property
    def embedding_split(self) -> str:
        return next(s for s in ("test", "val", "train") if s in self.manifest["splits"])

    def feature_jobs(self) -> list[tuple[str, str]]:
        """(source, split) pairs whose frozen features the protocols (and the embedding plot) read."""
        frozen = set().union(*(NEEDS[p] for p in self.protocols if p in ("probe", "knn", "fewshot")),
                             *(AUDIO_NEEDS[p] for p in self.protocols if p in AUDIO_NEEDS))
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
        with self.lock_for(("split", name)):
            if name not in self._splits:
                data = load_split(self.loc, self.manifest, name, self.config.limit, self.image_size,
                                  self.config.on_corrupt)
                if "item" in data and bool((data["item"] >= 0).all()):
                    # a clip run whose clips list their items: the frame-level protocols predict the item
                    # the middle frame shows; the clip-level ones read clip_label
                    data |= {"clip_label": data["label"], "label": data["item"], "item_label": True}
                if name != "test" and "clip" in data:  # label propagation, alignment, sound: test's only
                    data |= {"view": None, "masks": None, "audio": None}
                self._splits[name] = data
            return self._splits[name]

    def frozen_train_index(self) -> Optional[torch.Tensor]:
        """Sorted indices of the train samples the frozen protocols use, or None for all of them.

        ``frozen_train_samples``: a class-balanced subset seeded like the few-label ones (so it
        contains them when it holds at least 10 % of train); a seeded random subset for multi-label
        sources."""
        n = self.config.frozen_train_samples
        with self.lock_for("frozen_train"):
            if n is not None and self._frozen_train is None:
                labels = self.split("train")["label"]
                if n < len(labels):
                    if self.multilabel or not self.classes:
                        g = torch.Generator().manual_seed(self.config.seed)
                        self._frozen_train = torch.randperm(len(labels), generator=g)[:n].sort().values
                    else:
                        self._frozen_train = fewshot_subset(labels, n / len(labels), self.config.seed)
            return self._frozen_train

    def frozen_positions(self, idx: torch.Tensor) -> torch.Tensor:
        """Where the train indices ``idx`` sit among the frozen train samples (identity without a subset)."""
        sub = self.frozen_train_index()
        if sub is None:
            return idx
        pos = torch.searchsorted(sub, idx)
        if (pos >= len(sub)).any() or (sub[pos.clamp(max=len(sub) - 1)] != idx).any():
            raise ConfigError(f"evaluate: frozen_train_samples {len(sub)} does not contain the few-label subsets; "
                              "use at least 10 % of train")
        return pos

    def _frozen_data(self, split: str) -> tuple[str, dict]:
        data = self.split(split)
        sub = self.frozen_train_index() if split == "train" else None
        if sub is None:
            return split, data
        return f"train-{len(sub)}", {"key": [data["key"][i] for i in sub.tolist()], "image": data["image"][sub]}

    def features(self, source: str, split: str) -> torch.Tensor:
        """Frozen features of ``source`` on ``split`` (train: the frozen train samples)."""
        with self.lock_for((source, split)):
            if (source, split) not in self._features:
                t0 = time.perf_counter()
                name, data = self._frozen_data(split)
                with self.bar(len(data["image"]), f"features {source}/{split}", "img") as bar:
                    feats, computed = features.cached_features(self.loc, self.sources[source], name, data, self.device,
                                                               self.config.batch_size, self.fs, self.execution,
                                                               progress=bar.update)
                self._features[source, split] = feats
                if computed:
                    self.computed.append((source, split))
                    self.durations[f"features/{source}/{split}"] = time.perf_counter() - t0
            return self._features[source, split]

    def targets(self, split: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(targets, ignore) of a whole split: labels (N,) or multi-hot (N, C) with the difficult mask."""
        s = self.split(split)
        return (s["labels"], s["difficult"]) if self.multilabel else (s["label"], None)

    def frozen_targets(self, split: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`targets` of the samples :meth:`features` embeds (the frozen train subset for train)."""
        y, ig = self.targets(split)
        sub = self.frozen_train_index() if split == "train" else None
        if sub is None:
            return y, ig
        return y[sub], (ig[sub] if ig is not None else None)

    def bar(self, total: int, desc: str, unit: str):
        """A progress bar for one piece of work (``show_progress``), or one that draws nothing."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not self.show_progress,
                    mininterval=1.0)

    def supervised_epochs(self) -> int:
        if self.config.supervised_epochs:
            return self.config.supervised_epochs
        c = self.checkpoint.config
        steps = c.steps or (self.checkpoint.steps if c.budget_minutes else None)  # a budget chose the steps
        if steps:
            return max(1, math.ceil(steps * c.batch_size / self.manifest["splits"]["train"]["count"]))
        return max(1, math.ceil(c.epochs))


# ----------------------------------------------------------------------------- the time budget

def plan_budget(loc: RunLocation, manifest: dict, config: EvalConfig, objective, image_size: int, execution,
                device: str, protocols: tuple[str, ...], supervised_epochs: float = 0, init_column: bool = False):
    """Measure this machine's costs with ``objective``'s network (the checkpoint's, or the same
    architecture before it exists) and size the evaluation to ``config.budget_minutes``."""
    from workers.evaluate import budget as eval_budget

    t0 = time.perf_counter()
    sample = load_split(loc, manifest, "train", max(config.batch_size, config.finetune_batch_size), image_size,
                        config.on_corrupt)["image"]
    load_s = (time.perf_counter() - t0) / len(sample)
    classes = len(manifest.get("classes") or [])
    costs = eval_budget.measure_costs(objective, sample, execution, device, image_size, config, classes, load_s)
    lim = config.limit
    counts = {s: min(v["count"], lim) if lim else v["count"] for s, v in manifest["splits"].items()}
    networks = 1 + ("random_init" in config.baselines) + bool(supervised_epochs) + init_column
    return eval_budget.plan(costs, eval_budget.Counts(
        counts.get("train", 0), counts.get("val", 0), counts.get("test", 0), classes, protocols, networks,
        "raw_pixels" in config.baselines, supervised_epochs), config, config.budget_minutes)


def expected_evaluation(run: str, pretrain_config, config: EvalConfig, storage_options: Optional[dict] = None):
    """The evaluation plan for ``config.budget_minutes`` before the checkpoint exists: the costs are
    measured on the pretraining config's architecture with random weights (the same shapes, the
    same work). None without a budget."""
    if not config.budget_minutes:
        return None
    from workers.model import build_objective

    loc = RunLocation(run, storage_options or {})
    manifest = read_manifest(loc)
    device = resolve_device(config.device)
    execution = resolve_here(config.precision, device,
                             None if config.channels_last == "auto" else bool(config.channels_last))
    cap_torch_threads()
    with features.SEED_LOCK:
        torch.manual_seed(config.seed)
        objective = build_objective(pretrain_config, manifest["channels"]).eval()
    protocols, refused = plan(manifest, config)
    sup = 0
    if "supervised" in config.baselines and "supervised" not in refused:
        sup = config.supervised_epochs or max(1, math.ceil(pretrain_config.epochs))
    return plan_budget(loc, manifest, config, objective, pretrain_config.image_size, execution, device,
                       tuple(protocols), sup)


# ----------------------------------------------------------------------------- the whole stage

def frozen_sources(ev: Evaluation) -> list[str]:
    return [s for s in ("pretrained", "random_init", "init_from", "raw_pixels", "log_mel") if s in ev.sources]


def evaluate(run: str, config: EvalConfig, storage_options: Optional[dict] = None, log=print,
             show_progress: bool = False) -> dict:
    """Every protocol in sequence, then the report; returns report.json's content.

    ``flows/evaluate.py`` runs the same functions as dependent Prefect tasks, concurrently.
    """
    from workers.evaluate.report import write_report

    t0 = time.perf_counter()
    ev = Evaluation(run, config, storage_options, log=log, show_progress=show_progress)
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
    for p in video_protocols(ev):
        for s in video_sources(ev):
            yield VIDEO_RUNS[p](ev, s)
    for p in audio_protocols(ev):
        for s in video_sources(ev):
            yield AUDIO_RUNS[p](ev, s)
    for p in av_protocols(ev):
        for s in av_sources(ev):
            yield AV_RUNS[p](ev, s)


def video_sources(ev: Evaluation) -> list[str]:
    """The feature sources of the clip protocols: the frozen ones, and the supervised reference once trained."""
    return frozen_sources(ev) + (["supervised"] if "supervised" in ev.sources else [])


def video_protocols(ev: Evaluation) -> list[str]:
    """The clip-run protocols to run (``workers/evaluate/video.py``), in the config's order."""
    return [p for p in ev.protocols if p in VIDEO_RUNS]


def audio_protocols(ev: Evaluation) -> list[str]:
    """The audio-run protocols to run (``workers/evaluate/audio.py``), in the config's order."""
    return [p for p in ev.protocols if p in AUDIO_RUNS]


def av_protocols(ev: Evaluation) -> list[str]:
    """An audio-visual checkpoint's protocols to run (``workers/evaluate/audiovisual.py``)."""
    return [p for p in ev.protocols if p in AV_RUNS]


def av_sources(ev: Evaluation) -> list[str]:
    """The whole objectives the audio-visual protocols compare: the pretrained one, and random init if asked."""
    return [s for s in AV_SOURCES if s in ev.sources]
