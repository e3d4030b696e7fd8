"""The protocols of an audio run, beside probe and kNN of the class (``workers/evaluate/protocols.py``).

An audio run's class protocols (probe, kNN, fine-tune, few-label) predict each utterance's class
(``spoken-digits``: the word) from the utterance vector: the backbone's output, the mean over time
of its frame features (``ssl_models/audio_encoder.py``); the input baseline is ``log_mel`` (each
band's mean and standard deviation). These predict a second label of the same utterances, read
from their labels for evaluation (the sidecar ``.json``'s ``audio_target`` key; ``spoken-digits``:
the voice), from the same frozen features (nothing is extracted twice):

* ``run_voice_probe`` — the linear probe (λ chosen on val), reported on test;
* ``run_voice_knn`` — weighted cosine kNN, train as the bank.

Speaker identity and word content pull representations in different directions (SUPERB reports
both for that reason), so the two rows together say what a backbone kept. An utterance without the
target is a refusal with the reason at run time, and the rest runs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from workers.evaluate.metrics import topk_accuracy
from workers.evaluate.probe import Standardizer, linear_probe
from workers.evaluate.protocols import Result, knn_k, timed
from workers.knn import knn_predict

# a workers.evaluate.evaluation.Evaluation (that module imports this one)
Evaluation = Any

NEEDS = {"voice_probe": ("train", "val", "test"), "voice_knn": ("train", "test")}


def target_classes(ev: Evaluation) -> Optional[list[str]]:
    """The sorted values of ``audio_target`` over every split's utterances, or None where one lacks it."""
    key = ev.config.audio_target
    with ev.lock_for("audio_target_classes"):
        if not hasattr(ev, "_audio_classes"):
            values: set[str] = set()
            missing = False
            for split in ("train", "val", "test"):
                if split in ev.manifest["splits"]:
                    infos = ev.split(split).get("info") or []
                    if len(infos) != len(ev.split(split)["key"]) or any(key not in i for i in infos):
                        missing = True
                        break
                    values |= {str(i[key]) for i in infos}
            ev._audio_classes = None if missing or not values else sorted(values)
        return ev._audio_classes


def targets(ev: Evaluation, split: str) -> torch.Tensor:
    """The target of each utterance the frozen features embed (train: the frozen subset). Shape: (N,)."""
    classes = target_classes(ev)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[str(i[ev.config.audio_target])] for i in ev.split(split)["info"]])
    sub = ev.frozen_train_index() if split == "train" else None
    return y if sub is None else y[sub]


def _refused(ev: Evaluation, protocol: str, source: str) -> Optional[Result]:
    if target_classes(ev) is None:
        ev.refuse(protocol, f"{protocol} needs each utterance's {ev.config.audio_target!r} in its labels for "
                            f"evaluation (a NAME.json beside each audio file); some have none")
        return Result(protocol, source)
    return None


@timed
def run_voice_probe(ev: Evaluation, source: str) -> Result:
    """Linear probe of ``audio_target`` on the frozen utterance features (λ chosen on val), on test."""
    r = _refused(ev, "voice_probe", source)
    if r is not None:
        return r
    parts = {s: (ev.features(source, s), targets(ev, s), None) for s in ("train", "val", "test")}
    grid = ev.config.probe_weight_decays
    with ev.bar(len(grid), f"voice probe {source} (λ grid)", "λ") as bar:
        d = linear_probe(parts["train"], parts["val"], parts["test"], len(target_classes(ev)), False, grid,
                         ev.config.probe_max_iter, progress=bar.update)
    r = Result("voice_probe", source, details=d | {"target": ev.config.audio_target,
                                                   "classes": len(target_classes(ev))})
    r.add("voice_probe", "top1", d["top1"])
    return r


@timed
def run_voice_knn(ev: Evaluation, source: str) -> Result:
    """Weighted cosine kNN of ``audio_target`` (k, T from the config), train as the bank, on test."""
    r = _refused(ev, "voice_knn", source)
    if r is not None:
        return r
    bank, queries = ev.features(source, "train"), ev.features(source, "test")
    if ev.sources[source].standardize_for_knn:
        std = Standardizer.fit(bank)
        bank, queries = std(bank), std(queries)
    ytr, yte = targets(ev, "train"), targets(ev, "test")
    k, t = knn_k(ev.config.knn_k, ytr, False), ev.config.knn_t
    scores = knn_predict(bank, ytr, queries, len(target_classes(ev)), k, t)
    r = Result("voice_knn", source, details={"k": k, "temperature": t, "target": ev.config.audio_target,
                                             "top1": topk_accuracy(scores, yte, 1)})
    r.add("voice_knn", "top1", r.details["top1"])
    return r


AUDIO_RUNS = {"voice_probe": run_voice_probe, "voice_knn": run_voice_knn}
