"""The evaluation stage without Prefect: metrics against references, protocols on tiny runs, the report."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from evalrun import ingest_folder, pretrain_by_hand
from imagegen import write_images, write_separable
from workers.config import ConfigError, load_config
from workers.data.manifest import read_manifest
from workers.evaluate.checkpoint import CheckpointMismatch
from workers.evaluate.config import eval_config
from workers.evaluate.evaluation import Evaluation, evaluate, fewshot_subset
from workers.evaluate.metrics import (average_precision, confusion_matrix, multilabel_ap, per_class_accuracy,
                                      topk_accuracy, voc07_average_precision)
from workers.evaluate.probe import linear_probe
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.model import build_objective
from workers.plots import PNG_SIGNATURE
from workers.pretrain.export import export_final
from workers.storage import RunLocation

ROW_KEYS = {"protocol", "features", "metric", "split", "value"}
PROTOCOL_NAMES = {"probe", "knn", "finetune", "fewshot_1pct", "fewshot_10pct"}
FEATURE_NAMES = {"pretrained", "random_init", "raw_pixels", "supervised"}
QUICK = dict(knn_k=10, finetune_epochs=2, fewshot_epochs=2, supervised_epochs=2, probe_max_iter=50)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: thread hand-offs cost more than the arithmetic on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory):
    """6 classes separable in pixel space, 8 px grey; train/val/test; a checkpoint after 4 SimCLR steps."""
    root = tmp_path_factory.mktemp("eval-labelled")
    write_separable(root / "src", n_classes=6, per_class=15, size=8, splits=("train", "test"))
    run = str(root / "run")
    m = ingest_folder(str(root / "src"), run)
    pretrain_by_hand(run, m, steps=4)
    return run


def _copy(run: str, tmp_path) -> str:
    dst = str(tmp_path / "run-copy")
    shutil.copytree(run, dst)
    shutil.rmtree(os.path.join(dst, "eval"), ignore_errors=True)
    return dst


# ----------------------------------------------------------------------------- metrics

def test_average_precision_hand_computed():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    target = torch.tensor([1, 0, 1, 0, 1])
    # positives at ranks 1, 3, 5: precision 1, 2/3, 3/5, each at a recall step of 1/3
    assert average_precision(scores, target) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # 11-point: max precision at recall ≥ t is 1 for t ≤ 0.3, 2/3 for 0.4–0.6, 3/5 for 0.7–1.0
    assert voc07_average_precision(scores, target) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11)
    # ties form one threshold: both tied samples count together (precision 1/2 at recall 1)
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    # an ignored ("difficult") sample is as if absent; a class with no positive is NaN
    ignore = torch.tensor([False, True, False, False, False])
    assert average_precision(scores, target, ignore) == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert np.isnan(average_precision(scores, torch.zeros(5)))
    assert average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1, 1, 0])) == 1.0


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(5, 200, (1,), generator=g))
        target = (torch.rand(n, generator=g) < 0.3).long()
        target[0] = 1
        scores = torch.rand(n, generator=g)
        if trial % 2:  # coarse scores: many ties
            scores = (scores * 5).floor()
        ours = average_precision(scores, target)
        assert ours == pytest.approx(average_precision_score(target.numpy(), scores.numpy()), abs=1e-12)
    # mean AP over classes = sklearn's macro average (every class has a positive)
    scores, targets = torch.rand(50, 4, generator=g), (torch.rand(50, 4, generator=g) < 0.4).long()
    targets[0] = 1
    assert multilabel_ap(scores, targets)["mAP"] == pytest.approx(
        average_precision_score(targets.numpy(), scores.numpy(), average="macro"), abs=1e-12)


def test_topk_confusion_per_class():
    scores = torch.tensor([[3.0, 2, 1], [1, 3, 2], [3, 2, 1], [1, 2, 3]])
    labels = torch.tensor([0, 2, 1, 2])
    assert topk_accuracy(scores, labels, 1) == 0.5 and topk_accuracy(scores, labels, 2) == 1.0
    cm = confusion_matrix(scores.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert per_class_accuracy(cm) == [1.0, 0.0, 0.5]


def test_probe_one_vs_rest_on_separable_multilabel_features():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(120, 3, generator=g) < 0.5).float()
    x = torch.cat([y * 2 - 1 + 0.1 * torch.randn(120, 3, generator=g), torch.randn(120, 5, generator=g)], 1)
    split = lambda a, b: (x[a:b], y[a:b], None)  # noqa: E731
    fitted = []  # the progress bar's ticks: one per λ of the grid
    out = linear_probe(split(0, 60), split(60, 80), split(80, 120), 3, multilabel=True, progress=fitted.append)
    assert fitted == [1] * 5
    assert out["mAP"] == pytest.approx(1.0) and out["voc07_mAP"] == pytest.approx(1.0)
    assert len(out["per_class_ap"]) == 3 and out["weight_decay"] in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def test_warm_started_probe_path_reaches_the_cold_start_optimum():
    from workers.evaluate.probe import fit_linear, select_and_fit

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 12, generator=g) + torch.nn.functional.one_hot(y, 12).float() * 1.5
    tr, va = (x[:300], y[:300], None), (x[300:], y[300:], None)
    clf, std, wd, scores = select_and_fit(tr, va, 4, weight_decays=(1e-1, 1e-2, 1e-3), max_iter=500)
    assert list(scores) == [1e-3, 1e-2, 1e-1]                     # reported in increasing λ
    cold = fit_linear(std(x[:300]), y[:300], 4, wd, max_iter=500)  # the same λ from zero weights
    assert torch.allclose(clf.weight, cold.weight, atol=1e-3) and torch.allclose(clf.bias, cold.bias, atol=1e-3)


def test_fewshot_subsets_are_class_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    one, ten = fewshot_subset(labels, 0.01, seed=3), fewshot_subset(labels, 0.10, seed=3)
    assert torch.bincount(labels[one], minlength=10).tolist() == [1] * 10
    assert torch.bincount(labels[ten], minlength=10).tolist() == [10] * 10
    assert torch.equal(one, fewshot_subset(labels, 0.01, seed=3))          # identical across runs
    assert set(one.tolist()) <= set(ten.tolist())                           # 1 % inside 10 %
    assert not torch.equal(ten, fewshot_subset(labels, 0.10, seed=4))       # the seed matters


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="knn_k"):
        eval_config(knn_k=0)
    with pytest.raises(ConfigError, match="protocols"):
        eval_config(protocols=("probe", "linear"))
    with pytest.raises(ConfigError, match="unknown_key"):
        eval_config(unknown_key=1)


# ----------------------------------------------------------------------------- protocols on tiny runs

def test_raw_pixel_probe_and_knn_are_near_perfect_on_separable_classes(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    report = evaluate(run, eval_config(protocols=("probe", "knn"), baselines=("raw_pixels",), **QUICK), log=lambda *_: None)
    cells = {(r["protocol"], r["features"], r["metric"]): r["value"] for r in report["results"]}
    assert cells["probe", "raw_pixels", "top1"] >= 0.95
    assert cells["knn", "raw_pixels", "top1"] >= 0.95
    assert cells["probe", "raw_pixels", "top5"] == 1.0  # 6 classes: top-5 is reported
    probe = report["details"]["probe/raw_pixels"]
    assert len(probe["confusion"]) == 6 and sum(map(sum, probe["confusion"])) == report["splits"]["test"] == 90


def test_full_report_schema_and_plots(labelled_run, tmp_path):
    from PIL import Image
    import matplotlib.image

    run = _copy(labelled_run, tmp_path)
    report = evaluate(run, eval_config(baselines=("raw_pixels", "random_init", "supervised"), **QUICK),
                      log=lambda *_: None)
    with open(os.path.join(run, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["results"] == report["results"] and on_disk["config_hash"] and on_disk["checkpoint_sha256"]
    assert {"seed", "durations_s", "checkpoint", "eval_config_hash"} <= set(on_disk)
    for row in on_disk["results"]:
        assert ROW_KEYS <= set(row) and set(row) <= ROW_KEYS | {"via"}
        assert row["protocol"] in PROTOCOL_NAMES and row["features"] in FEATURE_NAMES
        assert row["metric"] in {"top1", "top5", "mAP"} and row["split"] == "test"
        assert isinstance(row["value"], float) and 0.0 <= row["value"] <= 1.0
        assert ("via" in row) == row["protocol"].startswith("fewshot")
    got = {(r["protocol"], r["features"]) for r in on_disk["results"]}
    for want in [("probe", f) for f in FEATURE_NAMES] + [("knn", f) for f in FEATURE_NAMES] + [
            ("finetune", "pretrained"), ("finetune", "supervised"), ("fewshot_1pct", "pretrained"),
            ("fewshot_10pct", "raw_pixels"), ("fewshot_10pct", "supervised")]:
        assert want in got, want
    with open(os.path.join(run, "report.md")) as f:
        md = f.read()
    assert "| protocol (test, %) | pretrained | random init | raw pixels | supervised |" in md
    assert "not run" in md  # e.g. fine-tune of raw pixels is not a thing, and says so
    assert set(on_disk["plots"]) == {"pretrain", "loss", "knn", "embedding", "confusion"}
    for rel in on_disk["plots"].values():
        assert f"]({rel})" in md
        path = os.path.join(run, rel)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        with Image.open(path) as im:
            im.verify()
        assert matplotlib.image.imread(path).ndim == 3
    for proto in ("probe", "knn", "finetune", "fewshot"):
        assert os.path.exists(os.path.join(run, "eval", f"{proto}.json"))


def test_features_are_cached_and_reused(labelled_run, tmp_path, monkeypatch):
    run = _copy(labelled_run, tmp_path)
    cfg = eval_config(protocols=("knn",), baselines=("raw_pixels",), **QUICK)
    ev = Evaluation(run, cfg)
    first = ev.features("pretrained", "test")
    key = ev.sources["pretrained"].key
    assert key == ev.checkpoint.sha256[:16] and ("pretrained", "test") in ev.computed
    path = os.path.join(run, "eval", "features", key, "test.pt")
    mtime = os.stat(path).st_mtime_ns

    import workers.evaluate.features

    def no_extraction(*a, **k):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(workers.evaluate.features, "extract_features", no_extraction)
    ev2 = Evaluation(run, cfg)
    assert torch.equal(ev2.features("pretrained", "test"), first) and ev2.computed == []
    assert os.stat(path).st_mtime_ns == mtime
    # a different limit means other samples: the cache entry is not used for them
    ev3 = Evaluation(run, eval_config(protocols=("knn",), limit=10, **QUICK))
    with pytest.raises(AssertionError, match="recomputed"):
        ev3.features("pretrained", "test")


def test_bf16_features_match_fp32_and_are_cached_apart(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    bf16 = Evaluation(run, eval_config(protocols=("knn",), precision="bf16", **QUICK))
    fp32 = Evaluation(run, eval_config(protocols=("knn",), precision="fp32", **QUICK))
    a, b = bf16.features("pretrained", "test"), fp32.features("pretrained", "test")
    # the second extraction was not served the first one's bf16 features from the cache
    assert ("pretrained", "test") in fp32.computed and a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.99, cos.min()


def test_frozen_input_size_resizes_for_every_network_and_is_cached_apart(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    native = Evaluation(run, eval_config(protocols=("knn",), precision="fp32", **QUICK))
    big = Evaluation(run, eval_config(protocols=("knn",), precision="fp32", frozen_input_size=16, **QUICK))
    assert native.frozen_input_size is None and big.frozen_input_size == 16                       # the run is at 8 px
    images = big.split("test")["image"][:4]
    assert big.sources["pretrained"].preprocess(images).shape[-2:] == (16, 16)
    assert big.sources["random_init"].preprocess(images).shape[-2:] == (16, 16)
    assert big.sources["raw_pixels"].preprocess(images).shape[-2:] == (8, 8)         # pixels stay native
    assert big.sources["pretrained"].key == native.sources["pretrained"].key + "-16px"
    a, b = native.features("pretrained", "test"), big.features("pretrained", "test")
    assert ("pretrained", "test") in big.computed and not torch.equal(a, b)
    # asking for the native size is the native evaluation (same cache entry)
    same = Evaluation(run, eval_config(protocols=("knn",), precision="fp32", frozen_input_size=8, **QUICK))
    assert same.frozen_input_size is None and same.sources["pretrained"].key == native.sources["pretrained"].key
    # the whole stage runs with it, and the report says which size the frozen features came from
    report = evaluate(run, eval_config(protocols=("knn", "finetune"), baselines=(), frozen_input_size=16, **QUICK),
                      log=lambda *a: None)
    assert sorted(r["protocol"] for r in report["results"]) == ["finetune", "knn"]
    assert "resized to 16 px" in open(os.path.join(run, "report.md")).read()


def test_frozen_grid_pools_the_last_stages_for_every_network_and_is_cached_apart(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    q = dict(protocols=("probe",), precision="fp32", frozen_input_size=16, **QUICK)
    native = Evaluation(run, eval_config(**q))
    grid = Evaluation(run, eval_config(frozen_grid=2, frozen_stages=2, **q))
    for src in ("pretrained", "random_init"):
        net = grid.sources[src].module
        a, b = native.features(src, "test"), grid.features(src, "test")
        channels = [m.shape[1] for m in net.feature_maps(torch.zeros(1, 1, 16, 16))]
        assert b.shape == (len(a), 4 * sum(channels))                   # two stages, 2×2 cells each
        # the last stage's four cells average to the global pool the default evaluation uses
        last = b[:, -4 * channels[-1]:].reshape(len(b), channels[-1], 4).mean(-1)
        torch.testing.assert_close(last, a, rtol=1e-4, atol=1e-5)
        assert grid.sources[src].key == native.sources[src].key + "-grid2x2"
    assert grid.sources["raw_pixels"].key == native.sources["raw_pixels"].key   # pixels are pixels
    report = evaluate(run, eval_config(frozen_grid=2, frozen_stages=2, baselines=(), **q), log=lambda *a: None)
    assert report["results"][0]["protocol"] == "probe"
    assert "2×2 grid" in open(os.path.join(run, "report.md")).read()


def test_ray_checkpoint_folder_gives_the_same_features(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    ev = Evaluation(run, eval_config(**QUICK))
    ckdir = os.path.join(run, "checkpoints", "checkpoint_000004")
    os.makedirs(ckdir)
    torch.save({"objective": ev.checkpoint.objective.state_dict(), "step": 4}, os.path.join(ckdir, "state.pt"))
    shutil.copy(os.path.join(run, "config.yaml"), ckdir)
    ev_ray = Evaluation(run, eval_config(checkpoint="checkpoints/checkpoint_000004", **QUICK))
    assert ev_ray.checkpoint.kind == "ray" and ev_ray.checkpoint.steps == 4
    assert torch.allclose(ev_ray.features("pretrained", "test"), ev.features("pretrained", "test"), atol=1e-6)


def test_checkpoint_with_wrong_channels_fails_naming_both(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    config = load_config(None, ["backbone=small_cnn", "backbone_params={width: 8}", "image_size=8", "view.size=8"])
    rgb = RunLocation(str(tmp_path / "rgb"))
    export_final(rgb, config, {"channels": 3}, build_objective(config, 3), 0, 0)
    with pytest.raises(CheckpointMismatch, match=r"3-channel images but run .* holds 1-channel images"):
        Evaluation(run, eval_config(checkpoint=str(tmp_path / "rgb/checkpoints/final/backbone.pt")))


def test_checkpoint_with_wrong_backbone_fails_naming_both(labelled_run, tmp_path):
    run = _copy(labelled_run, tmp_path)
    other = load_config(None, ["backbone=resnet18", "backbone_params={small_stem: true, width: 8}", "image_size=8",
                               "view.size=8"])
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(other.to_yaml())
    with pytest.raises(CheckpointMismatch, match=r"backbone small_cnn\(width=8\).*resnet18\(small_stem=True, width=8\)"):
        Evaluation(run, eval_config())


def test_missing_checkpoint_says_what_to_do(tmp_path):
    write_separable(tmp_path / "src", n_classes=2, per_class=5, size=8)
    run = str(tmp_path / "run")
    ingest_folder(str(tmp_path / "src"), run)
    with pytest.raises(FileNotFoundError, match="gelato pretrain --run"):
        Evaluation(run, eval_config())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        Evaluation(run, eval_config(checkpoint="nope.pt"))


def test_unlabelled_run_is_one_clear_error_before_any_work(tmp_path):
    write_images(tmp_path / "flat", per_class=20, size=8, flat=True)
    run = str(tmp_path / "run")
    m = ingest_folder(str(tmp_path / "flat"), run)
    assert "test" not in m["splits"]  # nothing held out of an unlabelled source
    pretrain_by_hand(run, m, steps=2)
    with pytest.raises(ConfigError, match="nothing to evaluate: probe needs labels but the source is unlabelled"):
        evaluate(run, eval_config(**QUICK), log=lambda *_: None)
    assert not os.path.exists(os.path.join(run, "report.json")) and not os.path.exists(os.path.join(run, "eval"))


def test_a_folder_without_test_split_gets_one_and_without_any_evaluation_fails_saying_what_to_do(tmp_path):
    write_separable(tmp_path / "src", n_classes=3, per_class=10, size=8)  # class folders, no train/ or test/
    run = str(tmp_path / "run")
    m = ingest_folder(str(tmp_path / "src"), run)  # test_fraction left at its default
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 22, "val": 5, "test": 3}  # test first
    assert m["params"]["test_fraction"] == 0.1
    pretrain_by_hand(run, m, steps=2)
    report = evaluate(run, eval_config(protocols=("probe", "knn"), **QUICK), log=lambda *_: None)
    assert report["refused"] == [] and {r["protocol"] for r in report["results"]} == {"probe", "knn"}
    # kNN's k (10) exceeds the bank's smallest class (22 train images over 3 classes): lowered, and said
    smallest = int(torch.bincount(torch.tensor([r.label for r in open_source(str(tmp_path / "src")).splits()["train"]]
                                               )).min())
    knn = report["details"]["knn/pretrained"]
    assert knn["k_asked"] == 10 and knn["k"] < 10 and knn["k"] <= smallest
    with open(os.path.join(run, "report.md")) as f:
        md = f.read()
    assert f"kNN (k={knn['k']}, T=0.1)" in md
    # the pretraining's own figure (drawn when it ended) is linked with the report's plots
    assert report["plots"]["pretrain"] == "plots/pretrain.png" and "](plots/pretrain.png)" in md
    # held out of nothing (--test-fraction 0): no protocol can run, and the evaluation says so instead of
    # writing a table of "not run" cells
    bare = str(tmp_path / "bare")
    ingest(RunLocation(bare), open_source(str(tmp_path / "src")), IngestParams(shard_size=40, val_fraction=0.2,
                                                                              test_fraction=0), progress_bar=False)
    pretrain_by_hand(bare, read_manifest(RunLocation(bare)), steps=2)
    with pytest.raises(ConfigError, match=r"nothing to evaluate: probe needs the split\(s\) test .*--test-fraction 0.1"):
        evaluate(bare, eval_config(protocols=("probe", "knn"), **QUICK), log=lambda *_: None)
    assert not os.path.exists(os.path.join(bare, "report.json"))


def _write_voc(root, n_per_combo: dict) -> None:
    """A tiny VOC 2007: each image adds the binary pattern of every class it holds (dog, cat, car)."""
    from PIL import Image

    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["dog", "cat", "car"]
    patterns = {n: rng.integers(0, 2, (8, 8, 3)) for n in names}
    combos = [[n for j, n in enumerate(names) if k >> j & 1] for k in range(1, 8)]
    i = 0
    for split, per_combo in n_per_combo.items():
        ids = []
        for objs in combos:
            for _ in range(per_combo):
                i += 1
                image_id = f"{i:06d}"
                arr = 30 + sum(70 * patterns[n] for n in objs) + rng.integers(0, 10, (8, 8, 3))
                Image.fromarray(arr.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.png", format="PNG")
                xml = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in objs)
                xml += "<object><name>bird</name><difficult>1</difficult></object>" if i % 5 == 0 else ""
                (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{xml}</annotation>")
                ids.append(image_id)
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_multilabel_probe_reports_map(tmp_path):
    _write_voc(tmp_path / "VOC2007", {"train": 4, "val": 2, "test": 2})
    # the VOC source names .jpg files; ours are PNG bytes under that name (decoders go by content)
    for p in (tmp_path / "VOC2007" / "JPEGImages").iterdir():
        p.rename(p.with_suffix(".jpg"))
    run = str(tmp_path / "run")
    m = ingest_folder(str(tmp_path / "VOC2007"), run, val_fraction=None)
    assert m["multilabel"] and m["channels"] == 3
    pretrain_by_hand(run, m, steps=2)
    report = evaluate(run, eval_config(protocols=("probe", "knn", "finetune", "fewshot"), baselines=("raw_pixels",),
                                       **QUICK), log=lambda *_: None)
    cells = {(r["protocol"], r["features"]): r for r in report["results"]}
    assert all(r["metric"] == "mAP" for r in report["results"])
    assert cells["probe", "raw_pixels"]["value"] >= 0.9
    assert {("probe", "pretrained"), ("knn", "pretrained"), ("finetune", "pretrained")} <= set(cells)
    probe = report["details"]["probe/raw_pixels"]
    assert probe["classes_scored"] == 3 and probe["per_class_ap"][m["classes"].index("bird")] is None
    assert 0.0 <= probe["voc07_mAP"] <= 1.0
    assert [x["protocol"] for x in report["refused"]] == ["fewshot"]
    with open(os.path.join(run, "report.md")) as f:
        assert "| linear probe, mAP |" in f.read()


@pytest.mark.slow
def test_evaluate_on_s3(s3_bucket, tmp_path):
    """Shards, checkpoint, feature cache, report and plots all through s3fs (moto_server on loopback)."""
    import s3fs

    write_separable(tmp_path / "src", n_classes=3, per_class=8, size=8, splits=("train", "test"))
    run = f"s3://{s3_bucket}/runs/tiny"
    m = ingest_folder(str(tmp_path / "src"), run)
    pretrain_by_hand(run, m, steps=2)
    report = evaluate(run, eval_config(protocols=("probe", "knn"), **QUICK), log=lambda *_: None)
    assert {(r["protocol"], r["features"]) for r in report["results"]} >= {("probe", "raw_pixels"), ("knn", "pretrained")}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    base = f"{s3_bucket}/runs/tiny"
    assert fs.exists(f"{base}/report.md") and json.loads(fs.cat(f"{base}/report.json"))["results"] == report["results"]
    assert fs.cat(f"{base}/plots/embedding.png")[:8] == PNG_SIGNATURE
    assert fs.exists(f"{base}/eval/features/{report['checkpoint_sha256'][:16]}/test.pt")
    ev = Evaluation(run, eval_config(protocols=("knn",)))
    ev.features("pretrained", "test")
    assert ev.computed == []  # read back from the S3 cache


def test_a_damaged_test_shard_is_named_or_skipped_and_counted_in_the_report(labelled_run, tmp_path):
    from workers.data.integrity import CorruptShard

    run = _copy(labelled_run, tmp_path)
    shard = os.path.join(run, "shards", "test-000000.tar")
    with open(shard, "r+b") as f:
        f.seek(1500)
        f.write(b"\x55" * 600)
    cfg = dict(protocols=("knn",), baselines=("raw_pixels",), **QUICK)
    with pytest.raises(CorruptShard, match="test-000000.tar is damaged.*--repair test-000000.tar"):
        evaluate(run, eval_config(**cfg), log=lambda *_: None)
    report = evaluate(run, eval_config(on_corrupt="skip", **cfg), log=lambda *_: None)
    assert report["skipped_shards"] == ["test-000000.tar"]
    assert report["splits"]["test"] == 90 - 40  # the shard's 40 samples are left out, the rest scored
    with open(os.path.join(run, "report.md")) as f:
        assert "1 damaged shard(s) skipped" in f.read()


def test_few_label_rows_via_probe_and_via_finetune_stay_apart_in_every_table():
    from workers.evaluate.report import results_table, table_markdown, table_text

    def row(protocol, features, value, via=None):
        return {"protocol": protocol, "features": features, "metric": "top1", "split": "test", "value": value} | (
            {"via": via} if via else {})

    report = {"multilabel": False, "classes": [str(i) for i in range(10)],
              "eval_config": {"knn_k": 200, "knn_t": 0.1},
              "results": [row("probe", "pretrained", 0.9), row("fewshot_1pct", "pretrained", 0.61, "probe"),
                          row("fewshot_1pct", "pretrained", 0.55, "finetune"),
                          row("fewshot_10pct", "pretrained", 0.81, "probe"),
                          row("fewshot_10pct", "pretrained", 0.77, "finetune")]}
    rows = {r["protocol"]: r["pretrained"] for r in results_table(report)}
    # before: the Prefect table artifact and `gelato run`'s table keyed rows by (protocol, metric), and
    # "via finetune" overwrote "via probe"
    assert rows["1 % labels: linear probe, top-1"] == 61.0 and rows["1 % labels: fine-tune, top-1"] == 55.0
    assert rows["10 % labels: linear probe, top-1"] == 81.0 and rows["10 % labels: fine-tune, top-1"] == 77.0
    md, text = table_markdown(results_table(report)), table_text(results_table(report))
    for shown in (md, text):
        assert "61.0" in shown and "55.0" in shown and "81.0" in shown and "77.0" in shown
