"""Pretraining pieces without Ray: config validation, schedules, LARS, equal steps per rank, kNN."""
from __future__ import annotations

import math

import pytest
import torch

from imagegen import write_images
from workers.config import ConfigError, load_config
from workers.data.loader import epoch_batches, steps_per_epoch
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.knn import knn_accuracy, knn_predict
from workers.pretrain.optim import LARS, build_optimizer, lr_schedule, param_groups
from workers.storage import RunLocation


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("objective: simclr\nepochs: lots\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(str(bad))
    bad.write_text("objective: simclr\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="objective_params.tau"):
        load_config(None, ["objective_params.tau=0.1"])
    with pytest.raises(ConfigError, match=r"view\.zoom: unknown key; valid: \['blur_p', 'brightness'"):
        load_config(None, ["view.zoom=2"])
    with pytest.raises(ConfigError, match=r"view\.hue: Input should be less than or equal to 0\.5"):
        load_config(None, ["view.hue=0.9"])  # a typed value, checked on the driver
    with pytest.raises(ConfigError, match=r"objective: Input should be 'contrastive', .*'colorization'"):
        load_config(None, ["objective=simclrr"])
    no_space = r"small_stem:true: unknown parameter .* space after the colon: \{small_stem: true\}"
    with pytest.raises(ConfigError, match=no_space):
        load_config(None, ["backbone=resnet18", "backbone_params={small_stem:true}"])
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        load_config(None, ["precision=fp16"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    c = load_config(None, ["workers=4", "batch_size=512", "objective_params.temperature=0.2", "view.scale=[0.3,1.0]"])
    assert c.local_batch == 128 and c.scaled_lr == pytest.approx(0.3 * 2) and c.view.scale == (0.3, 1.0)
    assert c.model_dump(mode="json")["view"] == {"scale": [0.3, 1.0]}  # written as given


def test_training_hash_ignores_bookkeeping_only():
    a = load_config(None, [])
    assert a.training_hash() == load_config(None, ["log_every=7", "knn_monitor=false"]).training_hash()
    assert a.training_hash() != load_config(None, ["lr=0.1"]).training_hash()


def test_lr_schedule_warmup_then_cosine():
    s = lr_schedule(1.0, 100, 10, min_ratio=0.1)
    assert len(s) == 100 and s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(s[10:], s[11:])) and s[-1] == pytest.approx(0.1, abs=1e-3)
    t = 55
    assert s[t] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90)))


def test_lars_trust_ratio_and_exclusions():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    groups = param_groups(lin, weight_decay=0.0)
    assert [len(g["params"]) for g in groups] == [1, 1]  # weight decays, bias does not
    opt = LARS(groups, lr=1.0, momentum=0.0, eta=0.01)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
    opt.step()
    expected_w = w0 - 0.01 * w0.norm() / gw.norm() * gw  # trust-ratio scaled step
    assert torch.allclose(lin.weight, expected_w, atol=1e-6)
    assert torch.allclose(lin.bias, b0 - gb, atol=1e-6)  # excluded: plain SGD
    assert isinstance(build_optimizer("adamw", lin, 1e-3, 0.05), torch.optim.AdamW)


