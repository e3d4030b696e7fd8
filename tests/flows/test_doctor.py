"""``gelato doctor``: the real command, on this machine and with the ISA capped at AVX2."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _doctor(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gelato.cli", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env))


def test_doctor_reports_the_machine_measures_both_precisions_and_never_prints_a_secret():
    done = _doctor(AWS_SECRET_ACCESS_KEY="very-secret-value-123", AWS_ACCESS_KEY_ID="AKIAEXAMPLEKEY")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for part in ("cpu capability", "cores", "torch threads", "cuda", "precision: auto resolves to", "torch ",
                 "torchvision", "ray ", "prefect ", "fashion-mnist", "pretraining", "evaluation", "allocator"):
        assert part in out, part
    rates = dict(re.findall(r"^\s+(fp32|bf16)\s+([\d.]+) pairs/s per worker", out, re.M))
    assert set(rates) == {"fp32", "bf16"} and all(float(v) > 0 for v in rates.values())
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out
    assert "very-secret-value-123" not in out + done.stderr and "AKIAEXAMPLEKEY" not in out + done.stderr


def test_doctor_on_an_avx2_only_cpu_says_auto_means_fp32():
    done = _doctor("--no-measure", **AVX2_ONLY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "AVX2" in done.stdout and "emulated" in done.stdout
    assert re.search(r"^\s+cpu\s+fp32 \+ channels_last \(auto: CPU \(AVX2\) has no native bf16", done.stdout, re.M)
    assert "pairs/s" not in done.stdout  # --no-measure
