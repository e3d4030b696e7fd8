"""The loop without Ray: ``torchrun`` with 2 CPU ranks (gloo DDP), checkpoints, rerun, resume.

Every process runs with ``ray`` and ``prefect`` made unimportable (a ``sitecustomize`` on
PYTHONPATH), as on a machine that has PyTorch only: the path must not touch either.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from imagegen import write_images
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.storage import RunLocation

pytestmark = pytest.mark.slow  # torchrun with 2 processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--no-progress", "backbone=small_cnn", "backbone_params={width: 8}", "image_size=16", "view.size=16",
        "batch_size=32", "loader_workers=0", "log_every=2", "knn_bank=100", "knn_queries=40", "optimizer=sgd",
        "lr=0.05", "warmup_epochs=0", "steps=8", "checkpoint_every=3"]
BLOCK = '''import importlib.abc, sys
class _NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "prefect"):
            raise ModuleNotFoundError(f"blocked by the test: {name}")
sys.meta_path.insert(0, _NoRay())
'''


def _env(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK)
    # PYTHONFAULTHANDLER: a rank that dies of a signal (seen once in CI: SIGABRT on rank 1 mid-run)
    # prints its Python stack, which the assertion messages below keep
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]), OMP_NUM_THREADS="1",
                PYTHONFAULTHANDLER="1")


def _torchrun(tmp_path, run, *args, nproc=2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "workers.torchrun", run, *TINY, f"workers={nproc}", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
    if done.returncode != 0:  # the first failing rank's lines come before torchrun's summary: keep them
        lines = done.stderr.splitlines()
        first = next((i for i, ln in enumerate(lines) if "Fatal Python error" in ln or "Traceback" in ln), 0)
        done.stderr = "\n".join(lines[first:first + 60]) + "\n...\n" + "\n".join(lines[-25:])
    return done


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_torchrun_trains_reruns_as_a_no_op_and_resumes_from_its_checkpoint(tmp_path):
    write_images(tmp_path / "src", n_classes=3, per_class=60, size=16)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=20, val_fraction=0.2),
           progress_bar=False)

    done = _torchrun(tmp_path, run)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "done: 8 steps" in done.stdout
    ckpts = os.path.join(run, "checkpoints", "torchrun")
    assert sorted(os.listdir(ckpts)) == ["step_000000006", "step_000000008"]  # keep_checkpoints=2 pruned step 3
    assert all(os.path.exists(os.path.join(ckpts, d, "COMPLETE")) for d in os.listdir(ckpts))
    m = _metrics(run)
    first = next(r for r in m if r.get("event") == "first_step")
    assert first["wrapped_as"] == "DistributedDataParallel"  # 2 ranks: DDP over gloo
    assert [r["step"] for r in m if "loss" in r] == [2, 3, 4, 6, 8] and "knn_top1" in m[-1]
    with open(os.path.join(run, "checkpoints", "final", "summary.json")) as f:
        assert json.load(f)["steps"] == 8

    again = _torchrun(tmp_path, run)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr[-2000:]

    # lose the end of the run: the export and the last checkpoint; a half-written checkpoint
    # (no COMPLETE marker) beside them must be ignored
    shutil.rmtree(os.path.join(run, "checkpoints", "final"))
    shutil.rmtree(os.path.join(ckpts, "step_000000008"))
    os.makedirs(os.path.join(ckpts, "step_000000007"))
    with open(os.path.join(ckpts, "step_000000007", "state.pt"), "wb") as f:
        f.write(b"torn")
    resumed = _torchrun(tmp_path, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    m = _metrics(run)
    event = next(r for r in m if r.get("event") == "resumed")
    assert event["step"] == 6 and event["from"].endswith("step_000000006")
    assert [r["step"] for r in m if "loss" in r] == [2, 3, 4, 6, 8]  # one history, no lines past step 6 kept twice
    assert os.path.exists(os.path.join(run, "checkpoints", "final", "backbone.pt"))
    assert sorted(os.listdir(ckpts)) == ["step_000000006", "step_000000008"]  # the torn step 7 is gone


def test_torchrun_refuses_a_worker_count_other_than_its_world_size(tmp_path):
    cmd = [sys.executable, "-m", "workers.torchrun", str(tmp_path / "run"), "workers=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "workers: the config asks for 2 but torchrun started 1 process(es); pass workers=1" in done.stderr


def test_torchrun_on_an_s3_run_resumes_from_its_marked_checkpoint(tmp_path, s3_bucket):
    """One process, no torchrun wrapper: shards, checkpoints and the export on S3 (moto_server)."""
    write_images(tmp_path / "src", n_classes=3, per_class=40, size=16)
    run = f"s3://{s3_bucket}/runs/tr"
    loc = RunLocation(run)
    ingest(loc, open_source(str(tmp_path / "src")), IngestParams(shard_size=20, val_fraction=0.2, test_fraction=0),
           progress_bar=False)
    cmd = [sys.executable, "-m", "workers.torchrun", run, *TINY, "workers=1", "steps=4", "checkpoint_every=2",
           "knn_monitor=false"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    fs, base = loc.fs(), f"{s3_bucket}/runs/tr/checkpoints"
    assert sorted(os.path.basename(p) for p in fs.ls(f"{base}/torchrun")) == ["step_000000002", "step_000000004"]
    fs.rm(f"{base}/final", recursive=True)
    fs.rm(f"{base}/torchrun/step_000000004/COMPLETE")  # an unmarked checkpoint is never read
    fs.pipe(f"{base}/torchrun/step_000000003/state.pt", b"torn")  # nor a torn one, which the rerun deletes
    again = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-3000:]
    with fs.open(f"{s3_bucket}/runs/tr/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f.read().decode().splitlines()]
    assert next(r for r in rows if r.get("event") == "resumed")["step"] == 2
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4]  # 3: the end of an epoch (96 train samples)
    assert fs.exists(f"{base}/final/backbone.pt")
    fs.invalidate_cache(f"{base}/torchrun")
    assert sorted(os.path.basename(p) for p in fs.ls(f"{base}/torchrun")) == ["step_000000002", "step_000000004"]
    assert fs.exists(f"{base}/torchrun/step_000000004/COMPLETE")


def test_each_launcher_refuses_to_silently_restart_the_others_checkpoints(tmp_path):
    import pytest

    from workers.config import ConfigError
    from workers.pretrain.sessions import check_resumable_by

    loc = RunLocation(str(tmp_path))
    check_resumable_by(loc, "ray")  # no checkpoints at all: a fresh start is right for both
    check_resumable_by(loc, "torchrun")
    os.makedirs(tmp_path / "checkpoints" / "checkpoint_2026-11-29_01-00-00.000000")
    with pytest.raises(ConfigError, match="written by Ray Train .* --overwrite to start afresh under torchrun"):
        check_resumable_by(loc, "torchrun")
    check_resumable_by(loc, "ray")
    shutil.rmtree(tmp_path / "checkpoints")
    os.makedirs(tmp_path / "checkpoints" / "torchrun" / "step_000000004")
    check_resumable_by(loc, "ray")  # not marked COMPLETE: not a checkpoint
    (tmp_path / "checkpoints" / "torchrun" / "step_000000004" / "COMPLETE").write_bytes(b"")
    with pytest.raises(ConfigError, match="written under torchrun .* --overwrite to start afresh on Ray"):
        check_resumable_by(loc, "ray")


def test_torchrun_with_a_time_budget_fits_its_steps_records_them_and_keeps_them_on_resume(tmp_path):
    """budget_minutes instead of steps: both ranks take the steps fitted from rank 0's measured ones; the
    plan, the resolved precision and the loop time are recorded; a resumed run keeps the planned steps."""
    from workers.hardware import resolve_here

    write_images(tmp_path / "src", n_classes=3, per_class=60, size=16)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=20, val_fraction=0.2),
           progress_bar=False)
    budget = ["steps=null", "budget_minutes=0.25", "checkpoint_every=15", "keep_checkpoints=5"]
    done = _torchrun(tmp_path, run, *budget)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    m = _metrics(run)
    schedule = next(r for r in m if r.get("event") == "schedule")
    assert schedule["calibrated_at_step"] == 10 and schedule["budget_minutes"] == 0.25
    assert schedule["step_seconds"] > 0 and schedule["steps"] > 10  # a tiny model takes more steps than it measured
    assert schedule["planned_seconds"] <= 0.25 * 60
    assert "budget 0.25 min:" in done.stdout and f"{schedule['steps']} steps" in done.stdout
    first = next(r for r in m if r.get("event") == "first_step")
    assert first["execution"] == resolve_here("auto", "cpu").as_dict()  # what auto resolves to on this CPU
    with open(os.path.join(run, "checkpoints", "final", "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == summary["total_steps"] == schedule["steps"]
    assert summary["budget"] == {k: v for k, v in schedule.items() if k not in ("event", "step", "time")}
    assert summary["execution"]["precision"] == first["execution"]["precision"] and summary["loop_seconds"] > 0
    # resume after losing the end: the steps chosen before stand (no new measurement, no new schedule)
    ckpts = os.path.join(run, "checkpoints", "torchrun")
    marked = sorted(os.listdir(ckpts))
    assert len(marked) >= 2
    shutil.rmtree(os.path.join(run, "checkpoints", "final"))
    shutil.rmtree(os.path.join(ckpts, marked[-1]))
    resumed = _torchrun(tmp_path, run, *budget)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    m = _metrics(run)
    assert sum(r.get("event") == "schedule" for r in m) == 1
    with open(os.path.join(run, "checkpoints", "final", "summary.json")) as f:
        assert json.load(f)["steps"] == schedule["steps"]
