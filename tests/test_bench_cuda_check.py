"""The prepared GPU check (bench/cuda_check.py) run on CPU, so the script a device session spends
its minutes on is known to work before it travels. The GPU itself is what this cannot test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the GPU check script in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "cuda_check.py"), "--cpu", "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cuda_check_runs_its_variants_on_cpu_and_writes_the_table(tmp_path):
    done = _check(tmp_path, "--only", "fm_bf16_cl", "--steps", "4")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "out" / "cuda_check.json") as f:
        report = json.load(f)
    (r,) = report["results"]
    assert r["variant"] == "fm_bf16_cl" and r["ok"] and r["steps"] == 4 and r["images_per_s"] > 0
    assert r["loss_fell"] is True and r["loss_end"] < r["loss_start"]
    assert report["environment"]["device"] == "cpu"
    md = (tmp_path / "out" / "cuda_check.md").read_text()
    assert "| fm_bf16_cl | 4 |" in md and "(falls)" in md
    assert "=== fm_bf16_cl" in (tmp_path / "out" / "cuda_check.log").read_text()


def test_cuda_check_names_an_unknown_variant(tmp_path):
    done = _check(tmp_path, "--only", "fm_bf16_cl,nope")
    assert done.returncode == 2 and "unknown variant(s) ['nope']" in done.stderr
