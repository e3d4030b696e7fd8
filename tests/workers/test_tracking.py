"""``loggers: [tensorboard, mlflow]``: a real pretraining (Ray) and evaluation (Prefect) logged, then
read back with TensorBoard's event reader and MLflow's client (a local SQLite store)."""
from __future__ import annotations

import json
import os

import pytest

from workers.config import ConfigError
from workers.tracking import check_loggers


def test_a_logger_not_installed_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    # mlflow is installed here: its absence is simulated (the only thing this test fakes)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"loggers: mlflow is not installed; pip install 'gelato\[tracking\]'"):
        check_loggers(("tensorboard", "mlflow"))
    with pytest.raises(ConfigError, match="unknown 'wandb'"):
        check_loggers(("wandb",))


def test_an_mlflow_file_store_named_by_its_uri_is_read_back(tmp_path, monkeypatch):
    """MLflow 3 refuses new file stores unless MLFLOW_ALLOW_FILE_STORE=true; with it, the same tracker."""
    from mlflow import MlflowClient

    from workers.storage import RunLocation
    from workers.tracking import Tracker

    uri = f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loc = RunLocation(str(tmp_path / "run"))
    tracker = Tracker(loc, ["mlflow"])
    tracker.params({"objective": "simclr", "view": {"size": 16}})
    for step in (1, 2):
        tracker.row({"step": step, "loss": 1.0 / step, "epoch": 0.1 * step, "time": 0.0})
    tracker.row({"event": "execution", "step": 0, "execution": {}})  # events are not metrics
    tracker.close()
    run_id = json.load(open(tmp_path / "run" / "tracking.json"))["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run_id)
    assert got.data.params == {"objective": "simclr", "view.size": "16"} and got.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "pretrain/loss")] == [(1, 1.0), (2, 0.5)]
    assert set(got.data.metrics) == {"pretrain/loss"}


def _scalars(logdir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.mark.slow  # a private Ray instance and Prefect's server
def test_pretraining_and_evaluation_are_read_back_from_tensorboard_and_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    import gelato
    from evalrun import TINY, ingest_folder
    from imagegen import write_separable

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_separable(tmp_path / "src", n_classes=3, per_class=16, size=8, splits=("train", "test"))
    run = str(tmp_path / "run")
    ingest_folder(str(tmp_path / "src"), run)
    over = TINY + ["steps=6", "log_every=1", "knn_monitor=false", "loader_workers=0", "loggers=[tensorboard,mlflow]"]
    with prefect_test_harness(server_startup_timeout=90):
        gelato.pretrain(run, None, overrides=over, progress=False)
        result = gelato.evaluate(run, {"protocols": ["probe", "knn"], "baselines": ["raw_pixels"], "knn_k": 5,
                                       "probe_max_iter": 20, "loggers": ["tensorboard", "mlflow"]}, progress=False)
        state = json.load(open(os.path.join(run, "tracking.json")))
        # a tracker that fails (here: an MLflow server that is down) is said, and the evaluation stands
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        unlogged = gelato.evaluate(run, {"protocols": ["knn"], "baselines": [], "knn_k": 3, "loggers": ["mlflow"]},
                                   progress=False)
    assert os.path.exists(os.path.join(run, unlogged.report["report_file"])) and unlogged.table[0]["pretrained"] > 0

    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}
    assert len(losses) >= 3
    # TensorBoard: every logged row's loss at its step, the eval cells, report.md and the plots
    ea = _scalars(os.path.join(run, "tensorboard"))
    tb = {e.step: e.value for e in ea.Scalars("pretrain/loss")}
    assert tb.keys() == losses.keys() and all(abs(tb[s] - losses[s]) < 1e-5 for s in losses)
    probe = next(r for r in result.report["results"] if r["protocol"] == "probe" and r["features"] == "pretrained")
    (cell,) = ea.Scalars("eval/probe_top1/pretrained")
    assert abs(cell.value - 100 * probe["value"]) < 1e-3 and cell.step == result.report["steps"] == 6
    assert "eval/embedding" in ea.Tags()["images"] and "pretrain" in ea.Tags()["images"]
    assert any(t.startswith("report") for t in ea.Tags()["tensors"])  # add_text is stored as a tensor
    # MLflow: one run for both stages, the config as params, the same numbers, the files as artifacts
    client = MlflowClient(tracking_uri=uri)
    mrun = client.get_run(state["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.data.params["objective"] == "simclr"
    assert "storage_options" not in " ".join(mrun.data.params)
    hist = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "pretrain/loss")}
    assert hist.keys() == losses.keys()
    assert abs(mrun.data.metrics["eval/probe_top1/pretrained"] - 100 * probe["value"]) < 1e-6
    files = {a.path for a in client.list_artifacts(mrun.info.run_id)} | \
        {a.path for a in client.list_artifacts(mrun.info.run_id, "plots")}
    assert {result.report["report_file"], "report.md", "plots/pretrain.png", "plots/embedding.png"} <= files