def test_equal_steps_on_every_rank_even_with_uneven_shards(tmp_path):
    # 3 classes x 9 images in shards of 4: 7 shards (6 full, 1 with 3), split unevenly over 2 ranks
    write_images(tmp_path / "src", n_classes=3, per_class=9, size=8)
    loc = RunLocation(str(tmp_path / "run"))
    m = ingest(loc, open_source(str(tmp_path / "src")), IngestParams(shard_size=4, val_fraction=0), progress_bar=False)
    spe = steps_per_epoch(m["splits"]["train"]["count"], 8)  # 27 // 8 = 3 steps, local batch 4 on 2 ranks
    counts = []
    for rank in range(2):
        batches = list(epoch_batches(loc, m, epoch=0, n_batches=spe, rank=rank, world_size=2, local_batch=4,
                                     loader_workers=0, seed=0))
        assert all(b["image"].shape == (4, 1, 8, 8) and b["image"].dtype == torch.uint8 for b in batches)
        counts.append(len(batches))
        # the same epoch reproduces the same batches; resuming skips exactly what was seen
        again = list(epoch_batches(loc, m, epoch=0, n_batches=spe, rank=rank, world_size=2, local_batch=4,
                                   loader_workers=0, seed=0, skip=1))
        assert len(again) == spe - 1 and torch.equal(again[0]["image"], batches[1]["image"])
    assert counts == [spe, spe]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        steps_per_epoch(27, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_for_a_gpu_come_in_pinned_memory(tmp_path):
    write_images(tmp_path / "src", n_classes=2, per_class=8, size=8)
    loc = RunLocation(str(tmp_path / "run"))
    m = ingest(loc, open_source(str(tmp_path / "src")), IngestParams(shard_size=4, val_fraction=0), progress_bar=False)
    kw = dict(n_batches=2, rank=0, world_size=1, local_batch=4, loader_workers=1, seed=0)
    assert all(b["image"].is_pinned() for b in epoch_batches(loc, m, 0, pin_memory=True, **kw))
    assert not any(b["image"].is_pinned() for b in epoch_batches(loc, m, 0, **kw))


def test_knn_on_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 5
    bank_y = torch.arange(3).repeat(50)
    bank = centers[bank_y] + torch.randn(150, 16)
    q_y = torch.arange(3).repeat(10)
    q = centers[q_y] + torch.randn(30, 16)
    assert knn_accuracy(bank, bank_y, q, q_y, 3, k=10) == 1.0
    scores = knn_predict(bank[:2], bank_y[:2], bank[:1], 3, k=5)  # k larger than the bank is clipped
    assert scores.shape == (1, 3) and scores[0, 0] > 0


def test_loader_fits_mixed_sizes_to_image_size():
    from workers.data.loader import Collate

    batch = Collate(16)([{"image": torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8), "label": 1, "key": "a"},
                         {"image": torch.randint(0, 255, (3, 20, 16), dtype=torch.uint8), "label": 2, "key": "b"}])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.uint8
    with pytest.raises(ValueError, match="differ in size"):
        Collate(None)([{"image": torch.zeros(1, 8, 8, dtype=torch.uint8), "label": 0, "key": "a"},
                       {"image": torch.zeros(1, 9, 9, dtype=torch.uint8), "label": 0, "key": "b"}])


def test_colorization_backbone_takes_the_l_channel():
    from workers.model import build_objective

    cfg = load_config(None, ["objective=colorization", "backbone=small_cnn", "backbone_params={width: 8}",
                             "image_size=16"])
    obj = build_objective(cfg, in_channels=3)
    assert obj.backbone.in_channels == 1
    out = obj(obj.make_views(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)))
    assert torch.isfinite(out["loss"])


def test_a_fixed_size_backbone_gets_image_size_and_exports_what_was_built(tmp_path):
    """A ViT (its builder takes image_size) is built for the config's image_size; backbone.pt records
    the arguments it was built with, so load_backbone rebuilds it; a ResNet gets no image_size."""
    from workers.model import build_objective, fixed_input_size, load_backbone
    from workers.pretrain.export import export_final

    assert fixed_input_size("vit_tiny") and not fixed_input_size("resnet18")
    cfg = load_config(None, ["objective=simclr", "backbone=vit_tiny", "backbone_params={patch_size: 4}",
                             "image_size=16"])
    obj = build_objective(cfg, in_channels=1)
    assert obj.backbone.image_size == 16
    export_final(RunLocation(str(tmp_path)), cfg, {"channels": 1}, obj, 0, 0)
    model, payload = load_backbone(str(tmp_path / "checkpoints/final/backbone.pt"))
    assert payload["backbone_params"] == {"patch_size": 4, "image_size": 16}
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, obj.backbone.feature_dim)
    resnet = build_objective(load_config(None, ["backbone=resnet18"]), in_channels=1)
    assert "image_size" not in resnet.backbone.build_args


