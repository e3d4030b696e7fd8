"""Pretraining from clips through the real stages: generated videos ingested, the arrow of time trained
on Ray Train workers, the backbone scored by the image protocols on the clips' middle frames."""
from __future__ import annotations

import json
import os

import pytest

from workers.config import ConfigError, load_config
from workers.pretrain.run_dir import prepare_run
from workers.storage import RunLocation

# a time budget and the online kNN monitor: both measure and embed what a clip batch holds
TINY = ["backbone=small_cnn", "backbone_params={width: 8}", "image_size=16", "batch_size=8", "workers=1",
        "loader_workers=0", "budget_minutes=0.1", "knn_bank=10", "knn_queries=10", "knn_k=3",
        "objective_params.frames=4", "objective_params.head_hidden_dim=16"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    from evalrun import ingest_moving_clips

    return ingest_moving_clips(tmp_path_factory.mktemp("clips"), train=12, test=6, frames=8, shard_size=6)[0]


def test_an_image_objective_on_clips_and_a_clip_objective_on_images_are_refused(clip_run, tmp_path):
    with pytest.raises(ConfigError, match="holds clips and objective 'simclr' learns from images; clip objectives: "
                                          "arrow_of_time"):
        prepare_run(RunLocation(clip_run), load_config(None, ["objective=simclr"]))
    from evalrun import ingest_folder
    from imagegen import write_separable

    write_separable(tmp_path / "src", n_classes=2, per_class=6, size=8)
    images = str(tmp_path / "images")
    ingest_folder(str(tmp_path / "src"), images)
    with pytest.raises(ConfigError, match="holds images and objective 'arrow_of_time' learns from clips"):
        prepare_run(RunLocation(images), load_config("configs/moving_fmnist_arrow_of_time.yaml"))


@pytest.mark.slow  # a private Ray instance and Prefect's server
def test_the_arrow_of_time_trains_on_ray_workers_and_is_scored_on_frames(clip_run):
    from prefect.testing.utilities import prefect_test_harness

    import gelato

    with prefect_test_harness(server_startup_timeout=90):
        result = gelato.pretrain(clip_run, "configs/moving_fmnist_arrow_of_time.yaml", overrides=TINY, progress=False)
        report = gelato.evaluate(clip_run, {"protocols": ["probe", "knn"], "baselines": ["random_init", "supervised"],
                                            "knn_k": 3, "probe_max_iter": 20, "supervised_epochs": 1}, progress=False)
    rows = [json.loads(x) for x in open(os.path.join(clip_run, "metrics.jsonl"))]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    assert result.steps >= 10 and steps and all(0 <= r["accuracy"] <= 1 for r in steps if "accuracy" in r)
    assert any(r.get("event") == "schedule" for r in rows) and any("knn_top1" in r for r in rows)
    assert os.path.exists(result.backbone)
    # the backbone is an image backbone: probe and kNN ran on the clips' middle frames (labels: the item
    # shown), the clip protocols beside them, each a task of the evaluation flow
    cells = {(r["protocol"], r["features"]) for r in report.report["results"]}
    assert {("probe", "pretrained"), ("knn", "pretrained"), ("probe", "random_init"), ("clip_probe", "pretrained"),
            ("label_propagation", "random_init"), ("alignment", "pretrained"),
            ("label_propagation", "supervised"), ("clip_probe", "supervised")} <= cells  # once trained
    assert report.report["modality"] == "clip" and report.report["frame_target"] == "item"
    assert "the item it shows most" in open(os.path.join(clip_run, "report.md")).read()


@pytest.mark.slow  # a private Ray instance and Prefect's server
def test_tcn_trains_on_the_two_cameras_the_loader_stacks(clip_run, tmp_path):
    import shutil

    from prefect.testing.utilities import prefect_test_harness

    import gelato

    run = str(tmp_path / "run")
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "config.yaml",
                                                                 "eval", "report*", "plots"))
    over = ["backbone=small_cnn", "backbone_params={width: 8}", "image_size=16", "batch_size=8", "workers=1",
            "loader_workers=0", "steps=3", "knn_monitor=false", "objective_params.embed_dim=8"]
    with prefect_test_harness(server_startup_timeout=90):
        gelato.pretrain(run, "configs/moving_fmnist_tcn.yaml", overrides=over, progress=False)
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert any("triplet_accuracy" in r for r in rows)
