"""A real Ray cluster on loopback: ``ray start --head`` + a second node, a pretraining job submitted
with the Ray Jobs API (``ray job submit --working-dir . -- gelato pretrain ...``), then ``ray stop``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port
from imagegen import write_images
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.storage import RunLocation

pytestmark = pytest.mark.slow  # a 2-node Ray cluster

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@pytest.fixture()
def ray_cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    ray = os.path.join(BIN, "ray")
    port, dash = free_port(), free_port()
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                       timeout=120)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submitted_to_two_node_cluster(tmp_path, ray_cluster):
    write_images(tmp_path / "src", n_classes=2, per_class=40, size=16)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=10, val_fraction=0.25),
           progress_bar=False)
    env = ray_cluster["env"]
    nodes = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{ray_cluster['gcs']}'); "
                            "print(sum(n['Alive'] for n in ray.nodes()))"], env=env, capture_output=True, text=True)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", REPO,
           "--", "gelato", "pretrain", "--run", run, "--no-progress",
           "backbone=small_cnn", "backbone_params={width: 8}", "image_size=16", "view.size=16", "batch_size=16",
           "workers=2", "loader_workers=0", "steps=6", "checkpoint_every=3", "knn_bank=40", "knn_queries=20",
           "optimizer=sgd", "lr=0.05"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "succeeded" in r.stdout.lower(), (r.stdout[-3000:], r.stderr[-3000:])
    with open(os.path.join(run, "checkpoints", "final", "summary.json")) as f:
        assert json.load(f)["steps"] == 6
    ckpts = [d for d in os.listdir(os.path.join(run, "checkpoints")) if d.startswith("checkpoint_2")]
    assert len(ckpts) == 2  # steps 3 and 6
