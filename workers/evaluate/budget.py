"""Evaluation for a time budget: what the protocols cost on this machine, and what fits.

``evaluate.budget_minutes`` sizes the evaluation to the machine it meets. :func:`measure_costs`
times the pieces the protocols are made of, on this machine and device, with the checkpoint's
architecture and the resolved precision (a few seconds):

* embedding one image with the frozen backbone, at each candidate input size;
* one fine-tuning step (forward, backward, AdamW) at the fine-tuning batch size;
* one loss-and-gradient evaluation of the linear probe, per (sample × feature dimension);
* the kNN protocol's similarity search, per (query × bank sample × dimension).

:func:`estimate` turns those into seconds per part of the evaluation for given settings, and
:func:`plan` keeps the configured protocol where it fits and otherwise gives up what costs the
least in the table's headline (the pretrained linear probe):

1. fine-tuning length, down to ``FINETUNE_FLOOR`` epochs (the fine-tune row, not the probe);
2. of the frozen protocol, the combination that fits and loses the fewest probe points, by the
   points each reduction cost on the demo's backbone (``POINTS_LOST``, bench/eval_reductions.py):
   fewer L-BFGS iterations (down to ``PROBE_ITER_FLOOR``: 0.1 point), frozen features at the
   images' own size instead of a larger ``frozen_input_size`` (0.4), a class-balanced subset of
   train for the probe and kNN, down to 10 % of it (0.9 per halving; it always contains the
   few-label subsets), the global pool instead of pooled grids of the last stages (3.2). A grid on
   6,000 samples (val 89.5) beats the global pool on all 54,000 (88.8), so the pool goes last;
3. fine-tuning down to ``FINETUNE_MIN`` epochs, where every frozen reduction is not enough (and
   then the frozen choice is made again with the time that freed). If still nothing fits, the
   plan runs over budget: of the options within ``NO_FIT_SLACK`` (10 %) of the fastest, the one
   that loses the fewest points.

The points were measured on two backbones of the demo's recipe, the full one (1,365 steps) and one
of 116 steps (what the budget fits on an AVX2-only CPU), with the same ranking on both.

Where nothing fits, the plan says how long it is expected to take. The plan (settings, measured
costs, estimated seconds per part) goes into ``report.json`` and ``report.md``; the settings it
changed are ordinary evaluation settings, so the same figures can be asked for explicitly on
another machine.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

LBFGS_EVALS_PER_ITER = 1.25   # torch's LBFGS allows max_iter * 5/4 evaluations; the demo's fits use ~1.3
FINETUNE_FLOOR = 0.25
FINETUNE_MIN = 0.1
PROBE_ITER_FLOOR = 25
FROZEN_TRAIN_FLOOR = 0.10     # of train; the 10 % few-label subset lies inside it
QUANTUM = 0.05                # fine-tuning epochs are planned in steps of this
# What each frozen reduction cost the pretrained linear probe (val top-1, points) on the demo's
# backbone (bench/eval_reductions.py, bench/RESULTS.md): the plan gives up what costs the fewest.
POINTS_LOST = {"fewer_iterations": 0.1,   # 50 -> 25 L-BFGS iterations: within ±0.2 at every subset size
               "native_size": 0.4,        # 28 px instead of 32
               "global_pool": 3.2}        # 256-d global pool instead of layer3+layer4 at 2x2 (1536-d)
POINTS_LOST_PER_HALVING = 0.9             # of the frozen protocols' train samples (54k -> 3k: 1.2, 2.0, 2.5, 3.9)
# When nothing fits, the plan runs over its budget anyway: it then takes the fewest points lost among
# the options within this much of the fastest (on an AVX2-only CPU the global pool saved seconds of a
# 7-minute evaluation and cost 3 points).
NO_FIT_SLACK = 0.10


@dataclass
class Costs:
    """Seconds per unit of work, measured here."""

    embed_s: dict[str, float]             # per image, by frozen input size ("native" or "32", ...)
    dims: dict[str, int]                  # feature dimension, by pooling ("1x1", "2x2", ...)
    raw_dim: int                          # raw-pixel features' dimension
    finetune_step_s: float                # one fine-tuning step at the fine-tuning batch size
    probe_eval_s: float                   # one probe loss+gradient, per sample × dimension
    knn_s: float                          # kNN search, per query × bank sample × dimension
    load_s: float = 0.0                   # reading one sample from the shards into memory
    measured_in_s: float = 0.0


@dataclass
class Counts:
    """What the evaluation will process (the run's splits after ``limit``)."""

    train: int
    val: int
    test: int
    classes: int
    protocols: tuple[str, ...]
    networks: int                         # frozen networks (pretrained, random init, supervised)
    raw_pixels: bool
    supervised_epochs: float = 0.0


@dataclass
class Plan:
    budget_minutes: float
    settings: dict                         # evaluation settings the plan changed (empty: as configured)
    estimate_s: dict[str, float]           # seconds per part, and "total"
    fits: bool
    notes: list[str] = field(default_factory=list)
    costs: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in self.estimate_s.items() if k != "total" and v >= 3)
        head = (f"evaluation planned at {self.estimate_s['total'] / 60:.1f} min for a budget of "
                f"{self.budget_minutes:g} min" + (f" ({parts} min)" if parts else ""))
        if not self.settings:
            return head + "; the configured protocol fits"
        return head + "; " + "; ".join(self.notes) + ("" if self.fits else "; even this does not fit the budget")


