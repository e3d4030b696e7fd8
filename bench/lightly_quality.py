"""lightly's implementation of one SSL method on Fashion-MNIST, for bench/quality.py.

Runs inside bench/.venv-lightly (``bench/setup_lightly.sh``). lightly's stock pipeline for the
method — its transform (per-sample PIL ops) through a DataLoader, its heads, its loss, its
momentum helpers — around the same backbone as gelato's (narrow ResNet-18, small stem, 1 channel)
with the hyper-parameters of gelato's config for the method (temperature, queue, momentum,
prototypes, optimizer, learning rate, warm-up + cosine schedule), so that only the
implementations differ. Trains ``--steps`` steps of ``--batch-size`` images, bf16 autocast +
channels_last when asked, writes the backbone's state_dict to ``--out`` and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NORM = {"mean": [0.5], "std": [0.5]}
# gelato's Fashion-MNIST views: crops from 20 % of the image, brightness/contrast 0.4 with p 0.8,
# no blur, no grayscale (one channel), horizontal flips. cj_strength 0.5 turns lightly's 0.8 into 0.4.
COMMON = dict(input_size=28, min_scale=0.2, random_gray_scale=0.0, gaussian_blur=0.0, normalize=NORM)


def build(method: str, feat: int):
    """(transform, modules dict, loss function of (modules, views, step, total) → loss)."""
    import copy

    from lightly import loss as L
    from lightly import transforms as T
    from lightly.models import modules as M
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    if method == "simclr":
        tf = T.SimCLRTransform(cj_strength=0.5, **COMMON)
        mods = {"head": M.SimCLRProjectionHead(feat, feat, 128)}
        crit = L.NTXentLoss(temperature=0.2)

        def step(bb, m, views, s, n):
            return crit(m["head"](bb(views[0])), m["head"](bb(views[1])))
    elif method == "moco":
        tf = T.MoCoV2Transform(cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4, **COMMON)
        mods = {"head": M.MoCoProjectionHead(feat, feat, 128)}
        crit = L.NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))

        def step(bb, m, views, s, n):
            if "key_bb" not in m:
                m["key_bb"], m["key_head"] = copy.deepcopy(bb), copy.deepcopy(m["head"])
                deactivate_requires_grad(m["key_bb"]), deactivate_requires_grad(m["key_head"])
            update_momentum(bb, m["key_bb"], 0.99)
            update_momentum(m["head"], m["key_head"], 0.99)
            q = m["head"](bb(views[0]))
            with torch.no_grad():
                k = m["key_head"](m["key_bb"](views[1]))
            return crit(q, k)
    elif method == "byol":
        v1 = T.BYOLView1Transform(cj_strength=1.0, cj_sat=0.0, cj_hue=0.0, **COMMON)
        v2 = T.BYOLView2Transform(cj_strength=1.0, cj_sat=0.0, cj_hue=0.0, solarization_prob=0.2, **COMMON)
        tf = T.BYOLTransform(view_1_transform=v1, view_2_transform=v2)
        mods = {"proj": M.BYOLProjectionHead(feat, 1024, 128), "pred": M.BYOLPredictionHead(128, 1024, 128)}
        crit = L.NegativeCosineSimilarity()

        def step(bb, m, views, s, n):
            if "t_bb" not in m:
                m["t_bb"], m["t_proj"] = copy.deepcopy(bb), copy.deepcopy(m["proj"])
                deactivate_requires_grad(m["t_bb"]), deactivate_requires_grad(m["t_proj"])
            mom = cosine_schedule(s, n, 0.99, 1.0)
            update_momentum(bb, m["t_bb"], mom)
            update_momentum(m["proj"], m["t_proj"], mom)
            p0, p1 = m["pred"](m["proj"](bb(views[0]))), m["pred"](m["proj"](bb(views[1])))
            with torch.no_grad():
                z0, z1 = m["t_proj"](m["t_bb"](views[0])), m["t_proj"](m["t_bb"](views[1]))
            return 0.5 * (crit(p0, z1) + crit(p1, z0))
    elif method == "swav":
        tf = T.SwaVTransform(crop_sizes=(28, 12), crop_counts=(2, 4), crop_min_scales=(0.14, 0.05),
                             crop_max_scales=(1.0, 0.14), cj_strength=0.5, random_gray_scale=0.0,
                             gaussian_blur=0.0, normalize=NORM)
        mods = {"head": M.SwaVProjectionHead(feat, feat, 128),
                "protos": M.SwaVPrototypes(128, 300, n_steps_frozen_prototypes=210)}
        crit = L.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

        def step(bb, m, views, s, n):
            m["protos"].normalize()
            outs = [m["protos"](torch.nn.functional.normalize(m["head"](bb(v)), dim=1), s) for v in views]
            return crit(outs[:2], outs[2:])
    else:
        raise SystemExit(f"lightly_quality: no lightly counterpart for {method!r}")
    return tf, mods, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["simclr", "moco", "byol", "swav"])
    ap.add_argument("--root", required=True, help="folder holding FashionMNIST/raw (uncompressed idx files)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--optimizer", default="lars")
    ap.add_argument("--lr", type=float, required=True, help="per 256 images")
    ap.add_argument("--weight-decay", type=float, default=1e-6)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--bf16-channels-last", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from torchvision import datasets

    from ssl_models.backbones import build as build_backbone
    from workers.pretrain.optim import build_optimizer, lr_schedule

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1, small_stem=True, width=a.width)
    tf, mods, step = build(a.method, backbone.feature_dim)
    model = torch.nn.ModuleDict({"backbone": backbone, **mods})
    if a.bf16_channels_last:
        model = model.to(memory_format=torch.channels_last)
    ds = datasets.FashionMNIST(a.root, train=True, download=False, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, drop_last=True,
                                         num_workers=a.loader_workers, persistent_workers=a.loader_workers > 0)
    lr = a.lr * a.batch_size / 256
    opt = build_optimizer(a.optimizer, model, lr=lr, weight_decay=a.weight_decay)
    lrs = lr_schedule(lr, a.steps, a.warmup_steps)
    extra = dict(mods)
    t0, s, losses = time.perf_counter(), 0, []
    while s < a.steps:
        for views, _ in loader:
            if s >= a.steps:
                break
            if a.bf16_channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            for g in opt.param_groups:
                g["lr"] = lrs[s]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16_channels_last):
                loss = step(backbone, extra, views, s, a.steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            s += 1
    dt = time.perf_counter() - t0
    torch.save(backbone.state_dict(), a.out)
    print(json.dumps({"seconds": dt, "pairs_per_s": a.steps * a.batch_size / dt,
                      "loss_first": sum(losses[:10]) / len(losses[:10]), "loss_last": sum(losses[-10:]) / len(losses[-10:])}))


if __name__ == "__main__":
    main()
