"""The evaluation of a clip run: label propagation, cross-view alignment and the clip-level protocols,
unit by unit on hand-made features, then on a generated Moving Fashion-MNIST run end to end."""
from __future__ import annotations

import json
import os

import pytest
import torch

from workers.data.loader import frame_item
from workers.evaluate.correspondence import alignment, first_labels, j_score, propagate
from workers.evaluate.video import frame_index


def _moving_square(t: int = 6, size: int = 8, side: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (T, D, h, w) whose every cell has its own code, the codes moving one cell right per
    frame, wrapping around (what a perfect tracker sees), and masks (T, h, w) of a square moving with them."""
    codes = torch.randn(size * size, 16, generator=torch.Generator().manual_seed(0))
    feats, masks = [], torch.zeros(t, size, size, dtype=torch.uint8)
    grid = torch.arange(size * size).view(size, size)
    for k in range(t):
        idx = (grid // size) * size + (grid % size - k) % size   # the content at column x came from column x - k
        feats.append(codes[idx].permute(2, 0, 1))                                   # (D, h, w)
        masks[k, 2:2 + side, 1 + k:1 + k + side] = 1
    return torch.stack(feats), masks


def test_labels_propagate_along_the_features_and_score_j_one():
    feats, masks = _moving_square()
    first = first_labels(masks[0], 2, (8, 8))
    labels = propagate(feats, first, topk=1, temperature=0.05, context=2)
    assert labels.shape == (6, 2, 8, 8)
    assert j_score(labels, masks) == {1: 1.0}
    # features that do not move with the content lose the square: it stays where it started
    still = propagate(feats[:1].expand(6, -1, -1, -1), first, topk=1, context=2)
    assert j_score(still, masks)[1] < 0.5


def test_the_radius_keeps_labels_from_far_nodes():
    feats, masks = _moving_square(t=4)
    first = first_labels(masks[0], 2, (8, 8))
    near = propagate(feats, first, topk=1, radius=0.2)          # 1.6 cells: the one-cell moves are in reach
    assert all(bool((near[t].argmax(0) == 1)[masks[t] == 1].all()) for t in range(4))  # every square cell found
    # with a radius under one cell each node sees only itself: nothing moves
    frozen = propagate(feats, first, topk=1, radius=0.01)
    assert torch.equal(frozen[-1].argmax(0), first.argmax(0))


def test_first_labels_are_the_share_of_each_cell():
    mask = torch.zeros(4, 4, dtype=torch.uint8)
    mask[:2, :1] = 1
    lab = first_labels(mask, 2, (2, 2))
    assert lab.shape == (2, 2, 2)
    assert torch.allclose(lab[1], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.allclose(lab.sum(0), torch.ones(2, 2))


def test_alignment_finds_the_same_time_step():
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    acc, err = alignment(a, a + 0.01 * torch.randn(10, 8))
    assert (acc, err) == (1.0, 0.0)
    acc, err = alignment(a, a.flip(0))
    assert acc <= 0.1 and err > 0.3


def test_a_frame_is_labelled_with_the_item_it_shows_most():
    masks = torch.zeros(3, 4, 4, dtype=torch.uint8)
    masks[1, :1] = 1          # item 0: 4 pixels
    masks[1, 2:] = 2          # item 1: 8 pixels
    info = {"classes": [7, 3]}
    assert frame_item(info, masks, 1) == 3
    assert frame_item(info, masks, 0) == 7          # nothing visible: the first item
    assert frame_item({}, masks, 1) == -1
    assert frame_index(16, 4).tolist() == [0, 5, 10, 15] and frame_index(3, 4).tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    from evalrun import ingest_moving_clips, pretrain_by_hand

    run, manifest = ingest_moving_clips(tmp_path_factory.mktemp("videval"), train=16, test=6, frames=6, shard_size=8)
    pretrain_by_hand(run, manifest, steps=2, overrides=("image_size=16", "view.size=16", "batch_size=8"))
    return run


def test_a_clip_run_is_scored_per_frame_per_clip_by_propagation_and_alignment(clip_run):
    from workers.evaluate.config import VIDEO_PROTOCOLS, EvalConfig
    from workers.evaluate.evaluation import Evaluation, evaluate
    from workers.ingest.sources import FashionMNIST

    config = EvalConfig(protocols=("probe", "knn"), knn_k=3, probe_max_iter=10)
    report = evaluate(clip_run, config, log=lambda *a: None)
    cells = {(r["protocol"], r["features"]): r["value"] for r in report["results"]}
    for p in ("probe", "knn") + VIDEO_PROTOCOLS:
        for source in ("pretrained", "random_init", "raw_pixels"):
            assert 0.0 <= cells[p, source] <= 1.0, (p, source)
    # the frame-level protocols predict the item a frame shows, the clip-level ones the kind of motion
    assert report["frame_target"] == "item" and report["classes"] == list(FashionMNIST().classes)
    assert report["clip_classes"] == ["bounce", "slide"]
    ev = Evaluation(clip_run, config)
    test = ev.split("test")
    assert test["label"].tolist() == [frame_item(i, m, 3) for i, m in zip(test["info"], test["masks"])]
    assert test["clip_label"].tolist() == [["bounce", "slide"].index(i["motion"]) for i in test["info"]]
    details = report["details"]["label_propagation/pretrained"]
    # raw pixels propagate on the pretrained network's grid (4 × 4 thumbnails of each cell)
    assert details["objects"] >= 6 and report["details"]["label_propagation/raw_pixels"]["feature_map"] == \
        details["feature_map"]
    assert report["details"]["alignment/raw_pixels"]["chance"] == pytest.approx(1 / 6)
    md = open(os.path.join(clip_run, "report.md")).read()
    for row in ("frame, item class: linear probe, top-1", "clip: linear probe (bounce/slide), top-1",
                "clip: label propagation, J (mean IoU)", "clip: cross-view alignment, top-1"):
        assert f"| {row} |" in md
    assert set(json.load(open(os.path.join(clip_run, "eval", "video.json")))) >= {"alignment/pretrained"}


def test_propagation_and_alignment_without_masks_or_cameras_are_refused_with_the_reason(clip_run, tmp_path):
    """The same clips ingested without their masks and second camera."""
    import shutil

    from workers.evaluate.config import EvalConfig
    from workers.evaluate.evaluation import evaluate
    from workers.ingest.shards import IngestParams, ingest
    from workers.ingest.sources import open_source
    from workers.storage import RunLocation

    src = tmp_path / "videos"
    shutil.copytree(os.path.join(os.path.dirname(clip_run), "videos"), src,
                    ignore=shutil.ignore_patterns("*.masks.npz", "*.cam2.mkv"))
    run = str(tmp_path / "run")
    params = IngestParams(shard_size=8, val_fraction=0.25, clip_frames=6)
    ingest(RunLocation(run), open_source(str(src), params=params), params, progress_bar=False)
    for name in ("checkpoints", "config.yaml"):
        (shutil.copytree if name == "checkpoints" else shutil.copy)(os.path.join(clip_run, name), os.path.join(run, name))
    report = evaluate(run, EvalConfig(protocols=("knn",), knn_k=3, baselines=()), log=lambda *a: None)
    why = {r["protocol"]: r["reason"] for r in report["refused"]}
    assert "masks" in why["label_propagation"] and "second camera" in why["alignment"]
    assert {r["protocol"] for r in report["results"]} == {"knn", "clip_probe", "clip_knn"}
    assert report["frame_target"] == "item"  # masks gone, the clips still list their items


def test_a_colorization_backbone_on_the_l_channel_is_evaluated_on_its_rgb_clips(clip_run, tmp_path):
    """Colorization feeds its backbone the L channel of RGB frames: the checkpoint (a 1-channel
    backbone) loads on the 3-channel run it was trained on, and its dense maps propagate labels."""
    import shutil

    from workers.config import load_config
    from workers.data.manifest import read_manifest
    from workers.evaluate.config import EvalConfig
    from workers.evaluate.evaluation import evaluate
    from workers.model import build_objective
    from workers.pretrain.export import export_final
    from workers.storage import RunLocation

    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(clip_run, "shards"), os.path.join(run, "shards"))
    shutil.copy(os.path.join(clip_run, "manifest.json"), run)
    manifest = read_manifest(RunLocation(run))
    config = load_config(None, ["objective=colorization", "backbone=small_cnn", "backbone_params={width: 8}",
                                "image_size=16", "batch_size=8", "workers=1"])
    objective = build_objective(config, manifest["channels"]).eval()
    assert objective.backbone.in_channels == 1
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(config.to_yaml())
    export_final(RunLocation(run), config, manifest, objective, 1, 1, metrics_rows=[])
    report = evaluate(run, EvalConfig(protocols=("knn",), knn_k=3, baselines=("random_init",),
                                      video_protocols=("label_propagation",)), log=lambda *a: None)
    assert report["objective"] == "colorization"
    assert 0.0 <= report["details"]["label_propagation/pretrained"]["J"] <= 1.0
    assert {r["protocol"] for r in report["results"]} == {"knn", "label_propagation"}
