"""Pretraining for a time budget: how many steps fit, from steps measured on this machine.

``budget_minutes`` replaces epochs/steps. The loop runs its first steps on a provisional schedule
(the linear warm-up does not depend on the total), times them with a :class:`StepClock`, then
:func:`fit_steps` chooses the total number of steps that fit in what is left of the budget, and
the learning-rate cosine (and the EMA momentum schedules, through ``set_progress``) are laid over
that total. Every rank plans from rank 0's measurements, so all take the same number of steps.
The plan is saved in each checkpoint: a resumed run keeps the steps it chose.

What is counted, per step and per event:

* a training step: the median of the measured steps (robust to a slow first batch of an epoch);
* each epoch end: the online kNN monitor, which embeds ``knn_bank + knn_queries`` images split over
  the ranks (the per-image cost is measured on a training batch in eval mode), plus
  ``EPOCH_TURNOVER_S`` for the next epoch's data loader to start;
* each checkpoint: ``CHECKPOINT_S`` (Ray Train's report is a barrier across workers: ~1 s on two
  CPU workers, session 9's measurement);
* the end: ``EXPORT_S`` for the exported backbone and the figure.
"""
from __future__ import annotations

import statistics
import time

CALIBRATION_WARMUP = 2    # steps not timed: first-touch allocations, kernel selection
CALIBRATION_STEPS = 8     # steps timed after those
EPOCH_TURNOVER_S = 1.0
CHECKPOINT_S = 1.0
EXPORT_S = 3.0


class StepClock:
    """Times the steps after :data:`CALIBRATION_WARMUP`; ``tick`` says when enough were measured.

    The decision depends on step counts only, so every rank reaches it at the same step."""

    def __init__(self, warmup: int = CALIBRATION_WARMUP, steps: int = CALIBRATION_STEPS):
        self.warmup, self.steps = warmup, steps
        self.times: list[float] = []

    def tick(self, done: int) -> bool:
        """Call after each optimizer step with the steps done since the loop (re)started."""
        if done >= self.warmup:
            self.times.append(time.perf_counter())
        return done >= self.warmup + self.steps

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else 0.0


def epoch_ends(start: int, end: int, spe: int) -> int:
    """Epoch ends the steps start+1 … end pass (the last step counts as one: the monitor runs there too)."""
    if end <= start:
        return 0
    return end // spe - start // spe + (1 if end % spe else 0)


def fit_steps(config, spe: int, step: int, elapsed_s: float, step_s: float, embed_s: float, world: int) -> dict:
    """The plan: total steps that fit in ``config.budget_minutes`` of loop time, and the figures behind it.

    ``step``: steps done; ``elapsed_s``: loop seconds spent so far; ``step_s``: measured seconds per
    step; ``embed_s``: measured seconds to embed one image for the kNN monitor (0 without it).
    """
    budget_s = config.budget_minutes * 60
    monitor_s = embed_s * (config.knn_bank + config.knn_queries) / world if config.knn_monitor else 0.0
    per_epoch_end = monitor_s + EPOCH_TURNOVER_S
    remaining = budget_s - elapsed_s - EXPORT_S

    def cost(total: int) -> float:
        return ((total - step) * step_s + epoch_ends(step, total, spe) * per_epoch_end
                + (total // config.checkpoint_every - step // config.checkpoint_every) * CHECKPOINT_S)

    total = step
    if step_s > 0:
        lo, hi = step, step + int(max(0.0, remaining) / step_s) + 1
        while lo < hi:  # the largest total whose cost fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= remaining else (lo, mid - 1)
        total = lo
    total = max(total, step)
    return {"budget_minutes": config.budget_minutes, "step_seconds": round(step_s, 5),
            "embed_seconds_per_image": round(embed_s, 7), "monitor_seconds": round(monitor_s, 2),
            "calibrated_at_step": step, "elapsed_seconds": round(elapsed_s, 2), "steps": int(total),
            "epochs": round(total / spe, 3), "planned_seconds": round(elapsed_s + cost(total) + EXPORT_S, 1)}
