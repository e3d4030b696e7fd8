"""Ingest and read throughput on Fashion-MNIST (70,000 images), measured side by side in one run.

Ingest: ``gelato ingest`` (the Prefect flow, parallel shard tasks, atomic publish, sha256) against a
plain single-process loop writing the same shards with ``webdataset.ShardWriter``.
Read: decoded samples/s of gelato's shard stream (``workers.data.stream.open_split``) against
torchvision's ``FashionMNIST`` dataset, both through a ``DataLoader`` with the same number of
loader workers and batch size.

    .venv/bin/python bench/ingest.py [--repeats 3] [--loader-workers 2]
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def plain_shardwriter(src, out: str, shard_size: int) -> int:
    """The naive way: one process, PIL PNG encode, webdataset.ShardWriter."""
    import webdataset as wds
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    n = 0
    for split, records in src.splits().items():
        with wds.ShardWriter(os.path.join(out, f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i, rec in enumerate(records):
                buf = io.BytesIO()
                Image.fromarray(src.pixels(rec), mode="L").save(buf, format="PNG", compress_level=1)
                sink.write({"__key__": f"{split}_{i:08d}", "png": buf.getvalue(), "cls": rec.label,
                            "json": {"source": rec.path, "label": rec.label}})
                n += 1
    return n


def gelato_flow(out: str, shard_size: int) -> int:
    from flows.ingest import ingest_flow

    m = ingest_flow("fashion-mnist", out, shard_size=shard_size, val_fraction=0.0, progress_bar=False)
    return m["count"]


def torchvision_root(src_dir: str, tmp: str) -> str:
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for fn in os.listdir(src_dir):
        if fn.endswith(".gz"):
            with gzip.open(os.path.join(src_dir, fn)) as f, open(os.path.join(raw, fn[:-3]), "wb") as g:
                g.write(f.read())
    return tmp


def read_rate(loader) -> float:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch["label"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args()
    from prefect import flow

    from workers.data.stream import open_split
    from workers.ingest.sources import FashionMNIST

    src = FashionMNIST()
    tmp = tempfile.mkdtemp(prefix="gelato-bench-")

    @flow
    def warm():  # start Prefect's temporary server outside the timed region
        return 1

    t0 = time.perf_counter()
    warm()
    startup = time.perf_counter() - t0

    ours, plain = [], []
    for r in range(a.repeats):
        for name, fn, acc in (("gelato", gelato_flow, ours), ("plain", plain_shardwriter, plain)):
            out = os.path.join(tmp, f"{name}-{r}")
            t0 = time.perf_counter()
            n = fn(out, a.shard_size) if name == "gelato" else fn(src, out, a.shard_size)
            acc.append(n / (time.perf_counter() - t0))
            print(f"  ingest run {r} {name:7s}: {acc[-1]:8.0f} images/s ({n} images)", flush=True)

    from torchvision import datasets, transforms

    tv = datasets.FashionMNIST(torchvision_root(src.root, tmp), train=True, download=False,
                               transform=transforms.PILToTensor())
    run = os.path.join(tmp, "gelato-0")
    rd_ours, rd_tv = [], []
    W = a.loader_workers
    for r in range(a.repeats):
        ds = open_split(run, "train", num_workers=W, shuffle=True, seed=r)
        rd_ours.append(read_rate(torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=W)))
        rd_tv.append(read_rate(torch.utils.data.DataLoader(tv, batch_size=a.batch_size, num_workers=W, shuffle=True)))
        print(f"  read run {r}: gelato {rd_ours[-1]:8.0f}/s  torchvision {rd_tv[-1]:8.0f}/s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch {torch.__version__}; repeats {a.repeats}; medians")
    print(f"Prefect temporary server start (not in the timings): {startup:.1f} s")
    print(f"ingest  gelato flow {med(ours):8.0f} img/s | plain ShardWriter loop {med(plain):8.0f} img/s | "
          f"ratio {med(ours) / med(plain):.2f}x")
    print(f"read    gelato shards {med(rd_ours):8.0f} samples/s | torchvision FashionMNIST {med(rd_tv):8.0f} samples/s | "
          f"ratio {med(rd_ours) / med(rd_tv):.2f}x  ({W} loader workers, batch {a.batch_size})")


if __name__ == "__main__":
    main()
