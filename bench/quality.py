"""Representation quality per method at an equal budget, gelato vs lightly, on Fashion-MNIST.

For each method (SimCLR, MoCo v2, BYOL, SwAV, and the denoising autoencoder as the predictive
objective, which lightly does not implement): gelato trains it as users do (``gelato pretrain``
with ``configs/fashion_mnist_<method>.yaml``, Ray Train, 2 workers, shard stream) for
``--steps`` steps of batch 256, and lightly trains its own implementation of the same method
(``bench/lightly_quality.py`` in ``bench/.venv-lightly``: its transforms, heads, losses, momentum
helpers) around the same backbone with the same hyper-parameters and the same number of steps.
Both backbones are then scored by the same code: linear probe (λ chosen on ``val``) and
weighted kNN (k=200, T=0.1) on the 10,000 test images, features in bf16 on the full 28 px
images. A supervised reference (the same architecture trained from scratch with labels, the
evaluation stage's ``train_classifier``) sees the same number of images, and with
``--supervised-seconds S`` also trains for about S seconds (as many images as its measured speed
fits). Every row carries its wall-clock. ``--methods ""`` runs the supervised rows alone.

    .venv/bin/python bench/quality.py [--steps 100] [--methods simclr,moco,byol,swav,denoising_autoencoder]

Needs an ingested Fashion-MNIST run (``make demo`` or ``gelato ingest fashion-mnist --out runs/demo``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import torch  # noqa: E402

from recipe_proxy import features, splits  # noqa: E402
from workers.config import load_config  # noqa: E402
from workers.evaluate.probe import linear_probe  # noqa: E402
from workers.knn import knn_accuracy  # noqa: E402
from workers.model import build_objective, load_backbone  # noqa: E402

LIGHTLY = {"simclr", "moco", "byol", "swav"}


def score(backbone, preprocess, data) -> dict:
    f = {s: features(backbone, preprocess, data[s]["image"]) for s in ("train", "val", "test")}
    y = {s: data[s]["label"] for s in f}
    p = linear_probe((f["train"], y["train"], None), (f["val"], y["val"], None), (f["test"], y["test"], None), 10)
    return {"probe_test": round(100 * p["top1"], 2), "probe_val": round(100 * max(p["val_scores"].values()), 2),
            "knn_test": round(100 * knn_accuracy(f["train"], y["train"], f["test"], y["test"], 10), 2)}


def tv_root(tmp: str) -> str:
    """torchvision's FashionMNIST layout (uncompressed idx files) for lightly's DataLoader."""
    from workers.ingest.sources import FashionMNIST

    src = FashionMNIST()
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for fn in os.listdir(src.root):
        if fn.endswith(".gz") and not os.path.exists(os.path.join(raw, fn[:-3])):
            with gzip.open(os.path.join(src.root, fn)) as f, open(os.path.join(raw, fn[:-3]), "wb") as g:
                g.write(f.read())
    return tmp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=os.path.join(REPO, "runs", "demo"), help="an ingested Fashion-MNIST run")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "quality"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", default="simclr,moco,byol,swav,denoising_autoencoder")
    ap.add_argument("--skip-lightly", action="store_true")
    ap.add_argument("--supervised-seconds", type=float, default=None,
                    help="also train the supervised reference for about this long (e.g. an SSL row's wall-clock)")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(os.cpu_count() or 1)
    if not a.skip_lightly:
        subprocess.run(["bash", os.path.join(REPO, "bench", "setup_lightly.sh")], check=True)
    data = splits(a.run)
    root = tv_root(os.path.join(a.out, "tv"))
    gelato_bin = os.path.join(REPO, ".venv", "bin", "gelato")
    rows = []
    for m in filter(None, a.methods.split(",")):
        cfg_path = os.path.join(REPO, "configs", f"fashion_mnist_{m}.yaml")
        over = [f"steps={a.steps}", "warmup_epochs=0.05", "knn_monitor=false", f"checkpoint_every={a.steps}"]
        cfg = load_config(cfg_path, over)
        run = os.path.join(a.out, m)
        os.makedirs(run, exist_ok=True)
        for name in ("manifest.json", "shards"):  # the ingested data, linked, not copied
            if not os.path.lexists(os.path.join(run, name)):
                os.symlink(os.path.abspath(os.path.join(a.run, name)), os.path.join(run, name))
        t0 = time.perf_counter()
        subprocess.run([gelato_bin, "pretrain", "--run", run, "--config", cfg_path, "--overwrite", "--no-progress"]
                       + over, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        bb, _ = load_backbone(os.path.join(run, "checkpoints", "final", "backbone.pt"))
        pre = build_objective(cfg, 1).preprocess
        rows.append({"method": m, "impl": "gelato", "steps": a.steps, "wall_s": round(wall, 1)} | score(bb, pre, data))
        print(json.dumps(rows[-1]), flush=True)
        if m in LIGHTLY and not a.skip_lightly:
            py = os.path.join(REPO, "bench", ".venv-lightly", "bin", "python")
            state = os.path.join(run, "lightly_backbone.pt")
            cmd = [py, os.path.join(REPO, "bench", "lightly_quality.py"), "--method", m, "--root", root,
                   "--steps", str(a.steps), "--optimizer", cfg.optimizer, "--lr", str(cfg.lr),
                   "--weight-decay", str(cfg.weight_decay), "--warmup-steps", str(max(1, a.steps // 20)),
                   "--bf16-channels-last", "--out", state]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
            if out.returncode:
                raise SystemExit(f"lightly {m} failed:\n{out.stderr[-3000:]}")
            wall = time.perf_counter() - t0
            bb.load_state_dict(torch.load(state, weights_only=True))
            rows.append({"method": m, "impl": "lightly", "steps": a.steps, "wall_s": round(wall, 1)} | score(bb, pre, data))
            print(json.dumps(rows[-1]), flush=True)
    # the supervised reference: the same architecture from scratch, first on as many images as one
    # SSL run saw, then (--supervised-seconds) on as many as its measured speed fits in that time
    from workers.evaluate.finetune import train_classifier

    cfg = load_config(os.path.join(REPO, "configs", "fashion_mnist_simclr.yaml"), [])
    n_train = len(data["train"]["image"])

    def supervised(n_images: int) -> tuple[dict, float, int]:
        torch.manual_seed(0)
        obj = build_objective(cfg, 1)
        epochs = max(1, round(n_images / n_train))       # whole passes over a random subset
        idx = torch.randperm(n_train)[:min(n_train, n_images // epochs)]
        t0 = time.perf_counter()
        model = train_classifier(obj.backbone, obj.preprocess, data["train"]["image"][idx],
                                 data["train"]["label"][idx], 10, image_size=28, epochs=epochs, head_lr=1e-2,
                                 backbone_lr=1e-2, weight_decay=1e-4, batch_size=cfg.batch_size, seed=0,
                                 device="cpu", precision="bf16")
        wall = time.perf_counter() - t0
        return score(model.backbone, obj.preprocess, data), wall, len(idx) * epochs

    n = a.steps * cfg.batch_size
    scores, wall, _ = supervised(n)
    rows.append({"method": "supervised", "impl": f"gelato train_classifier, labels, {n} images",
                 "steps": a.steps, "wall_s": round(wall, 1)} | scores)
    print(json.dumps(rows[-1]), flush=True)
    if a.supervised_seconds:
        n2 = int(n * a.supervised_seconds / wall)
        scores, wall2, seen = supervised(n2)
        rows.append({"method": "supervised", "impl": f"gelato train_classifier, labels, {seen} images "
                     f"(~{a.supervised_seconds:.0f} s asked)", "steps": seen // cfg.batch_size,
                     "wall_s": round(wall2, 1)} | scores)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}; {a.steps} steps of batch "
          f"{cfg.batch_size} ({a.steps * cfg.batch_size / 54000:.2f} epochs of the 54,000 train images), 28 px")
    print("| method | implementation | wall-clock (s) | probe top-1 test | probe val | kNN top-1 test |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['impl']} | {r['wall_s']} | {r['probe_test']} | {r['probe_val']} | {r['knn_test']} |")


if __name__ == "__main__":
    main()