def _timed(fn, repeats: int = 2) -> float:
    fn()  # warm-up: kernel selection, first-touch allocations
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def _embed_costs(module, preprocess, images, execution, device, sizes, pools) -> tuple[dict, dict]:
    from workers.evaluate.features import FeatureSource, FrozenView, at_size

    embed, dims = {}, {}
    module = copy.deepcopy(module).to(device).eval()
    for size in sizes:
        src = FeatureSource("probe-cost", "-", at_size(preprocess, size), module, view=FrozenView(size, *pools[0]))
        x = images.to(device)
        embed["native" if size is None else str(size)] = _timed(lambda: src.encode(x, execution)) / len(x)
        for grid, stages in pools:
            src.view = FrozenView(size, grid, stages)
            dims[f"{grid}x{stages}"] = int(src.encode(x[:2], execution).shape[1])
    return embed, dims


def _finetune_step(backbone, preprocess, images, execution, device, image_size: int, batch: int) -> float:
    from workers.evaluate.finetune import train_classifier

    marks: list[float] = []
    n = min(len(images), batch)
    labels = torch.zeros(len(images), dtype=torch.long)
    train_classifier(backbone, preprocess, images, labels, 2, image_size=image_size, epochs=1, head_lr=1e-3,
                     backbone_lr=1e-4, weight_decay=0.0, batch_size=n, seed=0, device=device, execution=execution,
                     steps=4, progress=lambda _: marks.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
    return gaps[0] * batch / n


def _probe_eval(dim: int, classes: int, n: int = 8192) -> float:
    x = torch.randn(n, dim)
    w, b, onehot = torch.zeros(dim, classes), torch.zeros(classes), torch.zeros(n, classes)
    onehot[:, 0] = 1

    def once():
        logp = torch.log_softmax(torch.addmm(b, x, w), dim=1)
        g = (logp.exp_() - onehot) / n
        return (g.T @ x).T.contiguous()

    return _timed(once) / (n * dim)


def _knn_cost(dim: int, classes: int, bank: int = 8192, queries: int = 512) -> float:
    from workers.knn import knn_predict

    b, q = torch.randn(bank, dim), torch.randn(queries, dim)
    labels = torch.randint(0, max(2, classes), (bank,))
    return _timed(lambda: knn_predict(b, labels, q, max(2, classes), k=200, temperature=0.1), 1) / (bank * queries * dim)


def measure_costs(objective, images: torch.Tensor, execution, device: str, image_size: int, config,
                  classes: int, load_s: float = 0.0) -> Costs:
    """Time the evaluation's units of work on this machine. ``objective``: backbone + preprocess of the
    checkpoint (or the same architecture); ``images``: uint8 (N, C, H, W), N ≥ the batch sizes;
    ``load_s``: seconds it took to read one of them from the shards."""
    t0 = time.perf_counter()
    sizes = [None] + ([config.frozen_input_size] if config.frozen_input_size not in (None, image_size) else [])
    pools = [(config.frozen_grid, config.frozen_stages)] + ([(1, 1)] if (config.frozen_grid, config.frozen_stages) != (1, 1)
                                                           else [])
    batch = images[:config.batch_size]
    embed, dims = _embed_costs(objective.backbone, objective.preprocess, batch, execution, device, sizes, pools)
    ft = _finetune_step(objective.backbone, objective.preprocess, images[:config.finetune_batch_size], execution,
                        device, image_size, config.finetune_batch_size)
    dim = max(dims.values())
    probe = _probe_eval(dim, max(2, classes))
    knn = _knn_cost(dim, classes)
    return Costs(embed, dims, int(images[0].numel()), ft, probe, knn, load_s, time.perf_counter() - t0)


def _fewshot_sizes(train: int, classes: int) -> list[int]:
    per = [max(1, round(f * train / max(1, classes))) for f in (0.01, 0.10)]
    return [p * max(1, classes) for p in per]


def estimate(costs: Costs, counts: Counts, s: dict) -> dict[str, float]:
    """Seconds per part of the evaluation with settings ``s`` (the evaluation config's fields)."""
    protocols = set(counts.protocols)
    frozen = protocols & {"probe", "knn", "fewshot"}
    size = "native" if s["frozen_input_size"] in (None, "native") else str(s["frozen_input_size"])
    dim = costs.dims[f"{s['frozen_grid']}x{s['frozen_stages']}"]
    n_train = min(s.get("frozen_train_samples") or counts.train, counts.train)
    splits = (n_train if frozen else 0) + (counts.val if protocols & {"probe", "fewshot"} else 0) + counts.test
    out = {"loading": costs.load_s * (counts.train + counts.val + counts.test),
           "features": counts.networks * splits * costs.embed_s.get(size, costs.embed_s["native"])}
    iters = s["probe_max_iter"] * LBFGS_EVALS_PER_ITER * len(s["probe_weight_decays"])
    dims = [dim] * counts.networks + ([costs.raw_dim] if counts.raw_pixels else [])
    out["probe"] = sum(iters * costs.probe_eval_s * n_train * d for d in dims) if "probe" in protocols else 0.0
    out["knn"] = sum(costs.knn_s * counts.test * n_train * d for d in dims) if "knn" in protocols else 0.0
    steps_per_epoch = max(1, counts.train // s["finetune_batch_size"])
    predict = counts.test * costs.embed_s["native"]
    out["finetune"] = (s["finetune_epochs"] * steps_per_epoch * costs.finetune_step_s + predict
                       if "finetune" in protocols else 0.0)
    if "fewshot" in protocols:
        few = _fewshot_sizes(counts.train, counts.classes)
        epochs = s.get("fewshot_epochs") or 4 * s["finetune_epochs"]
        out["fewshot"] = (sum(iters * costs.probe_eval_s * n * d for n in few for d in dims)
                          + sum(epochs * max(1, n // s["finetune_batch_size"]) * costs.finetune_step_s + predict
                                for n in few) * (2 if counts.supervised_epochs else 1))
    if counts.supervised_epochs:
        out["supervised"] = counts.supervised_epochs * steps_per_epoch * costs.finetune_step_s + predict
    out["total"] = sum(out.values())
    return out


def plan(costs: Costs, counts: Counts, config, budget_minutes: float) -> Plan:
    """The configured evaluation, or the least reduced one that fits ``budget_minutes`` (see the module)."""
    budget = budget_minutes * 60
    base = {k: getattr(config, k) for k in ("frozen_input_size", "frozen_grid", "frozen_stages", "probe_max_iter",
                                            "probe_weight_decays", "finetune_epochs", "finetune_batch_size",
                                            "fewshot_epochs", "frozen_train_samples")}
    s = dict(base)
    notes: list[str] = []
    fits = lambda t: estimate(costs, counts, t)["total"] <= budget  # noqa: E731

    def shrink_finetune(floor: float, frozen: Optional[dict] = None) -> None:
        """The fine-tune shortened until the plan fits, down to ``floor`` epochs (with the frozen
        settings ``frozen`` in place of the current ones, if given)."""
        t = s | (frozen or {})
        if fits(t) or "finetune" not in counts.protocols and "fewshot" not in counts.protocols:
            return
        top = s["finetune_epochs"]
        e = max(floor, math.floor(top / QUANTUM) * QUANTUM)
        while e > floor + 1e-9 and not fits(t | {"finetune_epochs": e}):
            e = round(e - QUANTUM, 4)
        if e < top:
            s["finetune_epochs"] = round(max(e, floor), 4)
            if s.get("fewshot_epochs"):
                s["fewshot_epochs"] = max(1, round(s["fewshot_epochs"] * s["finetune_epochs"] / top))
            notes[:] = [n for n in notes if not n.startswith("fine-tuning ")]
            notes.insert(0, f"fine-tuning {s['finetune_epochs']:g} epoch(s) instead of {base['finetune_epochs']:g}")

    def frozen_options() -> list[tuple[bool, float, float, dict]]:
        """Every combination of the frozen reductions, each with the largest train subset that fits:
        (does not fit, probe points lost, seconds, settings)."""
        sizes = [s["frozen_input_size"]] + ([None] if s["frozen_input_size"] is not None else [])
        top_it = s["probe_max_iter"]
        iters = sorted({top_it, *range(top_it, PROBE_ITER_FLOOR - 1, -5), min(top_it, PROBE_ITER_FLOOR)}, reverse=True)
        pool = (s["frozen_grid"], s["frozen_stages"])
        pools = [pool] + ([(1, 1)] if pool != (1, 1) else [])
        top_n = min(s.get("frozen_train_samples") or counts.train, counts.train)
        floor = min(top_n, max(1000, math.ceil(FROZEN_TRAIN_FLOOR * counts.train / 1000) * 1000))
        subset = bool(set(counts.protocols) & {"probe", "knn"})
        out = []
        for size, it, (grid, stages) in itertools.product(sizes, iters, pools):
            o = s | {"frozen_input_size": size, "probe_max_iter": it, "frozen_grid": grid, "frozen_stages": stages}
            n = top_n
            while subset and n > floor and not fits(o | {"frozen_train_samples": n}):
                n = max(floor, (n - 1) // 1000 * 1000)
            if n < top_n:
                o["frozen_train_samples"] = n
            lost = (POINTS_LOST["native_size"] * (size != s["frozen_input_size"])
                    + POINTS_LOST["fewer_iterations"] * (top_it - it) / max(1, top_it - PROBE_ITER_FLOOR)
                    + POINTS_LOST["global_pool"] * ((grid, stages) != pool)
                    + POINTS_LOST_PER_HALVING * math.log2(top_n / n))
            out.append((not fits(o), lost, estimate(costs, counts, o)["total"], o))
        return out

    def frozen_reductions() -> None:
        """The combination that fits and costs the probe the fewest points; if none fits, the fewest
        points among those within ``NO_FIT_SLACK`` of the fastest."""
        if fits(s):
            return
        options = frozen_options()
        fitting = [o for o in options if not o[0]]
        if not fitting:  # over budget whatever is given up: points are not traded for a few seconds
            fastest = min(o[2] for o in options)
            fitting = [o for o in options if o[2] <= fastest * (1 + NO_FIT_SLACK)]
        best = min(fitting, key=lambda o: (o[1], o[2]))[3]
        top = dict(s)
        s.update(best)
        if s["probe_max_iter"] != top["probe_max_iter"]:
            notes.append(f"probe: {s['probe_max_iter']} L-BFGS iterations per weight decay instead of {top['probe_max_iter']}")
        if s["frozen_input_size"] != top["frozen_input_size"]:
            notes.append(f"frozen features at the images' own size instead of {top['frozen_input_size']} px")
        if s.get("frozen_train_samples") != top.get("frozen_train_samples"):
            notes.append(f"probe and kNN on a class-balanced subset of {s['frozen_train_samples']:,} of the "
                         f"{counts.train:,} train samples")
        if (s["frozen_grid"], s["frozen_stages"]) != (top["frozen_grid"], top["frozen_stages"]):
            notes.append(f"frozen features from the global pool instead of {top['frozen_grid']}x{top['frozen_grid']} "
                         f"grids of the last {top['frozen_stages']} stages")

    shrink_finetune(min(FINETUNE_FLOOR, s["finetune_epochs"]))
    if not fits(s):
        fastest = min(frozen_options(), key=lambda o: o[2])[3]
        if not fits(fastest):  # every frozen reduction is not enough: the fine-tune goes to its minimum first
            shrink_finetune(min(FINETUNE_MIN, s["finetune_epochs"]), fastest)
    frozen_reductions()
    changed = {k: v for k, v in s.items() if v != base[k]}
    est = estimate(costs, counts, s)
    return Plan(budget_minutes, changed, est, est["total"] <= budget, notes, asdict(costs))
