"""Pretraining without Ray: the same loop under ``torchrun`` (or one plain process).

    torchrun --nproc-per-node 8 -m workers.torchrun RUN_URI --config CONFIG.yaml workers=8
    python -m workers.torchrun RUN_URI --config CONFIG.yaml workers=1

For machines and schedulers that have PyTorch but no Ray (a Slurm allocation, a single GPU box).
``gelato pretrain`` (Ray Train, Prefect) stays the main entry; this one takes the same config and
overrides, checks the run the same way, writes the same ``config.yaml``, ``metrics.jsonl`` and
``checkpoints/final/``, and resumes from its own checkpoints (``checkpoints/torchrun/``) when the
same command runs again (and so when ``torchrun --max-restarts N`` restarts the ranks after a
failure; that path has no test).
``workers`` in the config must equal torchrun's world size. The run is a positional argument
here (torchrun would take ``--run`` for its own ``--run-path``).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Optional

from workers.config import ConfigError, PretrainConfig, load_config
from workers.data.integrity import CorruptShard
from workers.model import BACKBONE_FILE, FINAL_DIR, check_buildable
from workers.pretrain.loop import run_loop
from workers.pretrain.optim import schedule_length
from workers.pretrain.run_dir import prepare_run, read_json
from workers.pretrain.run_log import close_tracker, open_tracker, watch_progress
from workers.pretrain.sessions import TorchrunSession, check_resumable_by
from workers.storage import RunLocation


def pretrain(run: str, config: PretrainConfig, overwrite: bool = False, progress_bar: bool = True,
             log=print) -> dict:
    """Run or resume pretraining of ``run`` on this rank; every rank of the job calls it. Returns
    the final summary (on every rank)."""
    import torch.distributed as dist

    run = RunLocation.normalise(run)
    loc = RunLocation(run, config.storage_options)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if config.workers != world:
        raise ConfigError(f"workers: the config asks for {config.workers} but torchrun started {world} "
                          f"process(es); pass workers={world}")
    session = TorchrunSession(loc, config.use_gpu, keep=config.keep_checkpoints)
    try:
        # rank 0 checks the run (and clears it with overwrite) before any rank reads it
        state: list = [None]
        if session.rank == 0:
            try:
                manifest, status = prepare_run(loc, config, overwrite)
                if status == "resume":
                    check_resumable_by(loc, "torchrun")
                if status != "finished":
                    check_buildable(config, manifest["channels"])  # a bad parameter value fails on every rank
                    loc.write_atomic("config.yaml", config.to_yaml().encode())
                state = [(manifest, status, None)]
            except Exception as e:  # every rank must learn of it, or the others wait forever
                state = [(None, None, e)]
        if dist.is_initialized():
            dist.broadcast_object_list(state, src=0)
        manifest, status, error = state[0]
        if error is not None:
            raise error
        if status == "finished":
            if session.rank == 0:
                log(f"{run}: pretraining already finished ({BACKBONE_FILE}); nothing to do")
            return read_json(loc, f"{FINAL_DIR}/summary.json")
        stop, watcher, tracker, ok = threading.Event(), None, None, False
        if session.rank == 0:
            tracker = open_tracker(loc, config, log)
            log(f"pretraining {config.objective} / {config.backbone} on {run}: {world} process(es) "
                f"on {session.device.type}, global batch {config.batch_size}, "
                f"{'resuming' if status == 'resume' else 'starting'}")
            total = schedule_length(config, manifest)[1]
            watcher = threading.Thread(target=watch_progress, args=(loc, total, stop),
                                       kwargs={"bar": progress_bar, "log": log,
                                               "on_row": tracker and tracker.row}, daemon=True)
            watcher.start()
        try:
            run_loop({"config": config.model_dump(mode="json"), "run": run, "manifest": manifest,
                      "storage_options": config.storage_options}, session)
            ok = True
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(5)
            close_tracker(tracker, loc, ok)
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written the summary
        return read_json(loc, f"{FINAL_DIR}/summary.json")
    finally:
        session.close()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.torchrun", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_URI", help="an ingested run directory (local or s3://)")
    p.add_argument("--config", default=None, help="pretraining config YAML (configs/*.yaml)")
    p.add_argument("--overwrite", action="store_true", help="drop this run's checkpoints and metrics, start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)
    try:
        config = load_config(a.config, a.overrides)
        summary = pretrain(a.run, config, overwrite=a.overwrite, progress_bar=not a.no_progress)
    except (ConfigError, CorruptShard) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"done: {summary['steps']} steps; backbone at {os.path.join(a.run, FINAL_DIR, 'backbone.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
