"""Pretraining on Ray Train, driver side: :func:`launch` starts (or joins) Ray and runs the workers.

Each worker runs :func:`workers.pretrain.loop.train_loop_per_worker`. Checkpoints go through Ray
Train's storage (``RUN/checkpoints/checkpoint_*``): Ray registers a checkpoint only once it is fully
persisted, so one is whole or absent, and a rerun of the same command (same
``RunConfig(name, storage_path)``) gets the latest through ``ray.train.get_checkpoint()``; so does a
worker group restarted by ``FailureConfig``. With no cluster address, the run gets a private Ray
instance tuned for a fast start (``workers/pretrain/ray_internals/``).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Optional

from workers.config import ConfigError, PretrainConfig
from workers.data import integrity
from workers.model import BACKBONE_FILE, FINAL_DIR, check_buildable
from workers.pretrain.loop import train_loop_per_worker
from workers.pretrain.optim import schedule_length
from workers.pretrain.run_dir import prepare_run, read_json
from workers.pretrain.run_log import close_tracker, open_tracker, watch_progress
from workers.storage import RunLocation


def _storage_for_ray(loc: RunLocation):
    """(storage_path, storage_filesystem) for RunConfig: local absolute path, or S3 through s3fs."""
    if not loc.is_s3:
        return RunLocation.normalise(loc.uri), None
    import pyarrow.fs

    return loc.uri[len("s3://"):].rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(loc.fs()))


def expected_pretraining(loc: RunLocation, config: PretrainConfig) -> str:
    """One line on what pretraining will do and for how long (before it starts)."""
    from workers.hardware import resolve_here

    try:
        manifest, status = prepare_run(loc, config)
    except ConfigError as e:
        return f"pretraining: cannot start: {e}"
    if status == "finished":
        return "pretraining: already finished for this config (reused)"
    cpu = resolve_here(config.precision, "cpu", config.layout_request()) if not config.use_gpu else None
    where = "the GPU workers" if cpu is None else f"this CPU: {cpu.describe()}"
    spe, total = schedule_length(config, manifest)
    if config.budget_minutes:
        from workers.pretrain.budget import CALIBRATION_STEPS, CALIBRATION_WARMUP

        length = (f"{config.budget_minutes:g} min (budget_minutes; the steps are chosen after timing the first "
                  f"{CALIBRATION_WARMUP + CALIBRATION_STEPS} steps)")
    else:
        length = f"{total} steps ({total / spe:.2g} epochs; the progress bar shows the rate)"
    return f"pretraining: {length}, {config.workers} worker(s) on {where}" + (", resuming" if status == "resume" else "")


def _trainer(loc: RunLocation, run: str, config: PretrainConfig, manifest: dict, private: bool,
             launched_at: Optional[float] = None):
    """Ray Train's ``TorchTrainer`` for this run; on a private instance, without what only a shared
    cluster needs (``workers.pretrain.ray_internals.ray_local``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = _storage_for_ray(loc)
    backend = "nccl" if config.use_gpu else "gloo"
    torch_config = TorchConfig(backend=backend)
    if private:  # our own instance: without the helpers a shared cluster needs
        from workers.pretrain.ray_internals.ray_local import PrivateRayTorchTrainer as TorchTrainer  # noqa: F811
        from workers.pretrain.ray_internals.ray_local import torch_free_controller_supported

        if torch_free_controller_supported():
            from workers.pretrain.ray_internals.ray_controller import LocalTorchConfig

            torch_config = LocalTorchConfig(backend=backend)
    import ray

    # Credentials reach the workers through Ray's object store: the loop's config is kept and shown by Ray.
    secrets = ray.put(config.storage_options) if config.storage_options.secret_names() else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run": run, "manifest": manifest,
                           "storage_options": secrets, "launched_at": launched_at},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        torch_config=torch_config,
        run_config=RunConfig(name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints)),
    )


def local_ray_cpus(config: PretrainConfig) -> int:
    """CPUs a private local Ray instance declares: those this process may use, or more if the workers ask for more."""
    from workers.hardware import cpu_threads_allowed

    return max(config.workers * config.cpus_per_worker, cpu_threads_allowed())


