"""Which frozen features to probe: global pool vs feature maps pooled to a grid, side by side.

For one checkpoint (default: the demo's) and the random-init baseline, extracts frozen features
once per view (``workers.evaluate.features.FrozenView``: input size, grid, stages) through the evaluation
stage's own code, then runs the stage's linear probe (λ chosen on ``val``, reported on ``test``)
and kNN (k=200, T=0.1) on each, and prints one table. Run it on a finished run:

    .venv/bin/python bench/frozen_features.py --run runs/demo [--views 1x1,2x1,2x2] [--size 32]

``GxS`` = the last S stages each pooled to G×G (``evaluate.frozen_grid``, ``evaluate.frozen_stages``).
The choice for the demo is made on the val column; the test column is reported, not used.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from workers.evaluate import features  # noqa: E402
from workers.evaluate.config import eval_config  # noqa: E402
from workers.evaluate.evaluation import Evaluation  # noqa: E402
from workers.evaluate.probe import linear_probe  # noqa: E402
from workers.evaluate.protocols import _Wrapped  # noqa: E402
from workers.knn import knn_accuracy  # noqa: E402

SUPERVISED = "eval/supervised/backbone.pt"


def supervised_source(ev: Evaluation) -> features.FeatureSource:
    """The supervised reference saved by an earlier evaluation, seen through this evaluation's view."""
    path = ev.loc.join(SUPERVISED)
    try:
        with ev.fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SystemExit(f"{path} not found: run an evaluation with evaluate.baselines including supervised first")
    # As run_supervised rebuilt it: a fresh copy of the architecture (the random_init source stays untouched).
    objective = _Wrapped(features.random_init(ev.checkpoint.config, ev.manifest["channels"], ev.config.seed, ev.device))
    objective.backbone.load_state_dict(torch.load(io.BytesIO(data), weights_only=True)["backbone"])
    return features.trained("supervised", objective, hashlib.sha256(data).hexdigest(), ev.device, ev.frozen_view)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=os.path.join(REPO, "runs", "demo"))
    ap.add_argument("--views", default="1x1,2x1,2x2", help="comma-separated GRIDxSTAGES")
    ap.add_argument("--size", type=int, default=32, help="frozen_input_size")
    ap.add_argument("--max-iter", type=int, default=100, help="probe_max_iter (L-BFGS iterations per λ)")
    ap.add_argument("--sources", default="pretrained,random_init",
                    help="pretrained, random_init, and supervised (the reference an earlier evaluation with "
                         "baselines=[supervised] saved to RUN/eval/supervised/backbone.pt)")
    a = ap.parse_args()
    rows = []
    for view in a.views.split(","):
        grid, stages = (int(v) for v in view.split("x"))
        # The evaluation stage's own objects: same preprocessing, bf16 extraction, feature cache.
        ev = Evaluation(a.run, eval_config(frozen_input_size=a.size, frozen_grid=grid, frozen_stages=stages,
                                           baselines=["random_init"]))
        y = {s: ev.targets(s)[0] for s in ("train", "val", "test")}
        if "supervised" in a.sources.split(","):
            ev.sources["supervised"] = supervised_source(ev)
        for source in a.sources.split(","):
            t0 = time.perf_counter()
            f = {s: ev.features(source, s) for s in ("train", "val", "test")}
            t_feat = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = linear_probe(*((f[s], y[s], None) for s in ("train", "val", "test")), ev.n_classes, max_iter=a.max_iter)
            t_probe = time.perf_counter() - t0
            knn = knn_accuracy(f["train"], y["train"], f["test"], y["test"], ev.n_classes)
            rows.append((source, f"{grid}×{grid}, last {stages}", f["train"].shape[1],
                         100 * max(p["val_scores"].values()), 100 * p["top1"], 100 * knn,
                         p["weight_decay"], t_feat, t_probe))
            print(rows[-1], flush=True)
    print(f"\nrun {a.run}, frozen_input_size {a.size}, probe_max_iter {a.max_iter}, checkpoint {ev.checkpoint.uri}\n")
    print("| features | pooling | dim | probe val | probe test | kNN test | λ | features (s) | probe (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:g} | {r[7]:.0f} | {r[8]:.0f} |")


if __name__ == "__main__":
    main()
