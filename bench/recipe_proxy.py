"""Fast recipe search for the Fashion-MNIST demo: one process, in-memory data, then the probe.

The demo's pipeline (Ray Train, shard stream, 2 DDP workers) costs ~15 minutes per try; this proxy
trains the same objective with the same config fields (``workers.config`` overrides, e.g.
``objective_params.temperature=0.2 view.scale=[0.2,1]``) in a single process over in-memory
tensors (bf16 autocast + channels_last, as the plain loop of bench/pretrain.py), then runs the
evaluation stage's linear probe (λ chosen on ``val``) and kNN on the backbone's features. It
ranks recipes; the winner is then run through ``gelato run`` and both figures go to RESULTS.md.

    .venv/bin/python bench/recipe_proxy.py --run runs/demo [--minutes 4] [key=value ...]

Needs an ingested run (``make demo`` or ``gelato ingest``) for the train/val/test splits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from workers.config import load_config  # noqa: E402
from workers.data.loader import load_split  # noqa: E402
from workers.data.manifest import read_manifest  # noqa: E402
from workers.evaluate.features import FeatureSource  # noqa: E402
from workers.evaluate.probe import linear_probe  # noqa: E402
from workers.knn import extract_features, knn_accuracy  # noqa: E402
from workers.model import build_objective  # noqa: E402
from workers.pretrain.optim import build_optimizer, lr_schedule  # noqa: E402
from workers.storage import RunLocation  # noqa: E402

DEMO = os.path.join(REPO, "configs", "pipeline_demo.yaml")


def splits(run: str) -> dict:
    cache = os.path.join(run, "proxy_splits.pt")
    if os.path.exists(cache):
        return torch.load(cache, weights_only=True)
    loc = RunLocation(run)
    manifest = read_manifest(loc)
    out = {s: {k: v for k, v in load_split(loc, manifest, s).items() if k in ("image", "label")}
           for s in ("train", "val", "test")}
    torch.save(out, cache)
    return out


def features(backbone, preprocess, images: torch.Tensor) -> torch.Tensor:
    """What the evaluation stage extracts (bf16 + channels_last, eval mode), without its cache."""
    src = FeatureSource("proxy", "proxy", preprocess, backbone.eval())
    return extract_features(lambda x: src.encode(x, "bf16"), images, batch_size=256)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=os.path.join(REPO, "runs", "demo"))
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget; sets the schedule length")
    ap.add_argument("--steps-per-s", type=float, default=None, help="known speed (else measured on 5 steps)")
    ap.add_argument("--epochs", type=float, default=None, help="fixed length instead of --minutes")
    ap.add_argument("--save", default=None, help="write the trained backbone's state_dict here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import yaml

    torch.set_num_threads(os.cpu_count() or 1)
    with open(DEMO) as f:
        pre = yaml.safe_load(f)["pretrain"]
    base = [f"{k}={json.dumps(v)}" for k, v in pre.items()]
    cfg = load_config(None, base + ["workers=1"] + args.overrides)
    data = splits(args.run)
    train = data["train"]["image"]
    torch.manual_seed(cfg.seed)
    obj = build_objective(cfg, train.shape[1]).to(memory_format=torch.channels_last)
    bs = cfg.batch_size
    g = torch.Generator().manual_seed(cfg.seed)

    def step_fn(opt, x, lr):
        views = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                 for k, v in obj.make_views(x, generator=g).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = obj(views)
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        obj.after_step()
        return float(out["loss"].detach())

    opt = build_optimizer(cfg.optimizer, obj, lr=cfg.scaled_lr, weight_decay=cfg.weight_decay)
    sps = args.steps_per_s
    if args.epochs:
        sps = args.epochs * (len(train) // bs) / (args.minutes * 60)
    if sps is None:  # measure the speed on 2 + 5 steps at a tiny learning rate
        for i in range(7):
            if i == 2:
                t = time.perf_counter()
            step_fn(opt, train[torch.randint(len(train), (bs,), generator=g)], 1e-6)
        sps = 5 / (time.perf_counter() - t)
    total = max(10, int(args.minutes * 60 * sps))
    spe = len(train) // bs
    lrs = lr_schedule(cfg.scaled_lr, total, int(cfg.warmup_epochs * spe), cfg.min_lr_ratio)
    t0 = time.perf_counter()
    perm, pos, losses = torch.randperm(len(train), generator=g), 0, []
    for s in range(total):
        if pos + bs > len(train):
            perm, pos = torch.randperm(len(train), generator=g), 0
        obj.set_progress(s, total)
        losses.append(step_fn(opt, train[perm[pos:pos + bs]], lrs[s]))
        pos += bs
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"non-finite loss at step {s}")
    train_s = time.perf_counter() - t0
    if args.save:
        torch.save(obj.backbone.state_dict(), args.save)
    t1 = time.perf_counter()
    f = {s: features(obj.backbone, obj.preprocess, data[s]["image"]) for s in ("train", "val", "test")}
    y = {s: data[s]["label"] for s in f}
    probe = linear_probe((f["train"], y["train"], None), (f["val"], y["val"], None),
                         (f["test"], y["test"], None), 10)
    knn_val = knn_accuracy(f["train"], y["train"], f["val"], y["val"], 10)
    knn_test = knn_accuracy(f["train"], y["train"], f["test"], y["test"], 10)
    row = {"overrides": args.overrides, "steps": total, "epochs": round(total / spe, 2),
           "train_min": round(train_s / 60, 2), "pairs_per_s": round(total * bs / train_s, 1),
           "loss_first_last": [round(sum(losses[:10]) / 10, 3), round(sum(losses[-10:]) / 10, 3)],
           "probe_val": round(100 * max(probe["val_scores"].values()), 2),
           "probe_test": round(100 * probe["top1"], 2), "wd": probe["weight_decay"],
           "knn_val": round(100 * knn_val, 2), "knn_test": round(100 * knn_test, 2),
           "eval_s": round(time.perf_counter() - t1, 1)}
    print(json.dumps(row))
    with open(os.path.join(REPO, "bench", "recipe_proxy.jsonl"), "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
