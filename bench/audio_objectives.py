"""Every objective that learns from sound, at one budget, scored side by side on spoken-digits.

For each audio objective (``configs/spoken_digits_<objective>.yaml``): a copy of one ingested run's
shards, pretraining for ``--budget-minutes`` (the same wall-clock for each: the step count follows the
objective's cost), then the same evaluation (linear probe and kNN of the word and of the voice)
against log-mel statistics and random init. Each objective has its own backbone (APC a log-mel GRU,
CPC a conv encoder with a GRU, wav2vec 2.0 one with a transformer, PASE the conv frames), so each
row's difference is to its own architecture's random init. Prints one table and writes
``ROOT/summary.json``. Reruns reuse finished objectives.

    .venv/bin/gelato ingest spoken-digits --out runs/digits
    .venv/bin/python bench/audio_objectives.py --source runs/digits --root runs/audio-bench \\
        [--budget-minutes 3] [--objectives apc,cpc_audio]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.objective_runs import train_and_score  # noqa: E402

EVAL = {"protocols": ["probe", "knn"], "baselines": ["raw_pixels", "random_init"], "knn_k": 20}
COLUMNS = [("probe", "word probe"), ("knn", "word kNN"), ("voice_probe", "voice probe"), ("voice_knn", "voice kNN")]


def main() -> int:
    from ssl_models.objectives import OBJECTIVES

    sound = [n for n, c in OBJECTIVES.items() if c.modality == "audio"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="an ingested spoken-digits run")
    ap.add_argument("--root", required=True, help="one run per objective is made under it")
    ap.add_argument("--budget-minutes", type=float, default=3.0)
    ap.add_argument("--objectives", default=",".join(sound))
    a = ap.parse_args()
    rows = {}
    for name in a.objectives.split(","):
        got = train_and_score(a.source, a.root, name, f"configs/spoken_digits_{name}.yaml", a.budget_minutes, EVAL)
        if got is None:
            continue
        steps, pretrain_s, eval_s, report = got
        cells = {(r["protocol"], r["features"]): 100 * r["value"] for r in report["results"] if r["metric"] == "top1"}
        rows[name] = {"backbone": report["backbone"], "steps": steps, "pretrain_s": pretrain_s, "eval_s": eval_s,
                      "cells": {f"{p}/{f}": round(v, 2) for (p, f), v in cells.items()}}
        print(f"{name}: {steps} steps; " + ", ".join(f"{p} {cells.get((p, 'pretrained'), float('nan')):.1f}"
                                                     for p, _ in COLUMNS), flush=True)
    os.makedirs(a.root, exist_ok=True)
    with open(os.path.join(a.root, "summary.json"), "w") as f:
        json.dump({"budget_minutes": a.budget_minutes, "eval": EVAL, "objectives": rows}, f, indent=1)
    print(table(rows))
    return 0


def table(rows: dict) -> str:
    """Markdown: per objective its figure, its random init's, then log-mel (the same for every row)."""
    head = "| objective (backbone) | steps | " + " | ".join(f"{label} (random init)" for _, label in COLUMNS) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(COLUMNS)]
    for name, r in rows.items():
        c = r["cells"]
        vals = []
        for p, _ in COLUMNS:
            v, base = c.get(f"{p}/pretrained"), c.get(f"{p}/random_init")
            vals.append("–" if v is None else f"{v:.1f} ({base:.1f})" if base is not None else f"{v:.1f}")
        lines.append(f"| {name} ({r['backbone']}) | {r['steps']} | " + " | ".join(vals) + " |")
    any_row = next(iter(rows.values()))["cells"] if rows else {}
    lines.append("| *log-mel statistics* | – | " + " | ".join(
        "–" if any_row.get(f"{p}/log_mel") is None else f"{any_row[f'{p}/log_mel']:.1f}" for p, _ in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
