"""The protocols of a clip run, beside the frame-level ones of ``workers/evaluate/protocols.py``.

A clip run's frame-level protocols (probe, kNN, fine-tune, few-label) read each clip's middle
frame, labelled with the item it shows (``info["classes"]`` and the masks; else the clip's class).
These read whole clips of the same splits, frozen, on every frozen feature source:

* ``run_clip_probe`` / ``run_clip_knn`` — the clip's class (``moving-fashion-mnist``: its kind of
  motion) from the features of ``clip_eval_frames`` evenly spaced frames, concatenated in time
  order (what one frame cannot show, a few can);
* ``run_label_propagation`` — the first frame's masks carried through each test clip by feature
  affinity, scored by J (``workers/evaluate/correspondence.py``): the downstream task of the
  cycle-consistency and colorization papers;
* ``run_alignment`` — each frame of the main camera matched to the nearest frame of the second
  camera of the same clip (TCN's alignment).

A protocol whose data the run lacks (no masks, no second camera) is refused with the reason at run
time, and the rest runs.
"""
from __future__ import annotations

from typing import Any

import torch

from workers.evaluate.correspondence import alignment, first_labels, j_score, propagate
from workers.evaluate.features import cached_features
from workers.evaluate.metrics import topk_accuracy
from workers.evaluate.probe import Standardizer, linear_probe
from workers.evaluate.protocols import Result, timed, knn_k
from workers.knn import knn_predict

# a workers.evaluate.evaluation.Evaluation (that module imports this one)
Evaluation = Any

NEEDS = {"clip_probe": ("train", "val", "test"), "clip_knn": ("train", "test"), "label_propagation": ("test",),
         "alignment": ("test",)}


def frame_index(frames: int, every: int) -> torch.Tensor:
    """``every`` evenly spaced frame indices of a clip of ``frames`` frames, first and last included."""
    return torch.linspace(0, frames - 1, min(every, frames)).round().long()


def _cached(ev: Evaluation, source: str, name: str, keys: list[str], frames: torch.Tensor, desc: str) -> torch.Tensor:
    """Frozen features of ``frames`` (N, C, S, S), cached in the run as ``name``."""
    with ev.bar(len(frames), f"{desc} {source}", "frame") as bar:
        feats, computed = cached_features(ev.loc, ev.sources[source], name, {"key": keys, "image": frames},
                                          ev.device, ev.config.batch_size, ev.fs, ev.execution, progress=bar.update)
    if computed:
        ev.computed.append((source, name))
    return feats


def clip_features(ev: Evaluation, source: str, split: str) -> torch.Tensor:
    """Features of ``clip_eval_frames`` frames of each clip, concatenated. Shape: (N, F·D)."""
    with ev.lock_for(("clip_features", source, split)):
        data = ev.split(split)
        idx = frame_index(data["clip"].shape[1], ev.config.clip_eval_frames)
        frames = data["clip"][:, idx]                                              # (N, F, C, S, S)
        keys = [f"{k}#{int(i)}" for k in data["key"] for i in idx]
        feats = _cached(ev, source, f"{split}-clip{len(idx)}", keys, frames.flatten(0, 1), "clip features")
        return feats.view(len(frames), -1)


def clip_targets(ev: Evaluation, split: str) -> torch.Tensor:
    data = ev.split(split)
    return data.get("clip_label", data["label"])


@timed
def run_clip_probe(ev: Evaluation, source: str) -> Result:
    """Linear probe of the clip's class on :func:`clip_features` (λ chosen on val), reported on test."""
    parts = {s: (clip_features(ev, source, s), clip_targets(ev, s), None) for s in ("train", "val", "test")}
    grid = ev.config.probe_weight_decays
    with ev.bar(len(grid), f"clip probe {source} (λ grid)", "λ") as bar:
        d = linear_probe(parts["train"], parts["val"], parts["test"], len(ev.clip_classes), False, grid,
                         ev.config.probe_max_iter, progress=bar.update)
    r = Result("clip_probe", source, details=d | {"frames": ev.config.clip_eval_frames})
    r.add("clip_probe", "top1", d["top1"])
    return r


