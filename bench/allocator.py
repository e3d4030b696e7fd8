"""What glibc's malloc thresholds cost a CPU training step, measured side by side in one run.

gelato's training workers and evaluation call ``workers.hardware.keep_freed_memory()``: fixed
``M_MMAP_THRESHOLD`` (32 MiB) and ``M_TRIM_THRESHOLD`` (1 GiB), so the activations a step frees stay in
the process for the next step instead of being unmapped and faulted in again. This measures the
demo's SimCLR step (ResNet-18 small stem, batch 256 pairs, 28×28, the precision ``auto`` picks here,
channels_last) with glibc's defaults and with gelato's setting, alternately, each in a new process:

- the plain loop: one process, all cores (``bench/pretrain.py``'s ``plain_loop``);
- bare DDP: one process per core, one thread each (``bench/ddp_simclr.py``), the layout of gelato's
  2-worker runs.

Prints pairs/s and minor page faults per step for each, and the median ratio tuned / default.

    .venv/bin/python bench/allocator.py [--width 32] [--steps 12] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAIN = """
import json, os, resource, sys
sys.path[:0] = [{repo!r}, {bench!r}]
import torch
import pretrain as P
from workers.ingest.sources import FashionMNIST
if {tuned}:
    from workers.hardware import keep_freed_memory
    keep_freed_memory()
P.PRECISION = {precision!r}
images = torch.from_numpy(FashionMNIST()._images["train"].copy()).unsqueeze(1)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rate = P.plain_loop({width}, images, {warmup}, {steps})
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({{"pairs_per_s": rate, "minor_faults_per_step": faults / ({warmup} + {steps})}}))
"""


def plain(a, precision: str, tuned: bool) -> dict:
    code = PLAIN.format(repo=REPO, bench=os.path.join(REPO, "bench"), tuned=tuned, precision=precision,
                        width=a.width, warmup=a.warmup, steps=a.steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ddp(a, precision: str, tuned: bool) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "bench", "ddp_simclr.py"), "--width", str(a.width), "--world", "2",
           "--threads", "1", "--warmup", str(a.warmup), "--steps", str(a.steps)] + (["--keep-freed-memory"] if tuned else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, GELATO_BENCH_PRECISION=precision))
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"pairs_per_s": row["pairs_per_s"], "minor_faults_per_step": row["rank0_minor_faults_per_step"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    from workers.hardware import capabilities, resolve

    caps = capabilities("cpu")
    precision = resolve("auto", caps).precision
    print(f"machine: {caps.cpu_model}, torch CPU capability {caps.cpu_capability}, native bf16 "
          f"{'yes' if caps.native_bf16 else 'no'}, {os.cpu_count()} cores; precision auto = {precision}; "
          f"width {a.width}, {a.steps} timed steps after {a.warmup}", flush=True)
    rows: dict[str, list[dict]] = {}
    for r in range(a.repeats):
        for name, fn in (("plain loop", plain), ("bare DDP 2x1", ddp)):
            for tuned in (False, True):
                row = fn(a, precision, tuned)
                key = f"{name} {'keep_freed_memory' if tuned else 'glibc defaults'}"
                rows.setdefault(key, []).append(row)
                print(f"  [{r + 1}/{a.repeats}] {key:<34s} {row['pairs_per_s']:7.1f} pairs/s, "
                      f"{row['minor_faults_per_step']:9.0f} minor faults/step", flush=True)
    print()
    for name in ("plain loop", "bare DDP 2x1"):
        base, tuned = rows[f"{name} glibc defaults"], rows[f"{name} keep_freed_memory"]
        ratios = [t["pairs_per_s"] / b["pairs_per_s"] for b, t in zip(base, tuned)]
        med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
        print(f"{name}: glibc defaults {med(base, 'pairs_per_s'):.1f} pairs/s ({med(base, 'minor_faults_per_step'):.0f} "
              f"faults/step) -> keep_freed_memory {med(tuned, 'pairs_per_s'):.1f} ({med(tuned, 'minor_faults_per_step'):.0f}"
              f" faults/step): median ratio {statistics.median(ratios):.3f}x (runs {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
