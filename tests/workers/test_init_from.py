"""``init_from``: starting weights from a gelato run, a gelato export or a torchvision state dict,
checked against torchvision's own ResNet; applied in the Ray Train workers; evaluated as a column."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torchvision

from ssl_models import backbones
from workers.config import ConfigError, load_config
from workers.init_weights import apply_init, read_init
from workers.model import build_objective


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def test_a_torchvision_state_dict_loads_strictly_and_computes_torchvisions_features(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    path = _save(tv.state_dict(), tmp_path / "resnet18.pth")
    ours = backbones.build("resnet18", in_channels=3, small_stem=False, width=64).eval()
    init = apply_init(path, ours)
    assert init.kind == "state_dict" and init.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert init.notes == ["classifier dropped (fc.weight, fc.bias)"]
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)  # the same network, to float rounding
    # as many training scripts save it: under "state_dict"
    wrapped = _save({"state_dict": tv.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    assert read_init(wrapped, backbones.build("resnet18", in_channels=3, small_stem=False, width=64)).state.keys() \
        == init.state.keys()


def test_a_three_channel_first_convolution_is_summed_for_grey_images(tmp_path):
    tv = torchvision.models.resnet18()
    path = _save(tv.state_dict(), tmp_path / "resnet18.pth")
    grey = backbones.build("resnet18", in_channels=1, small_stem=False, width=64)
    init = apply_init(path, grey)
    assert torch.allclose(grey.net.conv1.weight, tv.conv1.weight.sum(dim=1, keepdim=True))
    assert any("conv1.weight summed over its 3 input channels" in n for n in init.notes)


def test_mismatches_fail_naming_the_file_the_key_and_both_shapes(tmp_path):
    path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    small_stem = backbones.build("resnet18", in_channels=1, small_stem=True, width=64)
    with pytest.raises(ConfigError, match=r"resnet18.pth: conv1.weight is \(64, 3, 7, 7\) there and \(64, 1, 3, 3\)"):
        apply_init(path, small_stem)
    with pytest.raises(ConfigError, match=r"resnet18.pth: its weights are not this backbone's: \d+ missing \(e\.g\. layer1\.0\.bn3"):
        apply_init(path, backbones.build("resnet50", in_channels=3, small_stem=False, width=64))
    with pytest.raises(ConfigError, match="no such file"):
        apply_init(str(tmp_path / "nothing.pt"), small_stem)
    with pytest.raises(ConfigError, match="export the run with --format torchvision"):
        apply_init(str(tmp_path / "backbone.onnx"), small_stem)
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ConfigError, match="text.pt: not a torch state dict"):
        apply_init(str(tmp_path / "text.pt"), small_stem)


def test_a_gelato_backbone_must_be_the_same_architecture_and_momentum_copies_start_from_it(tmp_path):
    from evalrun import TINY

    config = load_config(None, [o for o in TINY if not o.startswith("view.")] + ["objective=byol"])
    torch.manual_seed(1)
    source = build_objective(config, 1)
    payload = {"backbone": source.backbone.state_dict(), "backbone_name": source.backbone.name,
               "backbone_params": dict(config.backbone_params), "in_channels": 1}
    path = _save(payload, tmp_path / "backbone.pt")
    torch.manual_seed(2)
    started = build_objective(config.model_copy(update={"init_from": path}), 1,
                              lambda b: apply_init(path, b))
    for (k, a), b in zip(started.backbone.state_dict().items(), source.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(started.target_backbone.parameters(), source.backbone.parameters()):  # BYOL's target too
        assert torch.equal(a, b)
    other = backbones.build("resnet18", in_channels=1, small_stem=True, width=8)
    with pytest.raises(ConfigError, match="a small_cnn backbone, and this run trains a resnet18; set backbone: small_cnn"):
        apply_init(path, other)


def test_init_from_is_made_absolute_and_changes_the_training_hash_only_when_set(tmp_path, monkeypatch):
    from evalrun import TINY

    monkeypatch.chdir(tmp_path)
    plain = load_config(None, TINY)
    started = load_config(None, TINY + ["init_from=runs/first"])
    assert started.init_from == os.path.join(str(tmp_path), "runs", "first")
    assert plain.training_hash() != started.training_hash()
    assert "init_from" not in json.dumps(plain.model_dump(mode="json", exclude_none=True))
    assert load_config(None, TINY + ["init_from=s3://bucket/run"]).init_from == "s3://bucket/run"


@pytest.mark.slow  # a private Ray instance and a Prefect server
def test_pretraining_starts_from_a_run_in_the_ray_workers_and_evaluation_shows_the_start(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    import gelato
    from evalrun import TINY, ingest_folder, pretrain_by_hand
    from imagegen import write_separable
    from workers.evaluate.report import table_markdown

    write_separable(tmp_path / "src", n_classes=3, per_class=12, size=8, splits=("train", "test"))
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    m = ingest_folder(str(tmp_path / "src"), first)
    pretrain_by_hand(first, m, steps=3)
    ingest_folder(str(tmp_path / "src"), second)
    # SGD at a vanishing learning rate: the trained weights stay those it started from
    over = TINY + [f"init_from={first}", "steps=1", "optimizer=sgd", "lr=1e-12", "weight_decay=0",
                   "knn_monitor=false", "loader_workers=0", "warmup_epochs=0"]
    with prefect_test_harness(server_startup_timeout=90):
        result = gelato.pretrain(second, None, overrides=over, progress=False)
        start = torch.load(os.path.join(first, "checkpoints/final/backbone.pt"), weights_only=True)
        end = torch.load(result.backbone, weights_only=True)
        for k, v in start["backbone"].items():
            if v.is_floating_point() and "running" not in k:
                assert torch.allclose(end["backbone"][k], v, atol=1e-6), k
        rows = [json.loads(x) for x in open(os.path.join(second, "metrics.jsonl"))]
        event = next(r for r in rows if r.get("event") == "init_from")
        sha = hashlib.sha256(open(os.path.join(first, "checkpoints/final/backbone.pt"), "rb").read()).hexdigest()
        assert event["sha256"] == sha and event["kind"] == "gelato"
        report = gelato.evaluate(second, {"protocols": ["knn"], "baselines": ["random_init"], "knn_k": 5},
                                 progress=False)
    assert report.report["init_from"] == os.path.join(first)
    row = report.table[0]
    assert row["init_from"] is not None and row["random_init"] is not None
    # the pretrained network is the start, unchanged: the same kNN figure
    assert row["init_from"] == row["pretrained"]
    assert "start (init_from)" in table_markdown(report.table)
