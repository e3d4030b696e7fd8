"""lightly's stock SimCLR on Fashion-MNIST, timed: run inside bench/.venv-lightly by bench/pretrain.py.

Stock pipeline: torchvision's FashionMNIST dataset → lightly's SimCLRTransform (per-sample PIL ops)
through a DataLoader → the same backbone as gelato's → lightly's SimCLRProjectionHead and
NTXentLoss. Prints one JSON line: {"pairs_per_s": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="folder holding FashionMNIST/raw (uncompressed idx files)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--bf16-channels-last", action="store_true")
    a = ap.parse_args()
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from torchvision import datasets

    from ssl_models.backbones import build

    transform = SimCLRTransform(input_size=28, gaussian_blur=0.5, min_scale=0.2, normalize={"mean": [0.5], "std": [0.5]},
                                vf_prob=0.0, rr_prob=0.0)
    ds = datasets.FashionMNIST(a.root, train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, drop_last=True,
                                         num_workers=a.loader_workers, persistent_workers=a.loader_workers > 0)
    backbone = build("resnet18", in_channels=1, small_stem=True, width=a.width)  # Fashion-MNIST stays 1-channel
    head = SimCLRProjectionHead(backbone.feature_dim, backbone.feature_dim, 128)
    model = torch.nn.Sequential(backbone, head)
    if a.bf16_channels_last:
        model = model.to(memory_format=torch.channels_last)
    crit = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    it = iter(loader)
    t0 = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            t0 = time.perf_counter()
        (x0, x1), _ = next(it)
        if a.bf16_channels_last:
            x0, x1 = x0.contiguous(memory_format=torch.channels_last), x1.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16_channels_last):
            loss = crit(model(x0), model(x1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    print(json.dumps({"pairs_per_s": a.steps * a.batch_size / dt, "loss": float(loss)}))


if __name__ == "__main__":
    main()
