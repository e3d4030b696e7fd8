"""The run log of pretraining: ``RUN/metrics.jsonl``, written by rank 0 and followed by the driver.

* :class:`MetricsLog` — rank 0 appends one JSON line per logged step and per event (execution,
  schedule, first step, resume);
* :class:`MetricsTail` — the new complete lines since the last read, local or S3;
* :func:`watch_progress` — the driver's progress bar and messages, fed by that tail (no actor, no
  extra process), under Ray and under torchrun alike.
"""
from __future__ import annotations

import json
import sys
import threading

from workers.data import integrity
from workers.storage import RunLocation


class MetricsLog:
    """``RUN/metrics.jsonl``, written by rank 0. On resume, lines past the restored step are dropped,
    so the file always describes one training history (and shows where it resumed)."""

    def __init__(self, loc: RunLocation, resume_step: int):
        self.loc, self.rel = loc, "metrics.jsonl"
        self.lines: list[str] = []
        try:
            with loc.fs().open(loc.join(self.rel), "r") as f:
                self.lines = [ln for ln in f.read().splitlines()
                              if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        except FileNotFoundError:
            pass
        self._flush()

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        if self.loc.is_s3:
            self._flush()  # S3 has no append: rewrite the (small) file
        else:
            with open(self.loc.join(self.rel), "a") as f:
                f.write(self.lines[-1] + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self.lines]

    def _flush(self) -> None:
        self.loc.write_atomic(self.rel, "".join(ln + "\n" for ln in self.lines).encode())


class MetricsTail:
    """New complete lines of ``RUN/metrics.jsonl`` since the last call (local or S3). Content that
    was there when the tail was opened is skipped; if the file shrinks (a resumed run drops the
    lines past its checkpoint) it is read again from the start."""

    def __init__(self, loc: RunLocation):
        self.loc, self.path, self.fs = loc, loc.join("metrics.jsonl"), loc.fs()
        self.offset = self._size()

    def _size(self) -> int:
        try:
            if self.loc.is_s3:
                self.fs.invalidate_cache(self.path)
            return int(self.fs.size(self.path))
        except (FileNotFoundError, OSError):
            return 0

    def read(self) -> list[dict]:
        size = self._size()
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return []
        try:
            with self.fs.open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except (FileNotFoundError, OSError):
            return []
        data = data[:data.rfind(b"\n") + 1]  # complete lines only
        self.offset += len(data)
        rows = []
        for line in data.decode().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return rows


def watch_progress(loc: RunLocation, total: int, stop: threading.Event, every: float = 1.0, bar: bool = True,
                    log=print, on_row=None) -> None:
    """Driver-side progress, fed by rank 0's ``metrics.jsonl`` (no actor, no extra process).

    Prints how the workers run (resolved precision, and its warning) and, with a time budget, the
    steps it chose; then a progress bar (``bar``) whose total follows that choice. Each row also
    goes to ``on_row`` (the experiment trackers, ``workers/tracking.py``); if that fails, it is said
    once and training goes on."""
    from tqdm import tqdm

    tail = MetricsTail(loc)
    pbar, skipped = None, 0
    while True:
        done = stop.wait(every)
        for row in tail.read():
            if on_row is not None:
                try:
                    on_row(row)
                except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop training
                    print(f"warning: experiment tracking stopped: {type(e).__name__}: {e}", file=sys.stderr)
                    on_row = None
            event = row.get("event")
            if row.get("skipped_shards", 0) > skipped:
                skipped = row["skipped_shards"]
                print(f"warning: {skipped} damaged shard(s) skipped so far (on_corrupt: skip); they are named in "
                      f"{loc.join(integrity.DAMAGED_DIR)}", file=sys.stderr)
            if event == "execution":
                ex = row["execution"]
                layout = " + channels_last" if ex["channels_last"] else ""
                log(f"workers run at {ex['precision']}{layout} ({ex['requested']}: {ex['reason']}) on {ex['device']}")
                if ex.get("warning"):
                    print(f"warning: {ex['warning']}", file=sys.stderr)
                continue
            if event == "schedule":
                total = int(row["steps"])
                log(f"budget {row['budget_minutes']:g} min: {row['step_seconds']:.3f} s/step measured, so {total} steps "
                    f"({row['epochs']:g} epochs), expected to end {row['planned_seconds'] / 60:.1f} min after the workers start")
                if pbar is not None:
                    pbar.total = total
                    pbar.refresh()
                continue
            if "loss" not in row or "step" not in row or not bar:
                continue
            if pbar is None:  # from the first step seen: a resumed run's rate counts its own steps only
                pbar = tqdm(total=total, initial=int(row["step"]), desc="pretrain", unit="step", dynamic_ncols=True)
            pbar.n = int(row["step"])
            post = {"loss": f"{row['loss']:.4f}", "img/s": f"{row['samples_per_s']:.0f}"}
            if "gpu_mem_gib" in row:
                post["mem"] = f"{row['gpu_mem_gib']:.1f}G"
            if "knn_top1" in row:
                post["knn"] = f"{row['knn_top1']:.3f}"
            pbar.set_postfix(post)  # refreshes the bar
        if done:
            break
    if pbar is not None:
        pbar.close()



def open_tracker(loc: RunLocation, config, log=print):
    """The experiment trackers ``config.loggers`` names, with the config logged as params; None without."""
    if not config.loggers:
        return None
    from workers.tracking import Tracker

    tracker = Tracker(loc, config.loggers)
    tracker.params({k: v for k, v in config.model_dump(mode="json").items() if k != "storage_options"})
    log("tracking: " + "; ".join(f"{n} {w}" for n, w in tracker.where().items()))
    return tracker


def close_tracker(tracker, loc: RunLocation, ok: bool) -> None:
    """The pretraining figure (when drawn) to the trackers, then close them."""
    if tracker is None:
        return
    from workers.model import PRETRAIN_PLOT

    try:
        if ok:
            with loc.fs().open(loc.join(PRETRAIN_PLOT), "rb") as f:
                tracker.image("pretrain", f.read(), 0)
    except FileNotFoundError:
        pass
    finally:
        tracker.close(ok)
