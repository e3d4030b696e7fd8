"""Every objective that learns from time, at one budget, scored side by side on Moving Fashion-MNIST.

For each clip objective (``configs/moving_fmnist_<objective>.yaml``): a copy of one ingested run's
shards, pretraining for ``--budget-minutes`` (the same wall-clock for each: the step count follows the
objective's cost), then the same evaluation (frame-level probe and kNN of the item shown, clip-level
probe of the motion kind, label propagation J, cross-view alignment) against random init and raw
pixels, which are the same for every objective (one architecture, one seed). Prints one table, with
each figure's difference to random init, and writes ``ROOT/summary.json``. Reruns reuse finished
objectives (gelato reuses a finished pretraining and its report).

    .venv/bin/gelato ingest moving-fashion-mnist --out runs/video-demo --clip-size 64   # or make video-demo
    .venv/bin/python bench/video_objectives.py --source runs/video-demo --root runs/video-bench \\
        [--budget-minutes 3] [--objectives arrow_of_time,tcn]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.objective_runs import train_and_score  # noqa: E402

# configs/pipeline_video_demo.yaml's evaluation: layer3 and layer4 pooled to 2 x 2 (cycle consistency and
# colorization tracking train layer3's dense map only)
EVAL = {"protocols": ["probe", "knn"], "baselines": ["raw_pixels", "random_init"], "knn_k": 20, "frozen_grid": 2,
        "frozen_stages": 2}
COLUMNS = [("probe", "frame probe (item)"), ("knn", "frame kNN (item)"), ("clip_probe", "clip probe (motion)"),
           ("label_propagation", "propagation J"), ("alignment", "alignment")]


def main() -> int:
    from ssl_models.objectives import OBJECTIVES

    clips = [n for n, c in OBJECTIVES.items() if c.modality == "clip"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="an ingested moving-fashion-mnist run (clip size 64)")
    ap.add_argument("--root", required=True, help="one run per objective is made under it")
    ap.add_argument("--budget-minutes", type=float, default=3.0)
    ap.add_argument("--objectives", default=",".join(clips))
    a = ap.parse_args()
    rows = {}
    for name in a.objectives.split(","):
        got = train_and_score(a.source, a.root, name, f"configs/moving_fmnist_{name}.yaml", a.budget_minutes, EVAL)
        if got is None:
            continue
        steps, pretrain_s, eval_s, report = got
        cells = {(r["protocol"], r["features"]): 100 * r["value"] for r in report["results"]
                 if r["metric"] in ("top1", "J")}  # not the probe's top-5
        rows[name] = {"steps": steps, "pretrain_s": pretrain_s, "eval_s": eval_s,
                      "cells": {f"{p}/{f}": round(v, 2) for (p, f), v in cells.items()}}
        print(f"{name}: {steps} steps; " + ", ".join(f"{p} {cells.get((p, 'pretrained'), float('nan')):.1f}"
                                                     for p, _ in COLUMNS), flush=True)
    os.makedirs(a.root, exist_ok=True)
    with open(os.path.join(a.root, "summary.json"), "w") as f:
        json.dump({"budget_minutes": a.budget_minutes, "eval": EVAL, "objectives": rows}, f, indent=1)
    print(table(rows))
    return 0


def table(rows: dict) -> str:
    """Markdown: one line per objective (its figure and the difference to random init), then the baselines."""
    head = "| objective | steps | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(COLUMNS)]
    # the baselines of an RGB backbone (colorization_tracking's random init takes the L channel: its own
    # difference is to that network)
    rgb = [r for n, r in rows.items() if n != "colorization_tracking"] or list(rows.values())
    any_row = rgb[0]["cells"] if rgb else {}
    for name, r in rows.items():
        c = r["cells"]
        vals = []
        for p, _ in COLUMNS:
            v, base = c.get(f"{p}/pretrained"), c.get(f"{p}/random_init")
            vals.append("–" if v is None else f"{v:.1f} ({v - base:+.1f})" if base is not None else f"{v:.1f}")
        lines.append(f"| {name} | {r['steps']} | " + " | ".join(vals) + " |")
    for source, label in (("random_init", "random init"), ("raw_pixels", "raw pixels")):
        lines.append(f"| *{label}* | – | " + " | ".join(
            "–" if any_row.get(f"{p}/{source}") is None else f"{any_row[f'{p}/{source}']:.1f}" for p, _ in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
