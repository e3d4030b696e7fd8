"""Experiment tracking: ``loggers: [tensorboard, mlflow]`` in a pretraining, evaluation or pipeline config.

The driver logs, never the workers: pretraining's rows are those of ``RUN/metrics.jsonl`` as the
progress bar reads them (``workers.pretrain.run_log.watch_progress``: loss, lr, images/s, online
kNN, at their step), so logging works the same for local runs, S3 runs and Ray clusters, and costs
the training loop nothing. Evaluation logs its results table (one scalar per cell,
``eval/<protocol>/<features>``, at the checkpoint's step), report.md as text, and the plots.

* **TensorBoard** (``torch.utils.tensorboard``): event files in ``RUN/tensorboard/`` for a local
  run, ``./tensorboard/<run name>/`` for an S3 run; ``$GELATO_TENSORBOARD_DIR`` overrides.
  ``tensorboard --logdir RUN/tensorboard``.
* **MLflow** (``MlflowClient``): ``$MLFLOW_TRACKING_URI`` (a server, ``databricks``, a file store...)
  or else MLflow's own default, a SQLite store ``./mlflow.db`` with artifacts in ``./mlruns``
  (``mlflow ui --backend-store-uri sqlite:///mlflow.db``; MLflow 3 refuses new file stores
  unless ``MLFLOW_ALLOW_FILE_STORE=true``); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``gelato``. One MLflow run
  per gelato run: its id is kept in ``RUN/tracking.json``, so a resumed pretraining and every
  evaluation of the run log into the same MLflow run. The pretraining config goes in as params
  (credentials never: ``storage_options`` is left out), plots and reports as artifacts.

Both come with ``pip install 'gelato[tracking]'``; a config naming a logger that is not installed
fails before any work, saying so.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from typing import Optional

from workers.config import ConfigError
from workers.storage import RunLocation

LOGGERS = ("tensorboard", "mlflow")
STATE = "tracking.json"
EXTRA = "pip install 'gelato[tracking]'"
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# metrics.jsonl fields that are not metrics
NOT_METRICS = {"step", "epoch", "time", "event"}


def check_loggers(loggers) -> None:
    """Each logger named is installed, else a ConfigError naming the extra that brings it."""
    import importlib.util

    for name in loggers or ():
        if name not in LOGGERS:
            raise ConfigError(f"loggers: unknown {name!r}; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"loggers: {name} is not installed; {EXTRA}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def run_name(loc: RunLocation) -> str:
    return loc.uri.rstrip("/").rsplit("/", 1)[-1]


class TensorBoard:
    def __init__(self, loc: RunLocation, name: str, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = (os.environ.get("GELATO_TENSORBOARD_DIR")
                       or (os.path.abspath(os.path.join("tensorboard", _slug(name))) if loc.is_s3
                           else loc.join("tensorboard")))
        self.writer = SummaryWriter(self.logdir)
        state["logdir"] = self.logdir

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def params(self, params: dict) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())), 0)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), step, dataformats="HWC")

    def artifact(self, name: str, data: bytes) -> None:
        pass  # TensorBoard keeps no files; the reports stay in the run

    def close(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, loc: RunLocation, name: str, state: dict):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath("mlflow.db")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        if state.get("tracking_uri") == uri and state.get("run_id"):
            try:
                if self.client.get_run(state["run_id"]).info.lifecycle_stage == "active":
                    self.run_id = state["run_id"]
                    self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - a run deleted or a store emptied: start a new one
                self.run_id = None
        if self.run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gelato")
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name, tags={"gelato.run": loc.uri}).info.run_id
        state.update(tracking_uri=uri, run_id=self.run_id)

    def scalars(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def params(self, params: dict) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.client.log_text(self.run_id, markdown, f"{tag}.md")

    def image(self, tag: str, png: bytes, step: int) -> None:
        self.artifact(f"plots/{tag.rsplit('/', 1)[-1]}.png", png)  # as in the run: plots/<name>.png

    def artifact(self, name: str, data: bytes) -> None:
        folder, base = os.path.split(name)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, base)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path, artifact_path=folder or None)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow}


class Tracker:
    """The configured loggers of one gelato run, fed by the driver (see the module)."""

    def __init__(self, loc: RunLocation, loggers, name: Optional[str] = None):
        check_loggers(loggers)
        self.loc = loc
        try:
            with loc.fs().open(loc.join(STATE), "r") as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {}
        name = name or run_name(loc)
        self.backends = {}
        for n in loggers:
            mine = state.setdefault(n, {})
            self.backends[n] = BACKENDS[n](loc, name, mine)
        loc.write_atomic(STATE, json.dumps(state, indent=1).encode())

    def where(self) -> dict:
        """{logger: where to look} for the messages the commands print."""
        out = {}
        for n, b in self.backends.items():
            out[n] = b.logdir if n == "tensorboard" else f"{b.client.tracking_uri} run {b.run_id}"
        return out

    def row(self, row: dict) -> None:
        """One metrics.jsonl row: its numbers at its step, as ``pretrain/<field>``."""
        if row.get("event") or "step" not in row:
            return
        values = {f"pretrain/{k}": v for k, v in row.items()
                  if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            for b in self.backends.values():
                b.scalars(values, int(row["step"]))

    def params(self, params: dict) -> None:
        flat = _flatten(params)
        for b in self.backends.values():
            b.params(flat)

    def image(self, tag: str, png: bytes, step: int) -> None:
        for b in self.backends.values():
            b.image(tag, png, step)

    def report(self, report: dict, markdown: str, plots: dict[str, bytes]) -> None:
        """An evaluation: every computed cell as ``eval/<protocol>[_via]/<features>`` (%), at the
        checkpoint's step; report.md as text; the plots as images; report.json as an artifact."""
        step = int(report.get("steps") or 0)
        values = {}
        for r in report["results"]:
            proto = r["protocol"] + (f"_via_{r['via']}" if r.get("via") else "")
            values[f"eval/{proto}_{r['metric']}/{r['features']}"] = 100 * float(r["value"])
        for b in self.backends.values():
            if values:
                b.scalars(values, step)
            b.text("report", markdown, step)
            b.artifact(report.get("report_file", "report.json"), json.dumps(report, indent=1).encode())
        for name, png in plots.items():
            self.image(f"eval/{name}" if name != "pretrain" else "pretrain", png, step)

    def close(self, ok: bool = True) -> None:
        for b in self.backends.values():
            b.close(ok)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flatten(v, key + ".")
        else:
            out[key] = v
    return out
