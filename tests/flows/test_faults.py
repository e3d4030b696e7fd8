"""The fault matrix: real processes, a real S3 API (moto_server), real Ray, real Prefect.

- the S3 endpoint stops and comes back during an ingest: retries, then the same manifest as an
  undisturbed ingest;
- the disk fills during an ingest: one clear error, nothing half-published, and the rerun goes on;
- the ``gelato pretrain`` driver is killed mid-run: its private Ray instance goes with it, and the
  same command resumes and ends at exactly the asked-for step, leaving no Ray behind.

Elsewhere: workers killed during a checkpoint write (``tests/workers/test_pretrain_ray.py``), a
damaged shard (``tests/workers/test_integrity.py`` and the Ray test), a killed ingest
(``tests/workers/test_shards.py``), credentials never written (``tests/workers/test_credentials.py``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port
from imagegen import write_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- S3 goes away

class FlakyEndpoint:
    """A TCP proxy in front of the S3 server that can go down (connections cut, new ones refused)
    and come back on the same port; counts the bytes sent upstream."""

    def __init__(self, upstream_port: int):
        self.upstream, self.port = upstream_port, free_port()
        self.sent, self.conns, self.lock = 0, [], threading.Lock()
        self.listener = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        self.listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if upstream:
                    self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def test_s3_endpoint_down_during_ingest_retries_then_writes_the_same_manifest(tmp_path, s3_endpoint, s3_bucket):
    import s3fs

    from flows.ingest import ingest_flow
    from workers.credentials import StorageOptions

    write_images(tmp_path / "src", n_classes=3, per_class=80, size=24)
    src = str(tmp_path / "src")
    reference = ingest_flow(src, f"s3://{s3_bucket}/reference", shard_size=10, val_fraction=0.1, progress_bar=False)
    total = sum(s["bytes"] for split in reference["splits"].values() for s in split["shards"])

    proxy = FlakyEndpoint(int(s3_endpoint.rsplit(":", 1)[1]))
    outage = {}

    def cut_when_a_third_is_sent():
        while proxy.sent < total / 3:
            time.sleep(0.001)
        proxy.down()
        outage["at_bytes"], outage["t"] = proxy.sent, time.time()
        time.sleep(3.0)  # the endpoint is gone for 3 s: connections cut, new ones refused
        proxy.up()

    threading.Thread(target=cut_when_a_third_is_sent, daemon=True).start()
    out = f"s3://{s3_bucket}/flaky"
    manifest = ingest_flow(src, out, shard_size=10, val_fraction=0.1, progress_bar=False,
                           storage_options=StorageOptions({"client_kwargs": {"endpoint_url": proxy.url}}))
    assert outage, "the outage never happened: the ingest sent less than a third of its bytes through the proxy"
    assert manifest == reference  # every shard written once and whole, byte for byte
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=s3_endpoint)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{out}/shards"))
    assert names == sorted(s["name"] for split in manifest["splits"].values() for s in split["shards"])


# ----------------------------------------------------------------------------- the disk fills

@pytest.fixture()
def small_disk(tmp_path):
    """A 600 KiB tmpfs (CI runs as root). Skipped where this container may not mount one."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root in a container that allows it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _gelato(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "gelato.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env or os.environ.copy())


def test_disk_full_during_ingest_is_one_clear_error_nothing_half_published_and_the_rerun_goes_on(tmp_path, small_disk):
    from workers.ingest.shards import sha256_of
    from workers.storage import RunLocation

    write_images(tmp_path / "src", n_classes=4, per_class=60, size=40, mode="RGB")  # ~1.2 MB of PNG shards
    run = small_disk / "run"
    r = _gelato("ingest", str(tmp_path / "src"), "--out", str(run), "--shard-size", "20", "--image-format", "png",
                "--no-progress")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "no space left on the device holding" in r.stderr and "rerun the same command" in r.stderr
    assert "Traceback" not in out
    assert not (run / "manifest.json").exists()  # the ingest is not published
    left = sorted(os.listdir(run / "shards"))
    assert not [n for n in left if n.startswith(".")], left  # no temporary file left behind
    published = [n for n in left if n.endswith(".tar")]
    states = {n[:-5]: json.loads((run / ".ingest" / n).read_text()) for n in os.listdir(run / ".ingest")}
    for n in published:  # what is there is whole: the rerun reuses it as it is
        if n in states:
            assert sha256_of(RunLocation(str(run)).fs(), str(run / "shards" / n)) == states[n]["result"]["sha256"]
    # room again (the run moves to a bigger disk): the same command finishes
    bigger = tmp_path / "bigger"
    subprocess.run(["cp", "-a", str(run), str(bigger)], check=True)
    r = _gelato("ingest", str(tmp_path / "src"), "--out", str(bigger), "--shard-size", "20", "--image-format", "png",
                "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((bigger / "manifest.json").read_text())
    assert manifest["count"] == 240


# ----------------------------------------------------------------------------- the driver dies

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


def test_pretrain_driver_killed_mid_run_then_the_same_command_resumes_to_the_exact_step(tmp_path):
    from workers.ingest.shards import IngestParams, ingest
    from workers.ingest.sources import open_source
    from workers.storage import RunLocation

    write_images(tmp_path / "src", n_classes=3, per_class=40, size=16)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=20, val_fraction=0.2),
           progress_bar=False)
    cmd = ["pretrain", "--run", run, "--no-progress", "backbone=small_cnn", "backbone_params={width: 8}",
           "image_size=16", "view.size=16", "batch_size=32", "workers=2", "steps=100", "checkpoint_every=20",
           "loader_workers=0", "knn_monitor=false", "optimizer=sgd", "lr=0.05", "warmup_epochs=0", "log_every=5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    before = _ray_sessions()
    driver = subprocess.Popen([sys.executable, "-m", "gelato.cli", *cmd], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline, at = time.time() + 240, None
    while time.time() < deadline and driver.poll() is None:
        try:
            with open(metrics) as f:
                steps = [json.loads(x).get("step", 0) for x in f if x.strip()]
        except (FileNotFoundError, json.JSONDecodeError):
            steps = []
        if steps and max(steps) >= 45:
            at = max(steps)
            driver.send_signal(signal.SIGKILL)  # the driver (and with it its private Ray) dies at once
            break
        time.sleep(0.05)
    driver.wait(30)
    assert at is not None, "the run never reached step 45 before it ended"
    assert not os.path.exists(os.path.join(run, "checkpoints", "final"))
    deadline = time.time() + 20
    while _ray_sessions() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_sessions() - before, "the killed driver's Ray instance outlived it"

    again = _gelato(*cmd, env=env)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resuming" in out and "Started a local Ray instance" in out
    assert "not the main thread" not in out  # Ray's SIGTERM-handler warning for the init thread is filtered
    assert _ray_sessions() <= before, "the command's Ray instance outlived it"
    with open(os.path.join(run, "checkpoints", "final", "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 100 == summary["total_steps"]
    with open(metrics) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert resumed and 20 <= resumed[-1]["step"] <= at
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and steps[-1] == 100
