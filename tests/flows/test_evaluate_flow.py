"""The evaluate flow under a real (ephemeral) Prefect server, and ``gelato evaluate``'s argument checks."""
from __future__ import annotations

import json
import os

import pytest
import torch

from evalrun import ingest_folder, pretrain_by_hand
from gelato.cli import main
from flows.evaluate import evaluate_flow
from imagegen import write_separable


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-flow")
    write_separable(root / "src", n_classes=3, per_class=12, size=8, splits=("train", "test"))
    run = str(root / "run")
    m = ingest_folder(str(root / "src"), run)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain_by_hand(run, m, steps=2)
        yield run
    finally:
        torch.set_num_threads(n)


def test_evaluate_flow_runs_every_protocol_as_tasks(tiny_run):
    from prefect.artifacts import Artifact

    config = {"baselines": ["raw_pixels", "random_init", "supervised"], "knn_k": 10, "finetune_epochs": 1,
              "fewshot_epochs": 1, "supervised_epochs": 1, "probe_max_iter": 30}
    report = evaluate_flow(tiny_run, config)
    with open(os.path.join(tiny_run, "report.json")) as f:
        assert json.load(f)["results"] == report["results"]
    cells = {(r["protocol"], r["features"], r.get("via")) for r in report["results"]}
    for features in ("pretrained", "random_init", "raw_pixels", "supervised"):
        assert ("probe", features, None) in cells and ("knn", features, None) in cells
    assert {("finetune", "pretrained", None), ("finetune", "supervised", None),
            ("fewshot_1pct", "pretrained", "finetune"), ("fewshot_10pct", "raw_pixels", "probe")} <= cells
    assert next(r for r in report["results"] if r["protocol"] == "probe" and r["features"] == "raw_pixels")[
        "value"] >= 0.9
    assert os.path.exists(os.path.join(tiny_run, "report.md")) and set(report["plots"]) >= {"embedding", "confusion"}
    # each protocol ran as its own task, after the features it reads
    assert "probe/pretrained" in report["durations_s"] and "features/pretrained/train" in report["durations_s"]
    art = Artifact.get("gelato-evaluation")
    assert art is not None and "| protocol (test, %) |" in art.data


def test_cli_validates_arguments_before_starting_anything(tiny_run, tmp_path, capsys):
    assert main(["evaluate", "--run", tiny_run, "--protocols", "probe,linear"]) == 2
    assert "--protocols: unknown linear" in capsys.readouterr().err
    assert main(["evaluate", "--run", tiny_run, "--baselines", "imagenet"]) == 2
    assert "--baselines: unknown imagenet" in capsys.readouterr().err
    assert main(["evaluate", "--run", tiny_run, "--finetune-epochs", "0"]) == 2
    assert "finetune_epochs" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["evaluate", "--run", tiny_run, "--checkpoint", "missing.pt"]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_cli_prints_the_results_table(tiny_run, capsys):
    assert main(["evaluate", "--run", tiny_run, "--protocols", "knn", "--baselines", "raw_pixels",
                 "--knn-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "| protocol (test, %) | pretrained | random init | raw pixels | supervised |" in out
    assert "| kNN (k=5, T=0.1), top-1 |" in out and "not run" in out
