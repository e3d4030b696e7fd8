"""The whole pipeline as one Prefect flow on a tiny labelled folder: stages, caching, artifacts."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from flows.pipeline import PipelineConfig, load_pipeline_config, pipeline_flow
from workers.evaluate.report import results_table, table_markdown, table_text
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
    # ... beside the first: report.json keeps the first settings' evaluation, report.md shows the latest
    with open(os.path.join(run, "report.json")) as f:
        assert json.load(f)["eval_config_hash"] == report["eval_config_hash"] != third["eval_config_hash"]
    assert os.path.exists(os.path.join(run, f"report-{third['eval_config_hash']}.json"))
    with open(os.path.join(run, "report.md")) as f:
        assert f"[report-{third['eval_config_hash']}.json]" in f.read()


def test_gelato_evaluate_with_the_pipelines_config_reproduces_its_table(tmp_path, capsys):
    """`gelato evaluate --config PIPELINE.yaml` takes the pipeline's evaluate: section: the same settings
    hash, the finished evaluation shown rather than recomputed, and with --again the same table."""
    import yaml

    from gelato.cli import main

    write_images(tmp_path / "src" / "train", n_classes=3, per_class=30, size=16)
    write_images(tmp_path / "src" / "test", n_classes=3, per_class=10, size=16, seed=1)
    run = str(tmp_path / "run")
    cfg = load_pipeline_config(None, [f"run={run}", f"ingest.source={tmp_path / 'src'}", "ingest.shard_size=30",
                                      "evaluate.protocols=[probe,knn]", "evaluate.knn_k=10", "evaluate.knn_t=0.2",
                                      "evaluate.probe_max_iter=20", "evaluate.baselines=[raw_pixels]"] + TINY_PRETRAIN)
    report = pipeline_flow(cfg, progress_bar=False)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    mtime = os.stat(os.path.join(run, "report.json")).st_mtime_ns
    assert main(["evaluate", "--run", run, "--config", str(path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "already holds this checkpoint's evaluation with these settings" in err
    assert os.stat(os.path.join(run, "report.json")).st_mtime_ns == mtime
    assert table_markdown(results_table(report)) in out  # the pipeline's own table
    assert main(["evaluate", "--run", run, "--config", str(path), "--again", "--no-progress"]) == 0
    again = json.load(open(os.path.join(run, f"report-{report['eval_config_hash']}.json")))
    assert again["created"] >= report["created"] and again["eval_config_hash"] == report["eval_config_hash"]
    assert results_table(again) == results_table(report)
    # flags and key=value overrides go on top of the file: other settings, written beside
    capsys.readouterr()
    assert main(["evaluate", "--run", run, "--config", str(path), "--knn-k", "5", "knn_t=0.5", "--no-progress"]) == 0
    with open(os.path.join(run, "report.md")) as f:
        md = f.read()
    other = next(n for n in os.listdir(run) if n.startswith("report-") and report["eval_config_hash"] not in n)
    cfg_other = json.load(open(os.path.join(run, other)))["eval_config"]
    assert (cfg_other["knn_k"], cfg_other["knn_t"], cfg_other["probe_max_iter"]) == (5, 0.5, 20)
    assert f"[{other}]" in md and "kNN (k=5, T=0.5)" in md
    with open(os.path.join(run, "report.json")) as f:
        assert json.load(f)["eval_config_hash"] == report["eval_config_hash"]
