"""The whole pipeline as one Prefect flow on a tiny labelled folder: stages, caching, artifacts."""
from __future__ import annotations

import asyncio
import os

import pytest

from flows.pipeline import PipelineConfig, load_pipeline_config, pipeline_flow
from workers.evaluate.report import results_table, table_text
from imagegen import write_images
from workers.config import ConfigError

TINY_PRETRAIN = ["pretrain.backbone=small_cnn", "pretrain.backbone_params={width: 8}", "pretrain.image_size=16",
                 "pretrain.view.size=16", "pretrain.batch_size=32", "pretrain.workers=2", "pretrain.loader_workers=0",
                 "pretrain.steps=6", "pretrain.checkpoint_every=3", "pretrain.knn_bank=60", "pretrain.knn_queries=30",
                 "pretrain.optimizer=sgd", "pretrain.lr=0.05"]


def _artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return asyncio.run(read())


def test_bad_value_fails_at_submission_naming_the_field():
    with pytest.raises(ConfigError, match="pretrain.batch_size"):
        load_pipeline_config(None, ["pretrain.batch_size=many"])
    with pytest.raises(ConfigError, match="evaluate.knn_k"):
        load_pipeline_config(None, ["evaluate.knn_k=0"])
    with pytest.raises(Exception, match="epochs"):  # Prefect validates the parameter before the flow body runs
        pipeline_flow({"pretrain": {"epochs": "lots"}})


def test_pipeline_runs_caches_and_publishes(tmp_path):
    write_images(tmp_path / "src" / "train", n_classes=3, per_class=40, size=16)  # ImageFolder with
    write_images(tmp_path / "src" / "test", n_classes=3, per_class=10, size=16, seed=1)  # train/ and test/
    run = str(tmp_path / "run")
    cfg = load_pipeline_config(None, [f"run={run}", "name=Tiny Test", f"ingest.source={tmp_path / 'src'}",
                                      "ingest.shard_size=10", "ingest.val_fraction=0.2",
                                      "evaluate.protocols=[probe,knn]", "evaluate.knn_k=10",
                                      "evaluate.budget_minutes=5"] + TINY_PRETRAIN)
    assert isinstance(cfg, PipelineConfig)
    report = pipeline_flow(cfg, progress_bar=False)
    rows = results_table(report)
    cells = {(r["protocol"].split(" ")[0], f): r[f] for r in rows for f in ("pretrained", "random_init", "raw_pixels")}
    assert all(cells[p, f] is not None for p in ("linear", "kNN") for f in ("pretrained", "random_init", "raw_pixels"))
    assert "not run" in table_text(rows)  # the supervised column was not asked for, and says so
    assert report["eval_budget"]["budget_minutes"] == 5 and report["execution"]["requested"] == "auto"
    assert os.path.exists(os.path.join(run, "checkpoints/final/backbone.pt"))
    table = _artifacts("gelato-results-tiny-test")
    assert table and table[0].type == "table"
    assert _artifacts("gelato-report-tiny-test")

    # Rerunning the finished pipeline does no work: same report, checkpoints untouched.
    ckpt = os.path.join(run, "checkpoints/final/backbone.pt")
    mtime = os.stat(ckpt).st_mtime_ns
    report_mtime = os.stat(os.path.join(run, "report.json")).st_mtime_ns
    again = pipeline_flow(cfg, progress_bar=False)
    assert again == report and os.stat(os.path.join(run, "report.json")).st_mtime_ns == report_mtime
    # Changing only evaluation settings reruns only the evaluation.
    cfg2 = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"knn_k": 5})})
    third = pipeline_flow(cfg2, progress_bar=False)
    assert os.stat(ckpt).st_mtime_ns == mtime and third["eval_config"]["knn_k"] == 5
