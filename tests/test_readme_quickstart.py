"""The README's "Your own images" commands, run as written on a small folder of class sub-folders:
the pretraining line is validated as written and then run shortened (a 30-minute budget and 64 px
images are no test), the evaluation line gets quick settings as KEY=VALUE overrides."""
from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from imagegen import write_separable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["image_size=8", "view.size=8", "backbone=small_cnn", "backbone_params={width: 8}", "batch_size=16",
         "workers=1", "loader_workers=0", "steps=2", "knn_monitor=false"]
QUICK_EVAL = ["finetune_epochs=0.5", "fewshot_epochs=1", "probe_max_iter=20", "knn_k=5", "--no-progress"]


def _commands() -> list[list[str]]:
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("## Your own images")
    section = readme[start:readme.index("\n## ", start)]  # up to the next section
    return [shlex.split(line.split("#", 1)[0]) for line in re.findall(r"^gelato .*$", section, re.M)]


def test_the_quick_start_is_ingest_pretrain_evaluate_and_its_pretraining_line_is_valid():
    from workers.config import load_config

    cmds = _commands()
    assert [c[1] for c in cmds] == ["ingest", "pretrain", "evaluate"]
    pre = cmds[1]
    config = load_config(os.path.join(ROOT, pre[pre.index("--config") + 1]), [a for a in pre if "=" in a])
    assert config.budget_minutes == 30 and config.image_size == 64


@pytest.fixture()
def prefect_harness():
    """One ephemeral Prefect server for the three commands (each would otherwise start and stop its own,
    which one process cannot do three times over)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow  # Prefect's server, a private Ray instance
def test_the_quick_start_runs_on_a_folder_of_class_sub_folders(tmp_path, monkeypatch, capsys, prefect_harness):
    from gelato.cli import main

    monkeypatch.chdir(ROOT)  # configs/... as written
    write_separable(tmp_path / "photos", n_classes=3, per_class=30, size=8)
    run = str(tmp_path / "mine")
    ingest, pretrain, evaluate = [[a.replace("~/my_photos", str(tmp_path / "photos")).replace("runs/mine", run)
                                   for a in c[1:]] for c in _commands()]
    assert main(ingest + ["--no-progress"]) == 0
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    assert set(manifest["splits"]) == {"train", "val", "test"}  # a test split held out of a plain folder
    written = [a for a in pretrain if "=" not in a]
    assert main(written + SHORT + ["--no-progress"]) == 0
    assert main(evaluate + QUICK_EVAL) == 0
    out = capsys.readouterr().out
    assert "| linear probe, top-1 |" in out and "report.md" in out
    report = json.load(open(os.path.join(run, "report.json")))
    assert {r["protocol"] for r in report["results"]} >= {"probe", "knn", "finetune"}
