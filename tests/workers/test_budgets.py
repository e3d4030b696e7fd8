"""Time budgets: the pretraining steps that fit (``workers.pretrain.budget``) and the evaluation
sized to its budget from measured costs (``workers.evaluate.budget``), on stated costs and on a real run."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from evalrun import ingest_folder, pretrain_by_hand
from imagegen import write_separable
from workers.config import ConfigError, load_config
from workers.evaluate.budget import Costs, Counts, estimate, plan
from workers.evaluate.config import EvalConfig, eval_config
from workers.evaluate.evaluation import Evaluation, evaluate
from workers.hardware import resolve_here
from workers.pretrain.budget import CHECKPOINT_S, EPOCH_TURNOVER_S, EXPORT_S, StepClock, epoch_ends, fit_steps

# ----------------------------------------------------------------------------- pretraining


def test_budget_and_steps_exclude_each_other():
    with pytest.raises(ConfigError, match="budget_minutes: give steps or budget_minutes"):
        load_config(None, ["budget_minutes=5", "steps=100"])
    assert load_config(None, ["budget_minutes=5"]).budget_minutes == 5


def test_epoch_ends_counts_the_last_step_too():
    assert epoch_ends(0, 10, 10) == 1 and epoch_ends(0, 25, 10) == 3 and epoch_ends(10, 30, 10) == 2
    assert epoch_ends(5, 9, 10) == 1 and epoch_ends(12, 12, 10) == 0


def test_fit_steps_takes_the_most_steps_that_fit():
    config = load_config(None, ["budget_minutes=2", "checkpoint_every=50", "knn_bank=1000", "knn_queries=1000"])
    p = fit_steps(config, spe=40, step=10, elapsed_s=15.0, step_s=0.5, embed_s=0.002, world=2)
    monitor = 0.002 * 2000 / 2  # each rank embeds half of bank + queries
    assert p["monitor_seconds"] == pytest.approx(monitor)

    def cost(total):  # what the loop will spend from step 10 to `total`
        return ((total - 10) * 0.5 + epoch_ends(10, total, 40) * (monitor + EPOCH_TURNOVER_S)
                + (total // 50 - 10 // 50) * CHECKPOINT_S)

    left = 120 - 15.0 - EXPORT_S
    assert cost(p["steps"]) <= left < cost(p["steps"] + 1)
    assert p["planned_seconds"] <= 120 and p["epochs"] == pytest.approx(p["steps"] / 40, abs=1e-3)
    # a budget spent before calibration ends: the steps already taken stand
    assert fit_steps(config, 40, 10, 200.0, 0.5, 0.002, 2)["steps"] == 10


def test_step_clock_decides_on_step_counts_and_takes_the_median():
    clock = StepClock(warmup=2, steps=3)
    assert [clock.tick(n) for n in range(1, 6)] == [False, False, False, False, True]
    clock.times = [0.0, 1.0, 2.0, 12.0]  # one slow step (an epoch end) does not move the median
    assert clock.step_seconds() == 1.0


# ----------------------------------------------------------------------------- evaluation planner

COSTS = Costs(embed_s={"native": 1e-3, "32": 1.3e-3}, dims={"2x2": 1536, "1x1": 256}, raw_dim=784,
              finetune_step_s=0.3, probe_eval_s=1.3e-9, knn_s=2e-11, load_s=1e-5)
COUNTS = Counts(train=54000, val=6000, test=10000, classes=10, protocols=("probe", "knn", "finetune"), networks=2,
                raw_pixels=True)
DEMO = EvalConfig(protocols=("probe", "knn", "finetune"), finetune_epochs=1, frozen_input_size=32, frozen_grid=2,
                  frozen_stages=2, probe_max_iter=50)


def test_estimate_counts_every_part_and_grows_with_the_work():
    est = estimate(COSTS, COUNTS, DEMO.model_dump())
    assert set(est) == {"loading", "features", "probe", "knn", "finetune", "total"}
    assert est["features"] == pytest.approx(2 * (54000 + 6000 + 10000) * 1.3e-3, rel=1e-3)
    assert est["finetune"] == pytest.approx(54000 // 128 * 0.3 + 10000 * 1e-3, rel=1e-3)
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=0.5)
    smaller = estimate(COSTS, COUNTS, DEMO.model_dump() | {"frozen_train_samples": 20000, "frozen_input_size": None})
    assert smaller["features"] < est["features"] and smaller["probe"] < est["probe"] and smaller["knn"] < est["knn"]


def test_plan_keeps_the_protocol_where_it_fits_and_gives_up_in_order():
    full = estimate(COSTS, COUNTS, DEMO.model_dump())["total"]
    roomy = plan(COSTS, COUNTS, DEMO, full / 60 + 1)
    assert roomy.settings == {} and roomy.fits and "configured protocol fits" in roomy.describe()
    # a little short: only the fine-tune shrinks
    p = plan(COSTS, COUNTS, DEMO, (full - 30) / 60)
    assert set(p.settings) == {"finetune_epochs"} and 0.25 <= p.settings["finetune_epochs"] < 1 and p.fits
    assert p.estimate_s["total"] <= (full - 30)
    # much shorter: the fine-tune at its floor, then what costs the probe fewest points (POINTS_LOST):
    # fewer iterations (0.1) and a train subset, not the global pool (3.2)
    tight = plan(COSTS, COUNTS, DEMO, full / 60 / 3)
    assert tight.settings["finetune_epochs"] == 0.25 and tight.settings["probe_max_iter"] == 25
    assert 5400 <= tight.settings["frozen_train_samples"] < 54000 and "frozen_grid" not in tight.settings
    assert tight.fits and [n.split()[0] for n in tight.notes] == ["fine-tuning", "probe:", "probe"]
    # ...while a grid on a subset fits; shorter still, the global pool goes too, and the fine-tune below its floor
    shorter = plan(COSTS, COUNTS, DEMO, full / 60 / 5)
    assert shorter.fits and shorter.settings["frozen_grid"] == 1 and shorter.settings["finetune_epochs"] < 0.25
    assert [n.split()[0] for n in shorter.notes].count("fine-tuning") == 1  # one note per setting
    # where one reduction is enough, only it is taken (no fine-tune, iterations at their floor, a train set
    # too small to subset: the native input size, not the global pool as well)
    few = Counts(train=1000, val=6000, test=10000, classes=10, protocols=("probe", "knn"), networks=2, raw_pixels=True)
    cfg = DEMO.model_copy(update={"probe_max_iter": 25})
    snug = estimate(COSTS, few, cfg.model_dump() | {"frozen_input_size": None})["total"]
    p = plan(COSTS, few, cfg, snug / 60)
    assert p.settings == {"frozen_input_size": None} and p.fits
    # impossible: the smallest plan, and it says so
    tiny = plan(COSTS, COUNTS, DEMO, 0.1)
    assert not tiny.fits and tiny.settings["finetune_epochs"] == 0.1 and tiny.settings["frozen_train_samples"] == 6000
    assert "does not fit" in tiny.describe()
    # ...keeping the grid (3.2 points), which would save less than 10 % of the over-budget time
    pooled = estimate(COSTS, COUNTS, DEMO.model_dump() | tiny.settings | {"frozen_grid": 1, "frozen_stages": 1})
    assert "frozen_grid" not in tiny.settings and tiny.estimate_s["total"] <= 1.1 * pooled["total"]


# ----------------------------------------------------------------------------- on a real run

@pytest.fixture(scope="module")
def run10(tmp_path_factory):
    """10 classes x 30 train images (separable), val and test; a briefly pretrained checkpoint."""
    root = tmp_path_factory.mktemp("budget")
    write_separable(root / "src", n_classes=10, per_class=30, size=8, splits=("train", "test"))
    run = str(root / "run")
    pretrain_by_hand(run, ingest_folder(str(root / "src"), run), steps=2)
    return run


def test_frozen_train_subset_is_balanced_contains_the_fewshot_subsets_and_is_cached_apart(run10, tmp_path):
    run = str(tmp_path / "r")
    shutil.copytree(run10, run)
    ev = Evaluation(run, eval_config(protocols=("probe", "knn", "fewshot"), baselines=("raw_pixels",),
                                     frozen_train_samples=120, finetune_epochs=1, probe_max_iter=20))
    labels = ev.split("train")["label"]
    sub = ev.frozen_train_index()
    assert len(sub) == 120 and torch.bincount(labels[sub]).tolist() == [12] * 10
    assert len(ev.features("pretrained", "train")) == 120 and len(ev.frozen_targets("train")[0]) == 120
    from workers.evaluate.protocols import fewshot_indices, run_fewshot

    for idx in fewshot_indices(ev).values():  # every few-label subset is inside the frozen one
        assert torch.equal(sub[ev.frozen_positions(idx)], idx)
    assert {r["protocol"] for r in run_fewshot(ev, "pretrained", "probe").rows} == {"fewshot_1pct", "fewshot_10pct"}
    cached = os.listdir(os.path.join(run, "eval", "features", ev.sources["pretrained"].key))
    assert "train-120.pt" in cached and "train.pt" not in cached


def test_budgeted_evaluation_records_its_plan_and_execution(run10, tmp_path):
    run = str(tmp_path / "r")
    shutil.copytree(run10, run)
    said = []
    cfg = eval_config(protocols=("probe", "knn", "finetune"), baselines=("raw_pixels", "random_init"),
                      finetune_epochs=3, probe_max_iter=20, budget_minutes=30)
    report = evaluate(run, cfg, log=said.append)
    assert any("evaluation planned at" in s for s in said)
    b = report["eval_budget"]
    assert b["budget_minutes"] == 30 and b["fits"] and b["settings"] == {}  # a tiny run fits in 30 minutes
    assert b["costs"]["embed_s"]["native"] > 0 and b["costs"]["finetune_step_s"] > 0 and b["costs"]["probe_eval_s"] > 0
    assert report["eval_config_hash"] == cfg.config_hash()  # reuse is keyed on what was asked
    assert report["execution"] == resolve_here("auto", "cpu").as_dict()
    with open(os.path.join(run, "report.md")) as f:
        md = f.read()
    assert "sized for a budget of 30 min" in md and f"networks run at {report['execution']['precision']}" in md
    # a budget too small for the asked protocol: the plan shortens the fine-tune, and the report says so
    shutil.rmtree(os.path.join(run, "eval"))
    tight = evaluate(run, eval_config(**(cfg.model_dump() | {"budget_minutes": 1e-6})), log=lambda *_: None)
    assert tight["eval_budget"]["settings"]["finetune_epochs"] < 3
    assert tight["eval_config"]["finetune_epochs"] == tight["eval_budget"]["settings"]["finetune_epochs"]
    # other settings: written beside, named by their hash; report.json keeps the first; report.md is the latest
    with open(os.path.join(run, f"report-{tight['eval_config_hash']}.json")) as f:
        assert json.load(f)["eval_budget"]["fits"] is False
    with open(os.path.join(run, "report.json")) as f:
        assert json.load(f)["eval_config_hash"] == report["eval_config_hash"] != tight["eval_config_hash"]
    with open(os.path.join(run, "report.md")) as f:
        md = f.read()
    assert f"[report-{tight['eval_config_hash']}.json]" in md and f"[report-{report['eval_config_hash']}.json]" in md
