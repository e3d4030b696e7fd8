"""The functions behind ``import gelato`` (see the package's docstring), and behind the command line:
each checks its inputs and storage before any Prefect or Ray machinery starts (a typo fails in a
second, naming what is wrong), runs the same Prefect flow or worker function as the stage, and
returns a small typed result. ``gelato/cli.py`` only parses arguments, calls these and prints."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

ConfigLike = Union[None, str, dict, Any]   # a typed config, a dict of its fields, or a YAML path


def _config(model, config: ConfigLike, overrides: Sequence[str]):
    """``config`` as ``model``: validated, with ``overrides`` applied; errors name the key."""
    from workers.config import load_model

    if isinstance(config, model):
        return load_model(model, None, list(overrides), base=config.model_dump(exclude_unset=True)) if overrides \
            else config
    if isinstance(config, dict):
        return load_model(model, None, list(overrides), base=config)
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_model(model, os.fspath(config) if config is not None else None, list(overrides))
    raise TypeError(f"config: a {model.__name__}, a dict of its fields or a YAML path, not {type(config).__name__}")


@dataclass
class IngestResult:
    run: str
    count: int
    splits: dict[str, int]
    classes: Optional[list[str]]
    rejected: list[dict]
    manifest: dict = field(repr=False)


@dataclass
class PretrainResult:
    run: str
    steps: int
    backbone: str              # the exported checkpoints/final/backbone.pt
    summary: dict = field(repr=False)


@dataclass
class EvalResult:
    run: str
    table: list[dict]          # one row per line of report.md's table: {"protocol": ..., "pretrained": %, ...}
    report: dict = field(repr=False)
    reused: bool = False       # the run already held this checkpoint's evaluation with these settings

    def __str__(self) -> str:
        from workers.evaluate.report import table_markdown

        return table_markdown(self.table)


@dataclass
class ExportResult:
    path: str
    spec: dict                 # what path + ".json" holds: architecture, input, normalisation, check


@dataclass
class EmbedResult:
    out: str
    count: int
    feature_dim: int
    parts: int
    parts_written: int = 0     # written by this call (the others were there: a resumed or repeated call)


@dataclass
class Backbone:
    """A pretrained backbone with the input preprocessing it was trained with: call it on uint8
    images (B, C, H, W) to get features (B, feature_dim), as evaluation computes them."""

    module: Any                # torch.nn.Module, in eval mode
    preprocess: Any            # uint8 (B, C, H, W) -> normalised float (B, C, image_size, image_size)
    feature_dim: int
    image_size: int
    in_channels: int

    def __call__(self, images):
        import torch

        with torch.no_grad():
            return self.module(self.preprocess(images))


def check_loggers(loggers) -> None:
    from workers.tracking import check_loggers as check

    check(loggers)


def _note(message: str) -> None:
    print(f"gelato: {message}", file=sys.stderr)


def _resolved(opts: Optional[dict]):
    """``opts`` as StorageOptions, with the credentials of a Prefect Secret block they name (Prefect's
    server is waited for first: the pre-flight checks need the credentials)."""
    from flows import prefect_server
    from workers.credentials import BLOCK, StorageOptions

    opts = StorageOptions(opts or {})
    if not opts.get(BLOCK):
        return opts
    prefect_server.wait_ready()
    from flows.credentials import resolve

    return resolve(opts)


def storage_options_of(path: Optional[str]) -> dict:
    """The ``storage_options`` (s3fs keyword arguments) of a YAML file; {} without one."""
    from workers.config import read_config_file, storage_options_in

    return storage_options_in(read_config_file(path), path)


def _check_s3(loc) -> None:
    """The bucket answers with these credentials (one listing); local runs are checked by reading them."""
    from workers.storage import check_writable

    if loc.is_s3:
        check_writable(loc)


GENERATED = ("fashion-mnist", "fashion_mnist", "fmnist", "moving-fashion-mnist", "moving_fashion_mnist", "mfmnist",
             "spoken-digits", "spoken_digits", "moving-fashion-mnist-sound", "moving_fashion_mnist_sound",
             "mfmnist-sound")


def _check_source(source: str, kind: str) -> None:
    from workers.ingest.records import SourceError

    if source in GENERATED or kind in ("fashion-mnist", "moving-fashion-mnist", "moving-fashion-mnist-sound",
                                                       "spoken-digits"):
        return
    if not os.path.exists(source):
        raise SourceError(f"source path {source!r} does not exist")
    if not os.path.isdir(source):
        raise SourceError(f"source {source!r} is a file; give a folder of images, a VOC root or 'fashion-mnist'")
    with os.scandir(source) as entries:
        if not any(not e.name.startswith(".") for e in entries):
            raise SourceError(f"source folder {source!r} is empty")


def ingest(source: str, out: str, *, shard_size: int = 1000, image_format: str = "keep",
           val_fraction: Optional[float] = None, test_fraction: Optional[float] = None, seed: int = 0,
           storage_options: Optional[dict] = None, overwrite: bool = False, progress: bool = True,
           data_root: Optional[str] = None, kind: str = "auto", repair: Optional[list[str]] = None,
           clip_frames: int = 16, clip_fps: float = 10.0, clip_size: Optional[int] = None,
           clip_codec: str = "png", audio_rate: int = 16000, audio_seconds: float = 1.0) -> IngestResult:
    """``gelato ingest``: ``source`` (a folder of images, videos or audio files, ``fashion-mnist``,
    ``moving-fashion-mnist``, ``spoken-digits``, a VOC root) into shards at ``out``; a video becomes
    one clip of ``clip_frames`` frames at ``clip_fps``; audio is resampled to ``audio_rate`` Hz and cut
    into ``audio_seconds`` segments."""
    from flows import prefect_server
    from workers.ingest.shards import IngestParams
    from workers.storage import RunLocation, check_writable

    source = os.path.expanduser(source)
    IngestParams(shard_size, image_format, val_fraction, seed, test_fraction, clip_frames, clip_fps, clip_size,
                 clip_codec, audio_rate, audio_seconds)  # fails here, before Prefect
    _check_source(source, kind)
    opts = _resolved(storage_options)
    check_writable(RunLocation(out, opts))

    prefect_server.wait_ready()
    from flows.ingest import ingest_flow

    m = ingest_flow(source, out, shard_size=shard_size, image_format=image_format, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed, overwrite=overwrite, data_root=data_root, kind=kind,
                    storage_options=opts, progress_bar=progress, repair=repair, clip_frames=clip_frames,
                    clip_fps=clip_fps, clip_size=clip_size, clip_codec=clip_codec, audio_rate=audio_rate,
                    audio_seconds=audio_seconds)
    return IngestResult(out, m["count"], {s: v["count"] for s, v in m["splits"].items()}, m["classes"],
                        m["rejected"], m)


def pretrain(run: str, config: ConfigLike = None, *, overrides: Sequence[str] = (), address: Optional[str] = None,
             overwrite: bool = False, progress: bool = True, ray_dashboard: bool = False) -> PretrainResult:
    """``gelato pretrain``: train a backbone on ``run``'s shards (Ray Train; a private local instance
    unless ``address`` or ``$RAY_ADDRESS``). Reruns resume or reuse the finished run."""
    from flows import prefect_server
    from workers.config import PretrainConfig
    from workers.model import BACKBONE_FILE, check_buildable
    from workers.pretrain.run_dir import prepare_run
    from workers.storage import RunLocation

    cfg = _config(PretrainConfig, config, overrides)   # validated before Prefect or Ray start
    check_buildable(cfg)                                 # parameter values: the objective is built once, here
    check_loggers(cfg.loggers)
    run = RunLocation.normalise(run)
    status = "start"
    loc = RunLocation(run, _resolved(cfg.storage_options))
    if not overwrite:  # a missing manifest or a conflicting earlier run fails here, in a second
        _check_s3(loc)
        _, status = prepare_run(loc, cfg)
    if cfg.init_from and status != "finished":  # the starting weights fit this backbone, or fail here
        from workers.data.manifest import read_manifest
        from workers.init_weights import check_init

        manifest = read_manifest(loc)
        if manifest is not None:
            _note(f"init_from: {check_init(cfg, manifest['channels'], loc.storage_options).describe()}")
    if status != "finished" and not (address or os.environ.get("RAY_ADDRESS")):
        # the private Ray instance comes up on a thread while Prefect starts its temporary server
        from workers.pretrain.launch import local_ray_cpus
        from workers.pretrain.ray_internals import ray_start

        ray_start.start_early(local_ray_cpus(cfg), dashboard=ray_dashboard)

    prefect_server.wait_ready()
    from flows.pretrain import pretrain_flow

    summary = pretrain_flow(run, cfg, address=address, overwrite=overwrite, progress_bar=progress,
                            ray_dashboard=ray_dashboard)
    return PretrainResult(run, int(summary["steps"]), RunLocation(run).join(BACKBONE_FILE), summary)


def _eval_config(config: ConfigLike, overrides: Sequence[str], options: Optional[dict]):
    """(EvalConfig, the YAML's storage_options): a YAML may be an evaluation config or a pipeline's."""
    from workers.config import load_model
    from workers.evaluate.config import EvalConfig, load_eval_config

    if config is None or isinstance(config, (str, os.PathLike)):
        return load_eval_config(os.fspath(config) if config is not None else None, list(overrides), options)
    if isinstance(config, EvalConfig):
        config = config.model_dump(exclude_unset=True)
    if isinstance(config, dict):
        return load_model(EvalConfig, None, list(overrides), base=config | (options or {})), {}
    raise TypeError(f"config: an EvalConfig, a dict of its fields or a YAML path, not {type(config).__name__}")


def evaluate(run: str, config: ConfigLike = None, *, overrides: Sequence[str] = (), options: Optional[dict] = None,
             storage_options: Optional[dict] = None, progress: bool = True, again: bool = False) -> EvalResult:
    """``gelato evaluate``: the protocols of ``config`` on ``run``'s test split.

    ``config`` is an ``EvalConfig``, a dict of its fields, a YAML of them, or a pipeline YAML (its
    ``evaluate:`` section: the demo's settings are ``configs/pipeline_demo.yaml``'s); ``options``
    (fields) go on top of it, ``overrides`` (``key=value``) on top of both. Where the run already
    holds this checkpoint's evaluation with these settings it is returned (``reused``) unless
    ``again``. Each evaluation is written to ``report-<settings hash>.json``; ``report.json`` keeps
    the first settings' (see ``workers/evaluate/report.py``)."""
    from flows import prefect_server
    from workers.evaluate.evaluation import check_run
    from workers.evaluate.report import results_table, reusable_report
    from workers.storage import RunLocation

    cfg, file_opts = _eval_config(config, overrides, options)
    check_loggers(cfg.loggers)
    run = RunLocation.normalise(run)
    opts = _resolved(dict(file_opts) | dict(storage_options or {}))
    loc = RunLocation(run, opts)
    _check_s3(loc)
    # The manifest, the checkpoint and its match with the run are checked here, before Prefect starts;
    # the Evaluation itself (models, feature sources, the time budget's plan) is built once, by the flow.
    refused, checkpoint_sha = check_run(run, cfg, opts)
    if not again:
        done = reusable_report(loc, cfg.config_hash(), checkpoint_sha)
        if done is not None:
            _note(f"{run} already holds this checkpoint's evaluation with these settings "
                  f"({done.get('report_file', 'report.json')}, {done.get('created')}); shown, not recomputed "
                  f"(--again / again=True evaluates again)")
            return EvalResult(run, results_table(done), done, reused=True)
    for p, why in refused.items():
        _note(f"not running {p}: {why}")

    prefect_server.wait_ready()
    from flows.evaluate import evaluate_flow

    report = evaluate_flow(run, cfg, storage_options=opts, progress_bar=progress)
    return EvalResult(run, results_table(report), report)


def run(config: ConfigLike, *, overrides: Sequence[str] = (), progress: bool = True) -> EvalResult:
    """``gelato run``: ingest, pretrain, evaluate and report, as one flow (a ``PipelineConfig``)."""
    from flows import prefect_server
    from flows.pipeline import PipelineConfig
    from workers.evaluate.report import results_table
    from workers.model import check_buildable

    cfg = _config(PipelineConfig, config, overrides)   # validated before Prefect, Ray or any stage starts
    check_buildable(cfg.pretrain)
    check_loggers(cfg.loggers + cfg.pretrain.loggers + cfg.evaluate.loggers)

    prefect_server.wait_ready()
    from flows.pipeline import pipeline_flow

    report = pipeline_flow(cfg, progress_bar=progress)
    return EvalResult(report.get("run", cfg.run), results_table(report), report)


def export(run: str, format: str, out: str, *, storage_options: Optional[dict] = None) -> ExportResult:
    """``gelato export``: the backbone for torchvision, timm, TorchScript or ONNX, checked by loading it back."""
    from workers.export.formats import export as export_backbone

    return ExportResult(out, export_backbone(run, format, out, _resolved(storage_options)))


def embed(run: str, data: str, out: str, *, checkpoint: Optional[str] = None, batch_size: int = 256,
          overwrite: bool = False, storage_options: Optional[dict] = None, progress: bool = True) -> EmbedResult:
    """``gelato embed``: vectors of a split of ``run`` or of a folder / S3 prefix of images, as Parquet."""
    from tqdm.auto import tqdm

    from workers.embed.embedding import embed as embed_images

    with tqdm(unit="img", desc="embed", disable=not progress) as bar:
        meta = embed_images(run, os.path.expanduser(data) if data.startswith("~") else data, out,
                            _resolved(storage_options), checkpoint=checkpoint, batch_size=batch_size,
                            overwrite=overwrite, progress=bar.update, total=lambda n: setattr(bar, "total", n))
    return EmbedResult(out, meta["count"], meta["feature_dim"], meta["parts"], meta["parts_written"])


def load_backbone(run_or_file: str, *, storage_options: Optional[dict] = None) -> Backbone:
    """A run's pretrained backbone (or a ``backbone.pt``) with its input preprocessing."""
    from workers.model import backbone_path, load_for_features

    module, preprocess, payload = load_for_features(backbone_path(run_or_file), _resolved(storage_options))
    return Backbone(module, preprocess, int(payload["feature_dim"]), int(payload["image_size"]),
                    int(payload["in_channels"]))
