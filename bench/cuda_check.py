"""The prepared GPU check: gelato's pretraining loop on CUDA for a few minutes, one variant per process.

What CPUs cannot show: NCCL (a world-1 process group on a one-GPU machine), bf16 and fp16 autocast
(fp16 with the grad scaler), channels_last, ``torch.compile``, and the ImageNet-scale configs
(ResNet-50 / ViT-S at 224 px). Each variant runs the real loop (``workers.pretrain.loop.run_loop``)
through ``python -m workers.torchrun`` in its own process: the GPU machine has PyTorch but no Ray
(Ray's wheel alone is over the 64 MiB that travels there), and torchrun's session is the loop's
other launcher. For every variant it records images/s (median of the logged intervals after the
first), the time from process start to the first step, the loss at the start and at the end
(for the Fashion-MNIST runs: does it fall?), peak GPU memory and the card's name.

On the device machine (bench/device_kit.sh gathers the wheels and data that travel with it;
bench/RESULTS.md, "GPU (bench/cuda_check.py)", has the whole call):

    python3 bench/cuda_check.py --data .devdata/fashion-mnist --out $OUT --work /tmp/cc --budget-s 400

Here, on CPU, the same script checks itself (gloo, bf16, no fp16, tiny steps):

    .venv/bin/python bench/cuda_check.py --cpu --steps 4 --out /tmp/cuda_check

Writes ``cuda_check.json`` (after every variant, so a cut-off run keeps what finished),
``cuda_check.md`` (a table for bench/RESULTS.md) and ``cuda_check.log`` (every variant's output).
Exit status 1 if a variant failed or a Fashion-MNIST loss did not fall.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (config file, what the variant sets, data set, steps on the GPU)
FM = "configs/fashion_mnist_simclr.yaml"
VARIANTS = {
    # Fashion-MNIST, narrow ResNet-18 at 28 px: does the loss fall under each execution option?
    "fm_fp32": (FM, ["precision=fp32", "channels_last=false"], "fm", 300),
    "fm_bf16_cl": (FM, ["precision=bf16", "channels_last=true"], "fm", 300),
    "fm_fp16_cl": (FM, ["precision=fp16", "channels_last=true"], "fm", 300),
    "fm_bf16_cl_compile": (FM, ["precision=bf16", "channels_last=true", "compile=true"], "fm", 300),
    # the ImageNet-scale configs as shipped (bf16, channels_last for the ResNets), on one GPU
    "in_simclr_r50": ("configs/imagenet_simclr_r50.yaml", [], "rgb", 40),
    "in_moco_v2_r50": ("configs/imagenet_moco_v2_r50.yaml", [], "rgb", 40),
    "in_byol_r50": ("configs/imagenet_byol_r50.yaml", [], "rgb", 40),
    "in_mae_vit": ("configs/imagenet_mae_vit.yaml", [], "rgb", 40),
}
# what every variant of a data set gets on the GPU (one worker, global batch 256 at 224 px) ...
GPU = {"fm": ["workers=1", "use_gpu=true", "loader_workers=6", "checkpoint_every=1000"],
       "rgb": ["workers=1", "use_gpu=true", "batch_size=256", "loader_workers=12", "checkpoint_every=1000",
               "log_every=10", "warmup_epochs=0"]}
# ... and on CPU, where the script checks itself: small, and what two cores can run
CPU = {"fm": ["workers=1", "use_gpu=false", "cpus_per_worker=2", "loader_workers=0", "batch_size=32",
              "backbone_params.width=8", "log_every=1", "checkpoint_every=1000", "knn_bank=64", "knn_queries=32",
              "warmup_epochs=0"],
       "rgb": ["workers=1", "use_gpu=false", "cpus_per_worker=2", "loader_workers=0", "batch_size=8",
               "image_size=32", "precision=bf16", "log_every=1", "checkpoint_every=1000", "warmup_epochs=0"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(cpu: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "host_cpus": os.cpu_count(),
           "cuda": torch.version.cuda, "device": "cpu"}
    try:  # DataLoader workers pass batches through shared memory
        env["shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    except OSError:
        env["shm_gib"] = None
    if not cpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def make_data(kind: str, work: str, data: str | None, cpu: bool) -> str:
    """An ingested run directory: Fashion-MNIST ("fm"), or RGB images ("rgb") for the ImageNet
    configs: Fashion-MNIST items tinted per image at 64 px (random images without the data)."""
    import numpy as np
    from PIL import Image

    from workers.ingest.shards import IngestParams, ingest
    from workers.ingest.sources import open_source
    from workers.storage import RunLocation

    base = os.path.join(work, f"data_{kind}")
    if os.path.exists(os.path.join(base, "manifest.json")):
        return base
    rng = np.random.default_rng(0)
    arrays = labels = None
    if data:
        if kind == "fm" and not cpu:  # the whole data set, as `gelato ingest fashion-mnist` writes it
            ingest(RunLocation(base), open_source("fashion-mnist", data_root=data), IngestParams(shard_size=1000),
                   progress_bar=False)
            return base
        from workers.ingest.sources import FashionMNIST

        src = FashionMNIST(data)
        arrays, labels = src._images["train"], src._labels["train"]
    # on the GPU: 10,240 images, so 40 steps of 256 stay within about one epoch (each epoch restarts the loaders)
    n = {"fm": 320, "rgb": 160}[kind] if cpu else 10240
    folder = os.path.join(work, f"images_{kind}")
    for i in range(n):
        label = int(labels[i]) if labels is not None else i % 4
        if arrays is not None:
            gray = arrays[i].astype(np.float32)
        else:  # a class pattern plus noise, so the kNN monitor has something to find
            proto = np.random.default_rng(label).integers(0, 256, (28, 28)).astype(np.float32)
            gray = np.clip(proto + rng.normal(0, 30, (28, 28)), 0, 255)
        if kind == "fm":
            img = Image.fromarray(gray.astype(np.uint8), "L")
        else:
            tint = rng.uniform(0.3, 1.0, 3)
            img = Image.fromarray((gray[..., None] * tint).astype(np.uint8), "RGB").resize((64, 64))
        d = os.path.join(folder, f"class{label}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i:05d}.png"))
    shard = 40 if cpu else 128
    ingest(RunLocation(base), open_source(folder), IngestParams(shard_size=shard, val_fraction=0.1), progress_bar=False)
    return base


def run_variant(name: str, config: str, overrides: list[str], data_dir: str, work: str, log) -> dict:
    """One variant in a fresh process; its own run directory sharing the ingested shards."""
    run = os.path.join(work, f"run_{name}")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    for entry in os.listdir(data_dir):
        if entry in ("manifest.json", "shards") or entry.endswith(".json"):
            src = os.path.join(data_dir, entry)
            (os.symlink if os.path.isdir(src) else shutil.copy)(src, os.path.join(run, entry))
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "workers.torchrun", run, "--config", os.path.join(ROOT, config), "--no-progress",
           *overrides]
    log(f"\n=== {name}: {' '.join(cmd[1:])}\n")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    log(proc.stdout + proc.stderr)
    out = {"variant": name, "config": config, "overrides": overrides, "rc": proc.returncode, "wall_s": round(wall, 1)}
    rows = []
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        pass
    first = next((r for r in rows if r.get("event") == "first_step"), None)
    logged = [r for r in rows if "loss" in r]
    if first:
        out["start_to_first_step_s"] = round(first["time"] - t0, 1)
        out["wrapped_as"] = first.get("wrapped_as")
    if logged:
        rates = [r["samples_per_s"] for r in logged[1:]] or [logged[0]["samples_per_s"]]
        k = max(1, len(logged) // 5)
        out.update(steps=logged[-1]["step"], images_per_s=round(statistics.median(rates), 1),
                   loss_start=round(statistics.mean(r["loss"] for r in logged[:k]), 4),
                   loss_end=round(statistics.mean(r["loss"] for r in logged[-k:]), 4),
                   data_wait=round(statistics.median(r.get("data_wait", 0.0) for r in logged), 3),
                   gpu_mem_gib=round(max((r.get("gpu_mem_gib", 0.0) for r in logged), default=0.0), 2),
                   knn_top1=next((r["knn_top1"] for r in reversed(logged) if "knn_top1" in r), None))
        out["loss_fell"] = out["loss_end"] < out["loss_start"]
    out["ok"] = proc.returncode == 0 and bool(logged)
    if not out["ok"]:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        out["error"] = " | ".join(tail)[-600:]
    return out


def markdown(env: dict, results: list[dict]) -> str:
    lines = [f"Device: {env.get('device')} ({env.get('memory_gib', '-')} GiB, capability {env.get('capability', '-')}, "
             f"driver {env.get('driver', '-')}), torch {env['torch']}, CUDA {env.get('cuda')}, NCCL "
             f"{env.get('nccl', '-')}, {env['host_cpus']} CPUs.", "",
             "| variant | steps | images/s (median) | waiting on data | start → first step | loss start → end | "
             "peak GPU memory | kNN top-1 | status |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for r in results:
        loss = f"{r['loss_start']} → {r['loss_end']}" if "loss_start" in r else "-"
        if r["variant"].startswith("fm") and "loss_fell" in r:
            loss += " (falls)" if r["loss_fell"] else " (**does not fall**)"
        knn = f"{100 * r['knn_top1']:.1f} %" if r.get("knn_top1") is not None else "-"
        status = "ok" if r["ok"] else f"**failed** (rc {r['rc']}): {r.get('error', '')[:160]}"
        lines.append(f"| {r['variant']} | {r.get('steps', '-')} | {r.get('images_per_s', '-')} | "
                     f"{round(100 * r['data_wait']) if 'data_wait' in r else '-'} % | {r.get('start_to_first_step_s', '-')} s | {loss} | {r.get('gpu_mem_gib', '-')} GiB | {knn} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for cuda_check.json/.md/.log")
    p.add_argument("--data", default=None, help="folder of Fashion-MNIST's idx files (else synthetic images)")
    p.add_argument("--cpu", action="store_true", help="check this script on CPU (gloo, tiny, no fp16)")
    p.add_argument("--only", default=None, help="comma-separated variants (default: all that fit)")
    p.add_argument("--steps", type=int, default=None, help="steps per variant (default: 300 Fashion-MNIST, 40 ImageNet)")
    p.add_argument("--budget-s", type=float, default=None, help="start no variant after this many seconds")
    p.add_argument("--work", default=None, help="scratch folder (default OUT/../cuda_check_work)")
    a = p.parse_args(argv)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    work = a.work or os.path.join(os.path.dirname(os.path.abspath(a.out)), "cuda_check_work")
    os.makedirs(work, exist_ok=True)
    logf = open(os.path.join(a.out, "cuda_check.log"), "w")

    def log(text: str) -> None:
        logf.write(text)
        logf.flush()

    env = environment(a.cpu)
    print(json.dumps(env), flush=True)
    if not a.cpu and env["device"] == "cpu":
        print("error: no CUDA device visible; use --cpu to check the script on CPU", file=sys.stderr)
        return 2
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        print(f"error: unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    results: list[dict] = []
    data_dirs: dict[str, str] = {}
    for name in names:
        if a.budget_s and time.time() - t_start > a.budget_s:
            results.append({"variant": name, "ok": False, "rc": None, "error": "skipped: time budget spent"})
            continue
        config, own, kind, steps = VARIANTS[name]
        if a.cpu and "fp16" in name:
            continue  # fp16 autocast is a GPU option (the config refuses it on CPU)
        steps = a.steps or (4 if a.cpu else steps)
        overrides = (CPU if a.cpu else GPU)[kind] + own + [f"steps={steps}"]
        try:
            if kind not in data_dirs:
                t0 = time.time()
                data_dirs[kind] = make_data(kind, work, a.data, a.cpu)
                log(f"data {kind}: {data_dirs[kind]} in {time.time() - t0:.1f} s\n")
            r = run_variant(name, config, overrides, data_dirs[kind], work, log)
        except Exception as e:  # keep going: the other variants still tell something
            r = {"variant": name, "ok": False, "rc": None, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out, "cuda_check.json"), "w") as f:
            json.dump({"environment": env, "results": results, "elapsed_s": round(time.time() - t_start, 1)}, f, indent=1)
    md = markdown(env, results)
    with open(os.path.join(a.out, "cuda_check.md"), "w") as f:
        f.write(md)
    print(md)
    bad = [r["variant"] for r in results if not r["ok"] or (r["variant"].startswith("fm") and r.get("loss_fell") is False)]
    print(f"{len(results) - len(bad)}/{len(results)} variants ok in {time.time() - t_start:.0f} s"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
