"""Bare DistributedDataParallel SimCLR, timed: the same training step as gelato's workers, without Ray
or the shard stream. Run by bench/pretrain.py in the main environment.

W processes (torch.multiprocessing, spawn) × ``--threads`` torch threads each, gloo on 127.0.0.1,
in-memory uint8 Fashion-MNIST, gelato's objective (``workers.model.build_objective``, so
NT-Xent gathers negatives from every rank), LARS, bf16 autocast and channels_last. Rank r takes
rows [r·B/W, (r+1)·B/W) of each global batch of B. Prints one JSON line: {"pairs_per_s": ..., "rank0_minor_faults_per_step": ...}
(global image pairs per second over the timed steps, measured on rank 0 between two barriers).

Set beside gelato's 2-worker run, it splits gelato's distance to the single-process loop into what
data-parallel training itself costs on these cores (this script) and what Ray Train and the shard
stream add on top (gelato against this script).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, a: argparse.Namespace, port: int, out) -> None:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "bench"))
    torch.set_num_threads(a.threads)
    if a.keep_freed_memory:
        from workers.hardware import keep_freed_memory

        keep_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=a.world)
    from pretrain import common, train_step
    from workers.config import load_config
    from workers.ingest.sources import FashionMNIST
    from workers.model import build_objective
    from workers.pretrain.optim import build_optimizer

    images = torch.from_numpy(FashionMNIST()._images["train"].copy()).unsqueeze(1)   # (60000, 1, 28, 28) uint8
    cfg = load_config(None, common(a.width) + [f"workers={a.world}"])
    torch.manual_seed(0)
    obj = build_objective(cfg, 1).to(memory_format=torch.channels_last)
    opt = build_optimizer("lars", obj, lr=0.3, weight_decay=1e-6)
    model = torch.nn.parallel.DistributedDataParallel(obj)
    g = torch.Generator().manual_seed(rank)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    local = a.batch_size // a.world
    for s in range(a.warmup + a.steps):
        if s == a.warmup:
            dist.barrier()
            t0, faults0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        first = s * a.batch_size + rank * local
        train_step(obj, model, opt, images[perm[first:first + local]], g)
    dist.barrier()
    if rank == 0:
        out.put((a.steps * a.batch_size / (time.perf_counter() - t0),
                 resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc malloc thresholds as gelato's workers set them")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, a, port, out)) for r in range(a.world)]
    for p in procs:
        p.start()
    while True:
        try:
            rate, faults = out.get(timeout=5)
            break
        except queue.Empty:
            if any(p.exitcode for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"rank process exited with {p.exitcode}")
    print(json.dumps({"pairs_per_s": rate, "rank0_minor_faults_per_step": faults / a.steps}))


if __name__ == "__main__":
    main()
