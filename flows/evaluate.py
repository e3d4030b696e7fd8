"""Prefect flow ``evaluate``: frozen features first, then the protocols as dependent tasks, then the report.

The graph: one task per (feature source, split) extracts features (cached in the run); each
probe / kNN / few-label probe task waits for the features it reads; fine-tuning and the
supervised reference need only the images and start at once; the supervised backbone's probe and
kNN wait for its training; an audio run's voice probe and kNN wait for the features they share with
the class protocols; a clip run's protocols (clip probe and kNN, label propagation, alignment)
are one task per protocol and frozen source, reading their own features; the report task waits for
everything. Tasks run in threads
(``ThreadPoolTaskRunner``): they share the splits and features held by one
``workers.evaluate.evaluation.Evaluation``, and torch releases the GIL in its kernels. All logic lives in
``workers/evaluate/evaluation.py``; each task here is a line or two.
"""
from __future__ import annotations

import time
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_plots
from flows.credentials import resolve as resolve_credentials
from workers.credentials import StorageOptions
from workers.evaluate.config import EvalConfig
from workers.evaluate.audio import AUDIO_RUNS, NEEDS as AUDIO_NEEDS
from workers.evaluate.audiovisual import AV_RUNS
from workers.evaluate.evaluation import (NEEDS, Evaluation, audio_protocols, av_protocols, av_sources, frozen_sources,
                                         video_protocols)
from workers.evaluate.protocols import Result, run_fewshot, run_finetune, run_knn, run_probe, run_supervised
from workers.evaluate.report import render_markdown, track_report, write_report
from workers.evaluate.video import VIDEO_RUNS
from workers.tracking import run_name

# Two task threads; each task computes inside one of ``Evaluation.compute_slots``: one at a time on
# a CPU (torch already spreads one protocol over every core, and two at once oversubscribe them),
# two on a GPU (two protocols keep it busy without fighting for memory).
THREADS = 2


@task(cache_policy=NONE, task_run_name="features-{source}-{split}")
def features_task(ev: Evaluation, source: str, split: str) -> int:
    with ev.compute_slots:
        return len(ev.features(source, split))


@task(cache_policy=NONE, task_run_name="probe-{source}")
def probe_task(ev: Evaluation, source: str) -> Result:
    with ev.compute_slots:
        return run_probe(ev, source)


@task(cache_policy=NONE, task_run_name="knn-{source}")
def knn_task(ev: Evaluation, source: str) -> Result:
    with ev.compute_slots:
        return run_knn(ev, source)


@task(cache_policy=NONE, task_run_name="finetune-pretrained")
def finetune_task(ev: Evaluation) -> Result:
    with ev.compute_slots:
        return run_finetune(ev)


@task(cache_policy=NONE, task_run_name="fewshot-{via}-{source}")
def fewshot_task(ev: Evaluation, source: str, via: str) -> Result:
    with ev.compute_slots:
        return run_fewshot(ev, source, via)


@task(cache_policy=NONE, task_run_name="supervised-reference")
def supervised_task(ev: Evaluation) -> Result:
    with ev.compute_slots:
        return run_supervised(ev)


@task(cache_policy=NONE, task_run_name="{protocol}-{source}")
def video_task(ev: Evaluation, protocol: str, source: str) -> Result:
    """A clip run's protocol (workers/evaluate/video.py) on one frozen source; it reads its own features."""
    with ev.compute_slots:
        return VIDEO_RUNS[protocol](ev, source)


@task(cache_policy=NONE, task_run_name="{protocol}-{source}")
def audio_task(ev: Evaluation, protocol: str, source: str) -> Result:
    """An audio run's protocol (workers/evaluate/audio.py) on one frozen source, on the shared features."""
    with ev.compute_slots:
        return AUDIO_RUNS[protocol](ev, source)


@task(cache_policy=NONE, task_run_name="{protocol}-{source}")
def av_task(ev: Evaluation, protocol: str, source: str) -> Result:
    """An audio-visual checkpoint's protocol (workers/evaluate/audiovisual.py) on the whole objective of ``source``."""
    with ev.compute_slots:
        return AV_RUNS[protocol](ev, source)