@pytest.mark.parametrize("where", ["local", "s3"])
def test_metrics_tail_feeds_the_progress_bar_new_lines_only(where, tmp_path, request):
    """The driver's progress bar tails metrics.jsonl (local or S3): lines already there are skipped,
    half-written lines wait, and a file that shrinks (a resume drops lines) is read from the start."""
    from workers.pretrain.run_log import MetricsLog, MetricsTail

    uri = str(tmp_path / "run") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/run"
    loc = RunLocation(uri)
    log = MetricsLog(loc, 0)
    log.append({"step": 1, "loss": 3.0})
    tail = MetricsTail(loc)
    assert tail.read() == []                       # the old line is not shown again
    log.append({"step": 2, "loss": 2.5})
    log.append({"step": 3, "loss": 2.0})
    assert [r["step"] for r in tail.read()] == [2, 3]
    assert tail.read() == []
    if where == "local":                           # a line still being written is not parsed yet
        with open(loc.join("metrics.jsonl"), "a") as f:
            f.write('{"step": 4, "lo')
        assert tail.read() == []
        with open(loc.join("metrics.jsonl"), "a") as f:
            f.write('ss": 1.5}\n')
        assert [r["step"] for r in tail.read()] == [4]
    MetricsLog(loc, 1)                             # a resume from step 1 drops the later lines
    assert [r["step"] for r in tail.read()] == [1]


def test_pretrain_figure_draws_what_the_metrics_hold_and_a_broken_one_costs_nothing(tmp_path, capsys):
    from workers.plots import PNG_SIGNATURE, pretrain_figure
    from workers.pretrain.export import write_pretrain_plot
    from workers.model import PRETRAIN_PLOT

    rows = [{"event": "first_step", "step": 1, "time": 0.0}]
    rows += [{"step": s, "epoch": s / 4, "loss": 5.0 - 0.1 * s, "lr": 0.01 * s, "momentum": 0.99 + 0.001 * s,
              "samples_per_s": 200.0 + s, "time": float(s)} for s in (2, 4, 6)]
    rows += [{"event": "resumed", "step": 4, "from": "x"}, {"step": 8, "epoch": 2.0, "loss": 4.1, "lr": 0.08,
                                                             "samples_per_s": 190.0, "knn_top1": 0.7, "time": 8.0}]
    png = pretrain_figure(rows, "simclr / resnet18")
    assert png is not None and png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert pretrain_figure([{"event": "first_step", "step": 1}], "no steps logged") is None

    cfg = load_config(None, [])
    loc = RunLocation(str(tmp_path / "run"))
    assert write_pretrain_plot(loc, cfg, rows) == PRETRAIN_PLOT
    assert (tmp_path / "run" / PRETRAIN_PLOT).read_bytes().startswith(PNG_SIGNATURE)
    # a row it cannot draw (no learning rate): reported, and the run goes on to write its summary
    assert write_pretrain_plot(loc, cfg, [{"step": 1, "loss": 1.0}]) is None
    assert f"could not draw {PRETRAIN_PLOT}: KeyError" in capsys.readouterr().err


def test_overwrite_leaves_nothing_of_the_old_training(tmp_path):
    from workers.model import PRETRAIN_PLOT
    from workers.pretrain.run_dir import prepare_run

    write_images(tmp_path / "src", n_classes=2, per_class=6, size=8)
    loc = RunLocation(str(tmp_path / "run"))
    ingest(loc, open_source(str(tmp_path / "src")), IngestParams(shard_size=6, val_fraction=0), progress_bar=False)
    for rel in ("metrics.jsonl", PRETRAIN_PLOT, "checkpoints/checkpoint_x/state.pt"):
        loc.write_atomic(rel, b"old")
    prepare_run(loc, load_config(None, []), overwrite=True)
    assert not any((tmp_path / "run" / rel).exists() for rel in ("metrics.jsonl", PRETRAIN_PLOT, "checkpoints"))
    assert (tmp_path / "run" / "manifest.json").exists()  # the shards stay