def launch(run: str, config: PretrainConfig, address: Optional[str] = None, overwrite: bool = False,
           progress_bar: bool = True, log=print, dashboard: bool = False) -> dict:
    """Run (or resume) pretraining for ``run`` with ``config`` on Ray; returns the final summary.

    With no ``address`` (nor ``RAY_ADDRESS``) and no Ray running, a private local Ray instance is
    started for the run and shut down after it; ``dashboard`` turns on its dashboard."""
    run = RunLocation.normalise(run)  # Ray workers run in their own working directory
    loc = RunLocation(run, config.storage_options)
    manifest, status = prepare_run(loc, config, overwrite)
    if status != "finished":
        check_buildable(config, manifest["channels"])  # before Ray: a bad parameter value fails here
    if status == "finished":
        log(f"{run}: pretraining already finished ({BACKBONE_FILE}); nothing to do")
        return read_json(loc, f"{FINAL_DIR}/summary.json")
    if status == "resume":
        from workers.pretrain.sessions import check_resumable_by

        check_resumable_by(loc, "ray")
    loc.write_atomic("config.yaml", config.to_yaml().encode())

    import ray

    from workers.pretrain.ray_internals import ray_start

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = False
    if not address and ray_start.pending():  # started by the CLI beside Prefect's start-up
        ray_start.claim()
        started_here = True
    elif not ray.is_initialized():
        if address:
            # An existing cluster: its nodes have gelato installed (infra/docker/Dockerfile), or the
            # job was submitted with `ray job submit --working-dir .`, which puts this tree on them.
            ray.init(address=address)
        else:
            # A private Ray instance that lives and dies with this process.
            ray_start.private_init(local_ray_cpus(config), dashboard)
        started_here = True
    stop = threading.Event()
    watcher = None
    launched_at = time.time()
    tracker = open_tracker(loc, config, log)
    ok = False
    try:
        trainer = _trainer(loc, run, config, manifest, private=started_here and not address, launched_at=launched_at)
        log(f"pretraining {config.objective} / {config.backbone} on {run}: {config.workers} workers, "
            f"global batch {config.batch_size}, {'resuming' if status == 'resume' else 'starting'}")
        watcher = threading.Thread(target=watch_progress, args=(loc, schedule_length(config, manifest)[1], stop),
                                   kwargs={"bar": progress_bar, "log": log, "on_row": tracker and tracker.row},
                                   daemon=True)
        watcher.start()
        try:
            result = trainer.fit()
        except Exception:
            _raise_damaged_shard(loc, launched_at)
            raise
        ok = result.error is None
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(5)
        if started_here:
            ray_start.shutdown()
        close_tracker(tracker, loc, ok)
    if result.error is not None:
        _raise_damaged_shard(loc, launched_at)
        raise result.error
    summary = read_json(loc, f"{FINAL_DIR}/summary.json")
    if summary is None:
        raise RuntimeError(f"{run}: training ended without writing {FINAL_DIR}/summary.json")
    _prune_unregistered_checkpoints(loc)
    return summary


def _prune_unregistered_checkpoints(loc: RunLocation) -> None:
    """Delete the ``checkpoint_*`` folders Ray Train never registered: written by a worker killed
    before the controller collected its report (Ray resumes from the last registered one and leaves
    them behind). Runs after a finished run only, so it never races a write."""
    fs = loc.fs()
    root = loc.join("checkpoints")
    try:
        with fs.open(f"{root}/checkpoint_manager_snapshot.json", "r") as f:
            snapshot = json.load(f)
        names = {os.path.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True) if e["type"] == "directory"}
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return
    kept = {r.get("checkpoint_dir_name") for r in snapshot.get("checkpoint_results", [])}
    for name in sorted(n for n in names if n.startswith("checkpoint_") and n not in kept):
        try:
            fs.rm(f"{root}/{name}", recursive=True)
        except (FileNotFoundError, OSError):
            pass


def _raise_damaged_shard(loc: RunLocation, since: float) -> None:
    """After a failed fit: the damaged shard a worker found, if any, rather than the broken
    connections it caused on the other ranks (which Ray may report first)."""
    found = integrity.damaged(loc, since=since, mode="fail")
    if found:
        raise integrity.CorruptShard(found[0]["message"]) from None

