"""The functions behind ``import gelato`` (see the package's docstring). Each runs the same Prefect
flow or worker function as the command line's stage and returns a small typed result."""
from __future__ import annotations

import os
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


def ingest(source: str, out: str, *, shard_size: int = 1000, image_format: str = "keep",
           val_fraction: Optional[float] = None, test_fraction: Optional[float] = None, seed: int = 0,
           storage_options: Optional[dict] = None, overwrite: bool = False, progress: bool = True) -> IngestResult:
    """``gelato ingest``: ``source`` (a folder, ``fashion-mnist``, a VOC root) into shards at ``out``."""
    from flows.ingest import ingest_flow
    from workers.credentials import StorageOptions

    m = ingest_flow(os.path.expanduser(source), out, shard_size=shard_size, image_format=image_format,
                    val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, overwrite=overwrite,
                    storage_options=StorageOptions(storage_options or {}), progress_bar=progress)
    return IngestResult(out, m["count"], {s: v["count"] for s, v in m["splits"].items()}, m["classes"],
                        m["rejected"], m)


def pretrain(run: str, config: ConfigLike = None, *, overrides: Sequence[str] = (), address: Optional[str] = None,
             overwrite: bool = False, progress: bool = True) -> PretrainResult:
    """``gelato pretrain``: train a backbone on ``run``'s shards (Ray Train; a private local instance
    unless ``address`` or ``$RAY_ADDRESS``). Reruns resume or reuse the finished run."""
    from flows.pretrain import pretrain_flow
    from workers.config import PretrainConfig
    from workers.model import BACKBONE_FILE, check_buildable
    from workers.storage import RunLocation

    cfg = _config(PretrainConfig, config, overrides)
    check_buildable(cfg)
    run = RunLocation.normalise(run)
    summary = pretrain_flow(run, cfg, address=address, overwrite=overwrite, progress_bar=progress)
    return PretrainResult(run, int(summary["steps"]), RunLocation(run).join(BACKBONE_FILE), summary)


def evaluate(run: str, config: ConfigLike = None, *, overrides: Sequence[str] = (),
             storage_options: Optional[dict] = None, progress: bool = True) -> EvalResult:
    """``gelato evaluate``: the protocols of ``config`` (an ``EvalConfig``) on ``run``'s test split."""
    from flows.evaluate import evaluate_flow
    from workers.credentials import StorageOptions
    from workers.evaluate.config import EvalConfig
    from workers.evaluate.report import results_table

    cfg = _config(EvalConfig, config, overrides)
    report = evaluate_flow(run, cfg, StorageOptions(storage_options or {}), progress_bar=progress)
    return EvalResult(run, results_table(report), report)


def run(config: ConfigLike, *, overrides: Sequence[str] = (), progress: bool = True) -> EvalResult:
    """``gelato run``: ingest, pretrain, evaluate and report, as one flow (a ``PipelineConfig``)."""
    from flows.pipeline import PipelineConfig, pipeline_flow
    from workers.evaluate.report import results_table

    cfg = _config(PipelineConfig, config, overrides)
    report = pipeline_flow(cfg, progress_bar=progress)
    return EvalResult(report.get("run", cfg.run), results_table(report), report)


def export(run: str, format: str, out: str, *, storage_options: Optional[dict] = None) -> ExportResult:
    """``gelato export``: the backbone for torchvision, timm, TorchScript or ONNX, checked by loading it back."""
    from workers.export.formats import export as export_backbone

    return ExportResult(out, export_backbone(run, format, out, storage_options))


def embed(run: str, data: str, out: str, *, checkpoint: Optional[str] = None, batch_size: int = 256,
          overwrite: bool = False, storage_options: Optional[dict] = None) -> EmbedResult:
    """``gelato embed``: vectors of a split of ``run`` or of a folder / S3 prefix of images, as Parquet."""
    from workers.embed.embedding import embed as embed_images

    meta = embed_images(run, os.path.expanduser(data) if data.startswith("~") else data, out, storage_options,
                        checkpoint=checkpoint, batch_size=batch_size, overwrite=overwrite)
    return EmbedResult(out, meta["count"], meta["feature_dim"], meta["parts"])


def load_backbone(run_or_file: str, *, storage_options: Optional[dict] = None) -> Backbone:
    """A run's pretrained backbone (or a ``backbone.pt``) with its input preprocessing."""
    from workers.model import backbone_path, load_for_features

    module, preprocess, payload = load_for_features(backbone_path(run_or_file), storage_options)
    return Backbone(module, preprocess, int(payload["feature_dim"]), int(payload["image_size"]),
                    int(payload["in_channels"]))
