"""The ingest flow under a real (ephemeral) Prefect server, and the ``gelato`` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from flows.ingest import ingest_flow
from flows.retries import is_io_error
from imagegen import write_images
from workers.data.stream import open_split


def test_ingest_flow_local(tmp_path):
    write_images(tmp_path / "src", n_classes=3, per_class=10)
    out = str(tmp_path / "run")
    m = ingest_flow(str(tmp_path / "src"), out, shard_size=4, val_fraction=0.2, progress_bar=False)
    # a labelled folder without a test split: 10 % held out as test first, then val from the rest
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 22, "val": 5, "test": 3}
    assert len(list(open_split(out, "val"))) == 5 and len(list(open_split(out, "test"))) == 3
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == m
    # a rerun does no work and returns the same manifest
    assert ingest_flow(str(tmp_path / "src"), out, shard_size=4, val_fraction=0.2, progress_bar=False) == m


def test_ingest_flow_s3(tmp_path, s3_bucket):
    files = write_images(tmp_path / "src", n_classes=2, per_class=4, mode="RGB")
    m = ingest_flow(str(tmp_path / "src"), f"s3://{s3_bucket}/r", shard_size=3, val_fraction=0, test_fraction=0,
                    progress_bar=False)
    samples = list(open_split(f"s3://{s3_bucket}/r", "train"))
    assert len(samples) == m["count"] == 8
    arrays = sorted(a.tobytes() for a, _ in files.values())
    assert sorted(s["image"].permute(1, 2, 0).numpy().tobytes() for s in samples) == arrays


def test_retry_only_on_io_errors():
    assert is_io_error(ConnectionError("reset")) and is_io_error(TimeoutError())
    assert not is_io_error(ValueError("bad config")) and not is_io_error(FileNotFoundError("x"))


def test_cli_help_lists_stages_and_bad_source_fails_fast(tmp_path):
    exe = [sys.executable, "-m", "gelato.cli"]
    out = subprocess.run(exe + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "ingest" in out
    r = subprocess.run(exe + ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(exe + ["ingest", "fashion-mnist", "--out", str(tmp_path / "r"), "--shard-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "shard_size must be >= 1" in r.stderr, r.stderr


def _processes_with(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (children of a command that has ended)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_cli_ingest_end_to_end(tmp_path):
    """What a user types: ``gelato ingest DIR --out RUN`` (Prefect's temporary server and all)."""
    write_images(tmp_path / "src", n_classes=2, per_class=5)
    env = dict(os.environ, GELATO_TEST_MARK=f"ingest-cli-{os.getpid()}-{time.time_ns()}")
    env.pop("PREFECT_API_URL", None)  # the harness's server belongs to this process; the CLI starts its own
    r = subprocess.run([sys.executable, "-m", "gelato.cli", "ingest", str(tmp_path / "src"), "--out",
                        str(tmp_path / "run"), "--shard-size", "4", "--val-fraction", "0.2", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # a labelled folder without a test split: 1 of 10 held out as test, then 2 of the 9 left as val
    assert "train        7 samples" in r.stdout and "val          2 samples" in r.stdout and "test         1 samples" in r.stdout
    with open(tmp_path / "run" / "manifest.json") as f:
        assert json.load(f)["count"] == 10
    # the command started Prefect's temporary server itself, at its top (flows/prefect_server.py): Prefect
    # did not start one on first use, and the command stopped its own when it ended
    assert "Starting temporary server" not in r.stdout + r.stderr
    assert not _processes_with(env["GELATO_TEST_MARK"])
