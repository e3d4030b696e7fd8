"""Pretraining throughput on Fashion-MNIST, measured side by side in one run on this machine.

Same backbone (ResNet-18, small-image stem, base width 64 and 32), batch 256, 28×28, SimCLR:

- gelato as users launch it: ``workers.pretrain.launch`` (Ray Train, shard stream, DDP over gloo),
  2 workers × 1 CPU, and 1 worker × 2 CPUs (scaling);
- bare DDP (``bench/ddp_simclr.py``): the same step in 2 processes × 1 thread with in-memory data,
  no Ray and no shard stream, which splits gelato's distance to the plain loop into what data
  parallelism itself costs and what the orchestration adds;
- the same loop under ``torchrun`` (``workers/pretrain/torchrun.py``), 2 ranks, no Ray: what Ray Train's
  orchestration costs against a launcher that does nothing else;
- the practical ceiling: a plain single-process PyTorch loop over in-memory uint8 tensors with the
  same model, the same batched augmentation (``objective.make_views``), the same precision and
  channels_last;
- lightly's stock SimCLR (``SimCLRTransform`` per sample through a DataLoader, ``NTXentLoss``,
  ``SimCLRProjectionHead``), in its own environment (``bench/setup_lightly.sh``), fp32 and
  bf16 + channels_last.

Also the time to the first training step: from the ``launch()`` call, and from starting the
``gelato pretrain`` command (which adds the command's imports and Prefect's temporary API server).
Throughput is image pairs/s over the steps after a warm-up. Every measurement runs in the precision
``auto`` resolves to on this machine (bf16 with native bf16, else fp32: workers/hardware.py), then,
for reference, in the other one (``--precisions``); the output names the CPU and its capability.

    .venv/bin/python bench/pretrain.py [--widths 32,64] [--steps 8] [--repeats 1] [--skip-lightly] [--skip-cli]
                                       [--precisions auto,other]

The machine's speed drifts, so each gelato and lightly run is bracketed by plain-loop runs and
compared with their mean; the summary gives medians of those ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402

from quality import tv_root  # noqa: E402
from workers.config import load_config  # noqa: E402
from workers.ingest.shards import IngestParams, ingest  # noqa: E402
from workers.ingest.sources import FashionMNIST  # noqa: E402
from workers.model import build_objective  # noqa: E402
from workers.pretrain.launch import launch
from workers.storage import RunLocation  # noqa: E402


PRECISION = os.environ.get("GELATO_BENCH_PRECISION", "bf16")  # fp32 or bf16: what the subprocesses run


def common(width: int, precision: str = "") -> list[str]:
    return ["objective=simclr", "backbone=resnet18", f"backbone_params={{small_stem: true, width: {width}}}",
            "image_size=28", "batch_size=256", f"precision={precision or PRECISION}", "channels_last=true",
            "optimizer=lars", "knn_monitor=false", "objective_params.temperature=0.5"]


def plain_loop(width: int, images: torch.Tensor, warmup: int, steps: int) -> float:
    """Single process, in-memory tensors, batched augmentation, the precision under test, channels_last."""
    from workers.pretrain.optim import build_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(None, common(width) + ["workers=1"])
    obj = build_objective(cfg, 1).to(memory_format=torch.channels_last)
    opt = build_optimizer("lars", obj, lr=0.3, weight_decay=1e-6)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(images), generator=g)
    t0 = None
    for s in range(warmup + steps):
        if s == warmup:
            t0 = time.perf_counter()
        train_step(obj, obj, opt, images[perm[s * 256:(s + 1) * 256]], g)
    return steps * 256 / (time.perf_counter() - t0)


def train_step(obj, model, opt, x: torch.Tensor, g: torch.Generator) -> None:
    """One step of the in-memory loops: batched views, channels_last, autocast at ``PRECISION``,
    backward, step. ``model`` is ``obj`` itself or ``obj`` wrapped in DDP (bench/ddp_simclr.py)."""
    views = {k: v.contiguous(memory_format=torch.channels_last) for k, v in obj.make_views(x, generator=g).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16"):
        loss = model(views)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _metrics(run: str) -> tuple[list[dict], float]:
    """(the rows of a run's metrics.jsonl, the time of its first step)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, next(r["time"] for r in rows if r.get("event") == "first_step")


def _rate_and_first_step(run: str, warmup: int, t0: float) -> tuple[float, float]:
    """(pairs/s from the end of the warm-up to the last logged step, first step − t0) of a run."""
    rows, first = _metrics(run)
    end = next(r for r in reversed(rows) if "loss" in r)
    span = end["time"] - next(r["time"] for r in rows if "loss" in r and r["step"] == warmup)
    # the last step also writes a checkpoint; its time is not in the step interval measured here
    return ((end["step"] - warmup) * 256) / span, first - t0


def gelato_overrides(width: int, workers: int, warmup: int, steps: int) -> list[str]:
    # rows at the end of the warm-up and at the last step, and every `warmup` steps between (a log
    # step all-reduces its statistics: logging every step would add a synchronisation per step)
    return common(width) + [f"workers={workers}", f"cpus_per_worker={2 // workers}", f"steps={warmup + steps}",
                            f"log_every={warmup}", "loader_workers=1", f"checkpoint_every={warmup + steps}"]


def gelato(width: int, run: str, workers: int, warmup: int, steps: int) -> tuple[float, float]:
    """(pairs/s after warm-up, seconds from launch() to the first step)."""
    cfg = load_config(None, gelato_overrides(width, workers, warmup, steps))
    t0 = time.time()
    launch(run, cfg, overwrite=True, progress_bar=False, log=lambda *a: None)
    return _rate_and_first_step(run, warmup, t0)


def gelato_torchrun(width: int, run: str, warmup: int, steps: int) -> tuple[float, float]:
    """The same loop under ``torchrun`` with 2 ranks (workers/pretrain/torchrun.py, no Ray): (pairs/s after
    warm-up, seconds from starting the command to the first step)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "workers.torchrun", run, "--overwrite", "--no-progress"] + gelato_overrides(width, 2, warmup, steps)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", GELATO_BENCH_PRECISION=PRECISION))
    return _rate_and_first_step(run, warmup, t0)


def cli_first_step(width: int, run: str) -> float:
    """Seconds from starting the ``gelato pretrain`` command (a new process: imports, config
    validation, Prefect's temporary server, the private Ray instance) to the first training step."""
    cmd = [sys.executable, "-m", "gelato.cli", "pretrain", "--run", run, "--overwrite", "--no-progress"] + common(width) + \
        ["workers=2", "cpus_per_worker=1", "steps=3", "log_every=1", "loader_workers=1", "checkpoint_every=3"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return _metrics(run)[1] - t0


def bare_ddp(width: int, workers: int, warmup: int, steps: int) -> float:
    """The same step in bare DDP (bench/ddp_simclr.py): no Ray, no shard stream."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "ddp_simclr.py"), "--width", str(width), "--world", str(workers),
           "--threads", str(2 // workers), "--warmup", str(warmup), "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, GELATO_BENCH_PRECISION=PRECISION))
    return json.loads(out.stdout.strip().splitlines()[-1])["pairs_per_s"]


def lightly(width: int, root: str, warmup: int, steps: int, bf16_cl: bool) -> float:
    py = os.path.join(REPO, "bench", ".venv-lightly", "bin", "python")
    cmd = [py, os.path.join(REPO, "bench", "lightly_simclr.py"), "--root", root, "--width", str(width),
           "--warmup", str(warmup), "--steps", str(steps)] + (["--bf16-channels-last"] if bf16_cl else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    return json.loads(out.stdout.strip().splitlines()[-1])["pairs_per_s"]


def main() -> None:
    global PRECISION
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-lightly", action="store_true")
    ap.add_argument("--skip-cli", action="store_true", help="no `gelato pretrain` command-to-first-step runs")
    ap.add_argument("--precisions", default="auto,other", choices=["auto", "auto,other"],
                    help="the precision auto picks here, and (default) the other one for reference")
    a = ap.parse_args()
    if a.steps % a.warmup:
        ap.error("--steps must be a multiple of --warmup (gelato logs every `warmup` steps)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not a.skip_lightly:
        subprocess.run(["bash", os.path.join(REPO, "bench", "setup_lightly.sh")], check=True)

    src = FashionMNIST()
    images = torch.from_numpy(src._images["train"]).unsqueeze(1).contiguous()  # (60000, 1, 28, 28) uint8
    tmp = tempfile.mkdtemp(prefix="gelato-bench-pretrain-")
    run = os.path.join(tmp, "run")
    ingest(RunLocation(run), src, IngestParams(shard_size=1000, val_fraction=0.1), progress_bar=False)
    raw = os.path.join(tv_root(os.path.join(tmp, "tv")), "FashionMNIST", "raw")

    from workers.hardware import capabilities, resolve

    caps = capabilities("cpu")
    auto = resolve("auto", caps).precision
    order = [auto] + ([{"bf16": "fp32", "fp32": "bf16"}[auto]] if a.precisions == "auto,other" else [])
    print(f"machine: {caps.cpu_model}, torch CPU capability {caps.cpu_capability}, native bf16 "
          f"{'yes (' + ', '.join(caps.cpu_bf16_flags) + ')' if caps.native_bf16 else 'no'}; precision auto = {auto}; "
          f"measuring {', '.join(order)}", flush=True)
    summaries = []
    for precision in order:
        PRECISION = precision
        summaries += measure(a, images, run, raw, precision, caps, auto)
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    for line in summaries:
        print(line)


def measure(a, images, run, raw, precision: str, caps, auto: str) -> list[str]:
    """Every launcher against the plain loop at ``precision``; returns the summary lines."""
    print(f"\n[{precision}{' (auto)' if precision == auto else ' (reference)'}]", flush=True)
    results: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)
        print(f"  {key:<32s} {value:8.1f}", flush=True)

    # This machine's speed drifts by 20-30 % within minutes, so every other measurement is bracketed
    # by plain-loop runs just before and after it, and its ratio to their mean is what is compared.
    ratios: dict[str, list[float]] = {}
    for width in [int(w) for w in a.widths.split(",")]:
        root = os.path.dirname(os.path.dirname(raw))
        others = [("gelato 2 workers", lambda: gelato(width, run, 2, a.warmup, a.steps)),
                  ("bare DDP 2 procs", lambda: bare_ddp(width, 2, a.warmup, a.steps)),
                  ("gelato 1 worker", lambda: gelato(width, run, 1, a.warmup, a.steps)),
                  ("gelato torchrun 2 procs", lambda: gelato_torchrun(width, run, a.warmup, a.steps))]
        if not a.skip_lightly:
            others += [("lightly fp32", lambda: lightly(width, root, a.warmup, a.steps, False)),
                       ("lightly bf16+cl", lambda: lightly(width, root, a.warmup, a.steps, True))]
        for _ in range(a.repeats):
            before = plain_loop(width, images, a.warmup, a.steps)
            record(f"w{width} plain loop", before)
            for name, fn in others:
                out = fn()
                rate, first = out if isinstance(out, tuple) else (out, None)
                record(f"w{width} {name}", rate)
                if name == "gelato 2 workers":
                    record(f"w{width} gelato first step s", first)
                if name == "gelato torchrun 2 procs":
                    record(f"w{width} torchrun first step s", first)
                after = plain_loop(width, images, a.warmup, a.steps)
                record(f"w{width} plain loop", after)
                ratios.setdefault(f"w{width} {name}", []).append(rate / ((before + after) / 2))
                before = after
            if not a.skip_cli:
                record(f"w{width} CLI first step s", cli_first_step(width, run))

    med = {k: statistics.median(v) for k, v in results.items()}
    rmed = {k: statistics.median(v) for k, v in ratios.items()}
    lines = [f"{precision} ({'auto' if precision == auto else 'reference'}) on {caps.cpu_model} "
             f"[{caps.cpu_capability}, native bf16 {'yes' if caps.native_bf16 else 'no'}], {os.cpu_count()} cores, "
             f"torch {torch.__version__}; batch 256 pairs, 28x28, {a.steps} timed steps after {a.warmup} warm-up, "
             f"medians of {a.repeats}; each ratio is the median of (run / mean of the plain-loop runs just before and "
             f"after it)"]
    for width in [int(w) for w in a.widths.split(",")]:
        w = f"w{width}"
        line = (f"  width {width}: gelato {med[w + ' gelato 2 workers']:.1f} pairs/s = {rmed[w + ' gelato 2 workers']:.2f}x the "
                f"plain loop ({med[w + ' plain loop']:.1f}) | 1 worker {med[w + ' gelato 1 worker']:.1f} = "
                f"{rmed[w + ' gelato 1 worker']:.2f}x (2 workers / 1 worker = "
                f"{rmed[w + ' gelato 2 workers'] / rmed[w + ' gelato 1 worker']:.2f}x) | "
                f"first step {med[w + ' gelato first step s']:.1f} s from launch()"
                f"{'' if a.skip_cli else ', %.1f s from the gelato pretrain command' % med[w + ' CLI first step s']}"
                f" | under torchrun (no Ray) {med[w + ' gelato torchrun 2 procs']:.1f} = "
                f"{rmed[w + ' gelato torchrun 2 procs']:.2f}x the plain loop, first step "
                f"{med[w + ' torchrun first step s']:.1f} s from the command"
                f" | bare DDP (no Ray, no stream) "
                f"{med[w + ' bare DDP 2 procs']:.1f} = {rmed[w + ' bare DDP 2 procs']:.2f}x the plain loop, so gelato "
                f"= {rmed[w + ' gelato 2 workers'] / rmed[w + ' bare DDP 2 procs']:.2f}x bare DDP")
        if not a.skip_lightly:
            g = rmed[w + " gelato 2 workers"]
            lf, lb = rmed[w + " lightly fp32"], rmed[w + " lightly bf16+cl"]
            line += (f" | lightly fp32 {med[w + ' lightly fp32']:.1f} (gelato {g / lf:.2f}x), "
                     f"bf16+cl {med[w + ' lightly bf16+cl']:.1f} (gelato {g / lb:.2f}x)")
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