@task(cache_policy=NONE, task_run_name="report")
def report_task(ev: Evaluation, results: list[Result], started: float) -> dict:
    report = write_report(ev, results, total_seconds=time.perf_counter() - started, log=get_run_logger().info)
    create_markdown_artifact(key="gelato-evaluation", markdown=render_markdown(report),
                             description=f"gelato evaluation of {ev.loc.uri}")
    publish_plots(ev.loc, report["plots"], run_name(ev.loc))
    if ev.config.loggers:  # the report is written: a tracker that fails is said, and loses nothing
        try:
            where = track_report(ev.loc, ev.config.loggers, report, ev.fs)
            get_run_logger().info("tracking: %s", "; ".join(f"{n} {w}" for n, w in where.items()))
        except Exception as e:  # noqa: BLE001 - a tracking server down must not fail a finished evaluation
            get_run_logger().warning("experiment tracking failed (%s: %s); the report is in %s", type(e).__name__, e,
                                     report["report_file"])
    return report


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=THREADS), log_prints=False)
def evaluate_flow(run: str, config: Optional[EvalConfig] = None,
                  storage_options: Optional[StorageOptions] = None, progress_bar: bool = False) -> dict:
    """Evaluate ``run``'s checkpoint with ``config`` (an ``EvalConfig``; a deployment's mapping of its
    fields is validated into one by Prefect); returns report.json."""
    log = get_run_logger()
    started = time.perf_counter()
    ev = Evaluation(run, config or EvalConfig(), resolve_credentials(storage_options), log=log.info,
                    show_progress=progress_bar)
    for p, why in ev.refused.items():
        log.warning("not running %s: %s", p, why)
    log.info("evaluating %s on %s: protocols %s, features %s", ev.checkpoint.uri, run, ", ".join(ev.protocols) or "none",
             ", ".join(ev.sources))
    feats = {(s, split): features_task.submit(ev, s, split) for s, split in ev.feature_jobs()}
    needs = lambda s, p: [feats[s, sp] for sp in NEEDS[p]]  # noqa: E731
    futures = []
    for s in frozen_sources(ev):
        if "probe" in ev.protocols:
            futures.append(probe_task.submit(ev, s, wait_for=needs(s, "probe")))
        if "knn" in ev.protocols:
            futures.append(knn_task.submit(ev, s, wait_for=needs(s, "knn")))
        if "fewshot" in ev.protocols:
            futures.append(fewshot_task.submit(ev, s, "probe", wait_for=needs(s, "fewshot")))
    if "finetune" in ev.protocols:
        futures.append(finetune_task.submit(ev))
    if "fewshot" in ev.protocols:
        futures.append(fewshot_task.submit(ev, "pretrained", "finetune"))
    sup = None
    if "supervised" in ev.config.baselines and "supervised" not in ev.refused:
        sup = supervised_task.submit(ev)
        futures.append(sup)
        if "probe" in ev.protocols:
            futures.append(probe_task.submit(ev, "supervised", wait_for=[sup]))
        if "knn" in ev.protocols:
            futures.append(knn_task.submit(ev, "supervised", wait_for=[sup]))
        if "fewshot" in ev.protocols:
            futures.append(fewshot_task.submit(ev, "supervised", "finetune"))
    futures += [video_task.submit(ev, p, s) for p in video_protocols(ev) for s in frozen_sources(ev)]
    futures += [audio_task.submit(ev, p, s, wait_for=[feats[s, sp] for sp in AUDIO_NEEDS[p]])
                for p in audio_protocols(ev) for s in frozen_sources(ev)]
    futures += [av_task.submit(ev, p, s) for p in av_protocols(ev) for s in av_sources(ev)]
    if sup is not None:  # the supervised reference's frozen backbone, once trained
        futures += [video_task.submit(ev, p, "supervised", wait_for=[sup]) for p in video_protocols(ev)]
        futures += [audio_task.submit(ev, p, "supervised", wait_for=[sup]) for p in audio_protocols(ev)]
    report = report_task.submit(ev, futures, started, wait_for=list(feats.values())).result()
    log.info("report: %s/report.md (%s)", run, report["report_file"])
    return report