@timed
def run_clip_knn(ev: Evaluation, source: str) -> Result:
    """Weighted cosine kNN of the clip's class on :func:`clip_features` (train as the bank)."""
    bank, queries = clip_features(ev, source, "train"), clip_features(ev, source, "test")
    if ev.sources[source].standardize_for_knn:
        std = Standardizer.fit(bank)
        bank, queries = std(bank), std(queries)
    ytr, yte = clip_targets(ev, "train"), clip_targets(ev, "test")
    k = knn_k(ev.config.knn_k, ytr, False)
    scores = knn_predict(bank, ytr, queries, len(ev.clip_classes), k, ev.config.knn_t)
    r = Result("clip_knn", source, details={"k": k, "temperature": ev.config.knn_t,
                                            "top1": topk_accuracy(scores, yte, 1)})
    r.add("clip_knn", "top1", r.details["top1"])
    return r


def dense_grid(ev: Evaluation) -> int:
    """The side of the pretrained network's dense feature map (raw pixels use the same grid)."""
    with ev.lock_for("dense_grid"):
        if ev.dense_side is None:
            frame = ev.split("test")["clip"][:1, 0].to(ev.device)
            ev.dense_side = int(ev.sources["pretrained"].dense(frame, ev.execution).shape[-1])
        return ev.dense_side


@timed
def run_label_propagation(ev: Evaluation, source: str) -> Result:
    """J of the first frame's masks propagated through each test clip (main camera)."""
    data = ev.split("test")
    r = Result("label_propagation", source)
    if data.get("masks") is None:
        ev.refuse("label_propagation", "label propagation needs per-frame masks (NAME.masks.npz beside each "
                                       "video); the test clips have none")
        return r
    c = ev.config
    clips, masks = data["clip"], data["masks"]
    on_grid = {"grid": dense_grid(ev)} if ev.sources[source].module is None else {}  # raw pixels: the network's grid
    per_object, clips_scored = [], 0
    step = max(1, c.batch_size // clips.shape[1])                                  # clips per batch
    with ev.bar(len(clips), f"label propagation {source}", "clip") as bar:
        for i in range(0, len(clips), step):
            batch = clips[i:i + step]
            dense = ev.sources[source].dense(batch.flatten(0, 1).to(ev.device), ev.execution, **on_grid).cpu()
            dense = dense.view(len(batch), batch.shape[1], *dense.shape[1:])       # (b, T, D, h, w)
            for j, feats in enumerate(dense):
                m = masks[i + j]
                first = first_labels(m[0], int(m.max()) + 1, tuple(feats.shape[-2:]))
                labels = propagate(feats, first, c.propagation_topk, c.propagation_temperature,
                                   c.propagation_context, c.propagation_radius)
                scores = j_score(labels, m)
                per_object += list(scores.values())
                clips_scored += bool(scores)
            bar.update(len(batch))
    j = sum(per_object) / max(1, len(per_object))
    r.details = {"J": j, "objects": len(per_object), "clips": clips_scored,
                 "J_recall": sum(x > 0.5 for x in per_object) / max(1, len(per_object)),
                 "feature_map": list(dense.shape[-2:]), "topk": c.propagation_topk,
                 "temperature": c.propagation_temperature, "context": c.propagation_context,
                 "radius": c.propagation_radius}
    r.add("label_propagation", "J", j)
    return r


@timed
def run_alignment(ev: Evaluation, source: str) -> Result:
    """Each frame of the test clips' main camera matched to the nearest frame of their second camera."""
    data = ev.split("test")
    r = Result("alignment", source)
    if data.get("view") is None:
        ev.refuse("alignment", "cross-view alignment needs a second camera of every clip (NAME.VIEW.EXT beside "
                               "each video); the test clips have none")
        return r
    n, t = data["clip"].shape[:2]
    keys = [f"{k}#{i}" for k in data["key"] for i in range(t)]
    a = _cached(ev, source, "test-frames", keys, data["clip"].flatten(0, 1), "frames").view(n, t, -1)
    b = _cached(ev, source, "test-view-frames", keys, data["view"].flatten(0, 1), "view frames").view(n, t, -1)
    scores = [alignment(x, y) for x, y in zip(a, b)]
    acc = sum(s[0] for s in scores) / n
    r.details = {"accuracy": acc, "error": sum(s[1] for s in scores) / n, "clips": n, "frames": t,
                 "chance": 1 / t}
    r.add("alignment", "top1", acc)
    return r


VIDEO_RUNS = {"clip_probe": run_clip_probe, "clip_knn": run_clip_knn, "label_propagation": run_label_propagation,
              "alignment": run_alignment}
