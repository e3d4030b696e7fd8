"""Tiny runs for the evaluation tests: ingested shards, a briefly pretrained checkpoint and its metrics.

The checkpoint comes from a few SimCLR steps taken by hand (no Ray) and exported with
``workers.pretrain.export.export_final``; the steps' real losses and a real kNN figure go to
``metrics.jsonl`` through ``MetricsLog``, in the format the Ray loop writes.
"""
from __future__ import annotations

import torch

from workers.config import load_config
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.knn import extract_features, knn_accuracy
from workers.model import build_objective
from workers.pretrain.export import export_final
from workers.pretrain.run_log import MetricsLog
from workers.storage import RunLocation

TINY = ["backbone=small_cnn", "backbone_params={width: 8}", "image_size=8", "view.size=8", "batch_size=16",
        "workers=1", "seed=0"]


def ingest_folder(src: str, run: str, val_fraction: float = 0.2, shard_size: int = 40) -> dict:
    return ingest(RunLocation(run), open_source(src), IngestParams(shard_size=shard_size, val_fraction=val_fraction),
                  progress_bar=False)


def ingest_moving_clips(root, train: int, test: int, frames: int, shard_size: int) -> tuple[str, dict]:
    """Generated Moving Fashion-MNIST videos (32 px, ``frames`` frames) ingested through the video path
    under ``root``, a quarter of train held out as val. Returns (run, manifest)."""
    from workers.ingest.moving_fmnist import generate
    from workers.ingest.sources import FashionMNIST

    generate(str(root / "videos"), {"train": train, "test": test}, FashionMNIST(), frames=frames, size=32)
    run = str(root / "run")
    params = IngestParams(shard_size=shard_size, val_fraction=0.25, clip_frames=frames)
    manifest = ingest(RunLocation(run), open_source(str(root / "videos"), params=params), params, progress_bar=False)
    return run, manifest


def pretrain_by_hand(run: str, manifest: dict, steps: int = 4, overrides: tuple = (), write_config: bool = True,
                     base: tuple = tuple(TINY)):
    """A few steps (SimCLR on a tiny CNN, unless ``base`` and ``overrides`` say otherwise) on the run's train
    split; exports checkpoints/final/backbone.pt. Returns the config."""
    from workers.data.loader import in_memory_split

    loc = RunLocation(run)
    config = load_config(None, list(base) + list(overrides))
    torch.manual_seed(config.seed)
    objective = build_objective(config, manifest["channels"])
    opt = torch.optim.SGD(objective.parameters(), lr=0.05, momentum=0.9)
    images, labels = in_memory_split(loc, manifest, "train", image_size=config.image_size)
    gen = torch.Generator().manual_seed(0)
    log = MetricsLog(loc, 0)
    spe = max(1, len(images) // config.batch_size)
    for step in range(1, steps + 1):
        idx = torch.randperm(len(images), generator=gen)[:config.batch_size]
        loss = objective(objective.make_views(images[idx], generator=gen))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"step": step, "epoch": step / spe, "loss": loss.item(), "lr": 0.05}
        if step % 2 == 0 and manifest.get("classes") and not manifest.get("multilabel") and "val" in manifest["splits"]:
            objective.eval()
            fn = lambda x: objective.backbone(objective.preprocess(x))  # noqa: E731
            vx, vy = in_memory_split(loc, manifest, "val", image_size=config.image_size)
            row["knn_top1"] = knn_accuracy(extract_features(fn, images), labels, extract_features(fn, vx), vy,
                                           len(manifest["classes"]), k=5)
            objective.train()
        log.append(row)
    if write_config:
        with loc.fs().open(loc.join("config.yaml"), "w") as f:
            f.write(config.to_yaml())
    export_final(loc, config, manifest, objective.eval(), steps, steps, metrics_rows=log.rows())
    return config
