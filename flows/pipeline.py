"""Prefect flow ``pipeline``: ingest → pretrain → {probe, knn, finetune, fewshot} → report.

Parameters are one typed config (:class:`PipelineConfig`): Prefect validates it when the run is
submitted, so a bad value fails naming the field before any stage runs. Every stage is
idempotent and keyed on what it depends on: ingest on the source fingerprint and its parameters
(a finished ingest is reused), pretraining on the training-config hash (a finished run is
reused, a killed one resumes from its last checkpoint), evaluation on the checkpoint's sha256
and the evaluation-config hash (a matching report is reused). Rerunning a finished pipeline
does no work; changing only evaluation settings reruns only evaluation.
"""
from __future__ import annotations

import hashlib
import re
from typing import Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from flows.artifacts import publish_plots
from flows.credentials import resolve as resolve_credentials
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.pretrain import pretrain_task
from workers.config import PretrainConfig, load_model
from workers.credentials import StorageOptions
from workers.evaluate.config import EvalConfig
from workers.evaluate.report import render_markdown, results_table, table_text
from workers.evaluate.report import reusable_report as find_report
from workers.model import BACKBONE_FILE, check_buildable
from workers.storage import RunLocation
from workers.tracking import run_name


class IngestSettings(BaseModel):
    """The ingest stage's arguments (those of ``gelato ingest``)."""

    model_config = ConfigDict(extra="forbid")

    source: str = "fashion-mnist"
    shard_size: int = Field(1000, ge=1)
    image_format: str = "keep"
    val_fraction: Optional[float] = Field(None, ge=0, lt=1)
    test_fraction: Optional[float] = Field(None, ge=0, lt=1)
    seed: int = 0
    data_root: Optional[str] = None
    kind: str = "auto"
    # video sources (``gelato ingest --clip-*``): frames per clip, frame rate, side, how frames are stored
    clip_frames: int = Field(16, ge=1)
    clip_fps: float = Field(10.0, gt=0)
    clip_size: Optional[int] = Field(None, ge=8)
    clip_codec: Literal["png", "ffv1", "h264"] = "png"
    # audio sources (``gelato ingest --audio-*``): sample rate, segment length in seconds
    audio_rate: int = Field(16000, ge=1000)
    audio_seconds: float = Field(1.0, gt=0.05)


class PipelineConfig(BaseModel):
    """One pipeline run: where, what source, how to pretrain, how to evaluate."""

    model_config = ConfigDict(extra="forbid")

    name: str = "demo"
    run: str = "runs/demo"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    address: Optional[str] = None          # Ray cluster for pretraining (default: local / $RAY_ADDRESS)
    # experiment trackers for both stages (workers/tracking.py); pretrain.loggers / evaluate.loggers add to them
    loggers: tuple[Literal["tensorboard", "mlflow"], ...] = ()
    storage_options: StorageOptions = Field(default_factory=StorageOptions)  # credentials never written


def load_pipeline_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """YAML + ``key=value`` overrides (``pretrain.epochs=5``, ``evaluate.finetune_epochs=2``); errors name the key."""
    return load_model(PipelineConfig, path, overrides)


def _union(*lists) -> tuple:
    return tuple(dict.fromkeys(x for xs in lists for x in xs))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "run"


def _sha256(loc: RunLocation, rel: str) -> Optional[str]:
    fs = loc.fs()
    try:
        with fs.open(loc.join(rel), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def reusable_report(loc: RunLocation, evaluation: EvalConfig) -> Optional[dict]:
    """The report made from the current final checkpoint with these evaluation settings, if any."""
    if evaluation.checkpoint is not None:
        return None
    return find_report(loc, evaluation.config_hash(), _sha256(loc, BACKBONE_FILE))


def expectations(run: str, pretrain: PretrainConfig, evaluation: EvalConfig, opts: dict) -> list[str]:
    """What the stages will do and how long they should take, from steps measured here."""
    from workers.evaluate.evaluation import expected_evaluation
    from workers.pretrain.launch import expected_pretraining

    loc = RunLocation(run, opts)
    lines = [expected_pretraining(loc, pretrain)]
    if reusable_report(loc, evaluation) is not None:
        return lines + ["evaluation: already done for this checkpoint and these settings (reused)"]
    try:
        plan = expected_evaluation(run, pretrain, evaluation, opts)
    except Exception as e:  # noqa: BLE001 - an estimate is not worth failing the run over
        return lines + [f"evaluation: no estimate ({type(e).__name__}: {e})"]
    if plan is None:
        return lines + ["evaluation: no budget_minutes set; each protocol shows its progress"]
    return lines + [plan.describe() + " (measured on this architecture; planned again when evaluation starts)"]


@task(cache_policy=NONE)
def publish(cfg: PipelineConfig, run: str, loc: RunLocation, report: dict) -> list[dict]:
    """Prefect artifacts: the results table (stable key per run name), the report, links to the plots.
    ``loc`` carries the resolved credentials (``cfg`` may only name a Secret block)."""
    rows = results_table(report)
    key = f"gelato-results-{_slug(cfg.name)}"
    create_table_artifact(key=key, table=rows, description=f"gelato results for {run} (top-1 / mAP, %)")
    md = render_markdown(report)
    create_markdown_artifact(key=f"gelato-report-{_slug(cfg.name)}", markdown=md, description=f"report of {run}")
    return rows


@flow(name="pipeline")
def pipeline_flow(config: PipelineConfig, progress_bar: bool = True) -> dict:
    """The whole pipeline on one config; returns report.json's content."""
    log = get_run_logger()
    cfg = config
    run = RunLocation.normalise(cfg.run)
    check_buildable(cfg.pretrain)  # a parameter value the objective refuses fails before the ingest
    opts = resolve_credentials(cfg.storage_options)
    pre = cfg.pretrain.model_copy(update={"storage_options": opts if opts else
                                          resolve_credentials(cfg.pretrain.storage_options),
                                          "loggers": _union(cfg.loggers, cfg.pretrain.loggers)})
    evaluation = cfg.evaluate.model_copy(update={"loggers": _union(cfg.loggers, cfg.evaluate.loggers)})
    ing = cfg.ingest
    ingest_flow(ing.source, run, shard_size=ing.shard_size, image_format=ing.image_format,
                val_fraction=ing.val_fraction, test_fraction=ing.test_fraction, seed=ing.seed,
                data_root=ing.data_root, kind=ing.kind, storage_options=opts, progress_bar=progress_bar,
                clip_frames=ing.clip_frames, clip_fps=ing.clip_fps, clip_size=ing.clip_size, clip_codec=ing.clip_codec,
                audio_rate=ing.audio_rate, audio_seconds=ing.audio_seconds)
    loc = RunLocation(run, opts)
    log.info("what to expect on this machine:\n  %s", "\n  ".join(expectations(run, pre, evaluation, opts)))
    pretrain_task(run, pre, cfg.address, False, progress_bar)
    report = reusable_report(loc, evaluation)
    if report is not None:
        publish_plots(loc, report.get("plots", {}), run_name(loc))  # an evaluation publishes its own
        log.info("evaluation of this checkpoint with these settings is already in %s/%s", run,
                 report.get("report_file", "report.json"))
    else:
        report = evaluate_flow(run, evaluation, opts, progress_bar)
    rows = publish(cfg, run, loc, report)
    log.info("results (%%, test split):\n%s", table_text(rows))
    return report
