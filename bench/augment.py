"""Batched SimCLR views (gelato) vs torchvision v2 transforms applied per sample through PIL.

Both sides make the same view of a batch of 256 uint8 images 3×32×32 with the same parameters:
random resized crop to 32 (scale 0.2–1, ratio 3/4–4/3), horizontal flip p=0.5, colour jitter
0.4/0.4/0.4/0.1 applied with p=0.8, random grayscale p=0.2, Gaussian blur (3×3, σ ∈ [0.1, 2])
with p=0.5, then float conversion and normalisation (mean 0.5, std 0.5).

- gelato: ``ssl_models.augment.view(images, ViewConfig(size=32), generator)``, one call for the
  batch, on the CPU (and on CUDA too when a GPU is present).
- torchvision: ``v2.Compose([ToPILImage, RandomResizedCrop, RandomHorizontalFlip,
  RandomApply([ColorJitter], p=0.8), RandomGrayscale, RandomApply([GaussianBlur], p=0.5),
  PILToTensor, ToDtype(float32, scale=True), Normalize])`` called on each image in a Python
  loop, then stacked (``PILToTensor`` + ``ToDtype`` is v2's replacement for the deprecated
  ``ToTensor``).

The torchvision side runs with one torch thread, as it would inside a DataLoader worker (which
sets ``torch.set_num_threads(1)``); with more threads, the tiny per-image convolutions of its
blur spend most of their time waking OpenMP threads (50× slower on a busy 2-core machine).
gelato's batched view is measured with one thread and, where torch has more, with torch's
default thread count. Each row runs ``--reps`` times after a warm-up; the script prints medians,
the ratio to torchvision, and the load average (other processes skew every figure), all in this
one run. Usage: ``python bench/augment.py [--reps 7] [--batch 256]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torchvision.transforms import v2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ssl_models.augment import ViewConfig, view  # noqa: E402


def torchvision_pipeline() -> v2.Compose:
    return v2.Compose([
        v2.ToPILImage(),
        v2.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


def timed(fn, reps: int, sync=lambda: None) -> list[float]:
    fn()                                    # warm-up
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cfg = ViewConfig(size=32, scale=(0.2, 1.0), flip_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4,
                     hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, sigma=(0.1, 2.0), solarize_p=0.0,
                     mean=(0.5,), std=(0.5,))
    gen = torch.Generator().manual_seed(0)
    tv = torchvision_pipeline()
    torch.manual_seed(0)

    def per_sample():
        return torch.stack([tv(img) for img in images])

    rows = []
    torch.set_num_threads(1)
    t_tv = statistics.median(timed(per_sample, args.reps))
    rows.append(("torchvision v2, per sample via PIL (cpu, 1 thread)", t_tv))
    rows.append(("gelato batched view (cpu, 1 thread)", statistics.median(timed(lambda: view(images, cfg, gen), args.reps))))
    torch.set_num_threads(default_threads)
    if default_threads > 1:
        rows.append((f"gelato batched view (cpu, {default_threads} threads)",
                     statistics.median(timed(lambda: view(images, cfg, gen), args.reps))))
    if torch.cuda.is_available():
        gpu_images = images.cuda()
        rows.append((f"gelato batched view ({torch.cuda.get_device_name()})",
                     statistics.median(timed(lambda: view(gpu_images, cfg, gen), args.reps, torch.cuda.synchronize))))

    print(f"batch {args.batch} × 3×32×32 uint8, {args.reps} reps (median), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{load_before[0]:.2f} before / {os.getloadavg()[0]:.2f} after")
    print(f"{'pipeline':<52} {'median ms/batch':>16} {'images/s':>10} {'speed-up vs torchvision':>24}")
    for name, t in rows:
        print(f"{name:<52} {t * 1e3:>16.1f} {args.batch / t:>10.0f} {t_tv / t:>23.1f}×")


if __name__ == "__main__":
    main()
