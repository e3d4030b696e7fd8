"""What the one-budget benches (``video_objectives.py``, ``audio_objectives.py``) share: one run per
objective made from a copy of one ingested run, each pretrained for the same wall-clock and evaluated
the same way, one objective failing without losing the others' figures."""
from __future__ import annotations

import os
import shutil
import time


def copy_shards(source: str, run: str) -> None:
    """The ingested run's manifest and shards, nothing it trained or evaluated."""
    if os.path.exists(os.path.join(run, "manifest.json")):
        return
    os.makedirs(run, exist_ok=True)
    shutil.copytree(os.path.join(source, "shards"), os.path.join(run, "shards"), dirs_exist_ok=True)
    shutil.copy(os.path.join(source, "manifest.json"), os.path.join(run, "manifest.json"))


def train_and_score(source: str, root: str, name: str, config: str, budget_minutes: float, evaluation: dict):
    """``name``'s run under ``root``: pretrained with ``config`` for ``budget_minutes``, then evaluated.
    Returns (steps, pretrain seconds, eval seconds, report) or None when it failed (said on stdout)."""
    import gelato

    run = os.path.join(root, name)
    copy_shards(source, run)
    t0 = time.perf_counter()
    try:
        result = gelato.pretrain(run, config, overrides=[f"budget_minutes={budget_minutes}"], progress=False)
        t1 = time.perf_counter()
        report = gelato.evaluate(run, evaluation, progress=False).report
    except Exception as e:  # noqa: BLE001 - one objective failing must not lose the others' figures
        print(f"{name}: FAILED ({type(e).__name__}: {e})", flush=True)
        return None
    return result.steps, round(t1 - t0, 1), round(time.perf_counter() - t1, 1), report
