"""What each of the evaluation budget's reductions costs in the headline, measured on one run.

``evaluate.budget_minutes`` (``workers/evaluate/budget.py``) gives up parts of the frozen protocol
when the configured one does not fit the machine: frozen features at the images' own size instead
of a larger input, fewer L-BFGS iterations, a class-balanced train subset for the probe and kNN,
the global pool instead of pooled grids. Which to give up first should follow what each costs in
the linear probe. For one finished run, this extracts the pretrained backbone's frozen features once
per view (the evaluation stage's own code and cache) and runs the stage's probe (λ chosen on val)
for every combination of the reductions, printing val and test top-1 and the probe's seconds:

    .venv/bin/python bench/eval_reductions.py --run runs/demo [--subsets 54000,27000,12000,6000]

Choices are read on the val column; test is reported, not used.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from workers.evaluate.config import eval_config  # noqa: E402
from workers.evaluate.evaluation import Evaluation  # noqa: E402
from workers.evaluate.probe import linear_probe  # noqa: E402
from workers.evaluate.protocols import fewshot_subset  # noqa: E402
from workers.knn import knn_accuracy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=os.path.join(REPO, "runs", "demo"))
    ap.add_argument("--views", default="32:2x2,native:2x2,32:1x1,native:1x1", help="SIZE:GRIDxSTAGES, comma-separated")
    ap.add_argument("--iters", default="50,25")
    ap.add_argument("--subsets", default="all,27000,12000,6000")
    ap.add_argument("--source", default="pretrained", choices=["pretrained", "random_init"])
    a = ap.parse_args()
    rows = []
    for view in a.views.split(","):
        size, pool = view.split(":")
        grid, stages = (int(v) for v in pool.split("x"))
        ev = Evaluation(a.run, eval_config(frozen_input_size=None if size == "native" else int(size), frozen_grid=grid,
                                           frozen_stages=stages, baselines=["random_init"]))
        t0 = time.perf_counter()
        f = {s: ev.features(a.source, s) for s in ("train", "val", "test")}
        t_feat = time.perf_counter() - t0
        y = {s: ev.targets(s)[0] for s in ("train", "val", "test")}
        for subset, iters in itertools.product(a.subsets.split(","), (int(i) for i in a.iters.split(","))):
            idx = None if subset == "all" else fewshot_subset(y["train"], int(subset) / len(y["train"]), ev.config.seed)
            xtr, ytr = (f["train"], y["train"]) if idx is None else (f["train"][idx], y["train"][idx])
            t0 = time.perf_counter()
            p = linear_probe((xtr, ytr, None), (f["val"], y["val"], None), (f["test"], y["test"], None), ev.n_classes,
                             max_iter=iters)
            t_probe = time.perf_counter() - t0
            knn = knn_accuracy(xtr, ytr, f["test"], y["test"], ev.n_classes)
            rows.append((size, pool, f["train"].shape[1], len(xtr), iters, 100 * max(p["val_scores"].values()),
                         100 * p["top1"], 100 * knn, t_feat, t_probe))
            print(rows[-1], flush=True)
    print(f"\nrun {a.run}, source {a.source}, checkpoint {ev.checkpoint.uri}\n")
    print("| input | pooling | dim | train samples | L-BFGS iters | probe val | probe test | kNN test | "
          "features, all splits (s) | probe (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} | {r[8]:.0f} | "
              f"{r[9]:.1f} |")


if __name__ == "__main__":
    main()
