"""What verifying shards costs: a split read through gelato's stream (sha256 as the bytes stream,
tar header checksums, samples released once the shard passed) against the same stream without
verification (the reader before issue 18) and webdataset's own tar reader, interleaved.

    python bench/shard_read.py --run runs/demo --split train --repeats 5

Prints samples/s per reader (median over the repeats) and the ratios, with the CPU capability.
Decoding is included in every reader (torchvision's PNG decoder), on one process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from workers.data.manifest import read_manifest  # noqa: E402
from workers.data.stream import SampleDecoder, group_samples, open_split, shard_urls  # noqa: E402
from workers.storage import RunLocation  # noqa: E402


def _unverified_members(stream):
    """The tar reader before issue 18: no header checksum, no hashing (sizes and names only)."""
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == b"\0" * 512:
            return
        size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
        data = stream.read(size)
        if size % 512:
            stream.read(512 - size % 512)
        if header[156:157] in (b"0", b"\0"):
            yield header[0:100].rstrip(b"\0").decode(), data


def read_verified(loc, manifest, split) -> int:
    return sum(1 for _ in open_split(loc, split, manifest=manifest))


def read_unverified(loc, manifest, split) -> int:
    decode, fs, n = SampleDecoder(manifest), loc.fs(), 0
    for url in shard_urls(loc, manifest, split):
        with fs.open(url, "rb") as f:
            for s in group_samples(_unverified_members(f), url):
                decode(s)
                n += 1
    return n


def read_webdataset(loc, manifest, split) -> int:
    import webdataset as wds

    decode = SampleDecoder(manifest)
    ds = wds.DataPipeline(wds.SimpleShardList(shard_urls(loc, manifest, split)), wds.tarfile_to_samples(),
                          wds.map(decode))
    return sum(1 for _ in ds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--split", default="train")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    loc = RunLocation(os.path.abspath(a.run))
    manifest = read_manifest(loc)
    if manifest is None:
        sys.exit(f"{a.run}: no manifest.json; run `gelato ingest fashion-mnist --out {a.run}` first")
    readers = {"gelato (verified)": read_verified, "gelato unverified (before)": read_unverified,
               "webdataset tarfile_to_samples": read_webdataset}
    rates: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(a.repeats):  # interleaved: the machine's drift hits every reader alike
        for name, fn in readers.items():
            t0 = time.perf_counter()
            n = fn(loc, manifest, a.split)
            rates[name].append(n / (time.perf_counter() - t0))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread, {a.run} {a.split}: "
          f"{manifest['splits'][a.split]['count']} samples in {len(manifest['splits'][a.split]['shards'])} shards, "
          f"{a.repeats} interleaved repeats")
    base = statistics.median(rates["gelato (verified)"])
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"  {name:<32} {m:9.0f} samples/s (median; {min(r):.0f}-{max(r):.0f})   verified / this: {base / m:.3f}")


if __name__ == "__main__":
    main()
