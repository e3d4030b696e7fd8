"""How to store a clip in a shard, measured side by side on Moving Fashion-MNIST clips.

For the same clips (generated, 16 frames of 64×64 RGB), each way a shard could hold them:

- ``ffv1``: one lossless FFV1 video in Matroska;
- ``h264``: one H.264 video (CRF 18, yuv444p) in MP4;
- ``png``: one PNG per frame, each its own member of the sample (``gelato ingest``'s default, chosen
  from these figures).

Prints, per way, the median bytes per clip, the median decode time per clip to uint8
(T, C, H, W) (what the loader pays), whether the round trip is exact and the mean absolute
error, and the ratios to ``png``.

    .venv/bin/python bench/clip_storage.py [--clips 64] [--frames 16] [--size 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    from workers.data.clips import clip_from_members, clip_members, read_video
    from workers.ingest.moving_fmnist import generate
    from workers.ingest.sources import FashionMNIST

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        generate(d, {"train": a.clips}, FashionMNIST(), frames=a.frames, size=a.size)
        clips = [read_video(os.path.join(r, f), 10) for r, _, fs in os.walk(d) for f in sorted(fs)
                 if f.endswith(".mkv") and ".cam2." not in f]
    stats = {}
    for name in ("ffv1", "h264", "png"):  # the members a shard sample holds, decoded as the loader does
        stored = [clip_members(c, name) for c in clips]
        size = lambda members: sum(len(v) for v in members.values())  # noqa: E731
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            back = [clip_from_members(s, 3) for s in stored]
            times.append((time.perf_counter() - t0) / len(stored))
        err = [float(np.abs(b.astype(int) - c).mean()) for b, c in zip(back, clips)]
        exact = all(np.array_equal(b, c) for b, c in zip(back, clips))
        stats[name] = {"bytes": statistics.median(size(s) for s in stored), "decode_ms": 1000 * statistics.median(times),
                       "exact": exact, "mae": statistics.mean(err)}
    caps = sorted({x for x in open("/proc/cpuinfo").read().split() if x.startswith("avx512")}) if \
        os.path.exists("/proc/cpuinfo") else []
    print(f"{len(clips)} clips of {a.frames} x 3 x {a.size} x {a.size}; CPU: {'AVX-512' if caps else 'AVX2 or less'}; "
          f"medians of {a.repeats} decode passes")
    print(f"{'way':<6} {'bytes/clip':>11} {'vs png':>7} {'decode ms/clip':>15} {'vs png':>7} {'exact':>6} {'mean |err|':>11}")
    for name, s in stats.items():
        print(f"{name:<6} {s['bytes']:>11.0f} {s['bytes'] / stats['png']['bytes']:>6.2f}x {s['decode_ms']:>15.2f} "
              f"{s['decode_ms'] / stats['png']['decode_ms']:>6.2f}x {str(s['exact']):>6} {s['mae']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
