"""``gelato pretrain`` as a user runs it: a subprocess, Prefect's temporary server, a private Ray
instance started on a thread beside it, 2 CPU workers; the instance is gone when the command ends."""
from __future__ import annotations

import os
import subprocess
import sys

from imagegen import write_images
from workers.shards import IngestParams, ingest
from workers.sources import open_source
from workers.storage import RunLocation


def _ray_sessions() -> set[str]:
    """Session directories of the gcs_server processes running now."""
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"gcs_server"):
                out |= {a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"--log_dir=")}
    return out


def test_gelato_pretrain_command_runs_and_leaves_no_ray_behind(tmp_path):
    write_images(tmp_path / "src", n_classes=3, per_class=40, size=16)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=20, val_fraction=0.2),
           progress_bar=False)
    before = _ray_sessions()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "flows.cli", "pretrain", "--run", run, "--no-progress", "backbone=small_cnn",
           "backbone_params={width: 8}", "image_size=16", "view.size=16", "batch_size=32", "workers=2", "steps=2",
           "loader_workers=0", "knn_monitor=false", "optimizer=sgd", "lr=0.05", "warmup_epochs=0"]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), env=env,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Started a local Ray instance" in out and "2 steps" in out
    assert "not the main thread" not in out  # Ray's SIGTERM-handler warning for the init thread is filtered
    assert os.path.exists(os.path.join(run, "checkpoints", "final", "backbone.pt"))
    assert _ray_sessions() <= before, "the command's Ray instance outlived it"
