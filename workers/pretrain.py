"""Pretraining on Ray Train: ``launch`` (driver side) and ``train_loop_per_worker`` (each worker).

The loop itself, ``run_loop``, talks to its launcher through a session (``workers.train_session``):
Ray Train here, or plain ``torch.distributed`` under ``torchrun`` (``workers/torchrun.py``).

The loop is one linear function, read top to bottom: build the objective, restore the latest
checkpoint if there is one, then for each step take a uint8 batch from this rank's shard stream,
augment it on the device, forward/backward under DDP, step, let the objective update its momentum
encoder / queue / prototypes, and every so often log, checkpoint, and at epoch ends run the kNN
monitor. Schedules are computed up front and indexed by step.

Checkpoints go through Ray Train's storage (``RUN/checkpoints/checkpoint_*``): Ray registers a
checkpoint only once it is fully persisted, so one is whole or absent, and a rerun of the same
command (same ``RunConfig(name, storage_path)``) gets the latest through
``ray.train.get_checkpoint()``; so does a worker group restarted by ``FailureConfig``. The result
the evaluation stage loads is ``RUN/checkpoints/final/backbone.pt``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from typing import Optional

import torch

from workers import integrity
from workers.config import ConfigError, PretrainConfig
from workers.pretrain_run import FINAL_DIR, PRETRAIN_PLOT, prepare_run, read_json
from workers.storage import RunLocation


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; raised on every rank at the same step, before the optimizer step."""


# ----------------------------------------------------------------------------- small helpers

def _momentum_of(objective) -> Optional[float]:
    if hasattr(objective, "current_momentum"):
        return float(objective.current_momentum())
    m = getattr(objective, "momentum", None)
    return float(m) if isinstance(m, (int, float)) else None


def build_objective(config: PretrainConfig, in_channels: int):
    """Backbone + objective exactly as the config says (the same call on every rank and at export)."""
    from ssl_models import backbones, objectives

    backbone_kw = dict(config.backbone_params)
    if config.backbone.startswith("vit"):
        backbone_kw.setdefault("image_size", config.image_size)
    channels = objectives.OBJECTIVES[config.objective].backbone_channels(in_channels)
    backbone = backbones.build(config.backbone, in_channels=channels, **backbone_kw)
    return objectives.build(config.objective, backbone=backbone, image_size=config.image_size,
                            **config.objective_kwargs())


def check_buildable(config: PretrainConfig, in_channels: int = 3) -> None:
    """Build the objective once, on the driver, before any Ray or Prefect work: a parameter value the
    constructors refuse fails here, in about a second, naming the config's fields (names were
    checked by the config itself). On torch's meta device (no memory), or on the CPU for the few
    objectives whose constructors compute with tensors."""
    try:
        try:
            with torch.device("meta"):
                build_objective(config, in_channels)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            build_objective(config, in_channels)
    except Exception as e:  # noqa: BLE001 - whatever a constructor raises, the user's values caused it
        given = {k: v for k, v in (("backbone_params", config.backbone_params),
                                   ("objective_params", config.objective_params), ("view", config.view)) if v}
        raise ConfigError(f"{config.objective} / {config.backbone} cannot be built with "
                          f"{', '.join(f'{k}={v}' for k, v in given.items()) or 'these settings'} "
                          f"(image_size={config.image_size}): {type(e).__name__}: {e}") from None


def schedule_length(config: PretrainConfig, manifest: dict) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) of a run: ``steps`` if set, else ``epochs`` worth.

    With ``budget_minutes`` the total is provisional: the loop replaces it with the steps that fit
    (:func:`workers.pretrain_budget.fit_steps`) after measuring its first steps."""
    from workers.data import steps_per_epoch

    spe = steps_per_epoch(manifest["splits"]["train"]["count"], config.batch_size)
    return spe, config.steps or max(1, math.ceil(config.epochs * spe))


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

    def _flush(self) -> None:
        self.loc.write_atomic(self.rel, "".join(ln + "\n" for ln in self.lines).encode())


# ----------------------------------------------------------------------------- the worker loop

def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train's entry on each worker: the loop in a :class:`~workers.train_session.RayTrainSession`.

    The storage credentials, if any, come as a reference into Ray's object store (``launch``), never
    inside the loop's config, which Ray keeps and shows."""
    t_enter = time.time()
    from workers.train_session import RayTrainSession

    if cfg.get("storage_options") is not None:
        import ray

        cfg = dict(cfg, storage_options=ray.get(cfg["storage_options"]))
    run_loop(cfg, RayTrainSession(), t_enter=t_enter)


def run_loop(cfg: dict, session, t_enter: Optional[float] = None) -> None:
    """The training loop on one rank. ``cfg``: {"config": PretrainConfig as JSON (without credentials),
    "run": URI, "manifest": the run's manifest, "storage_options": the StorageOptions with their
    credentials, or None}; ``session``: the launcher's side (``workers.train_session``)."""
    t_enter = t_enter or time.time()  # start-up phases go into the first_step event of metrics.jsonl
    import torch.distributed as dist

    from workers.data import epoch_batches, in_memory_split
    from workers.hardware import resolve_here
    from workers.knn import extract_features_sharded, knn_accuracy
    from workers.optim import build_optimizer, lr_schedule
    from workers.pretrain_budget import StepClock, fit_steps

    config = PretrainConfig(**cfg["config"])
    if cfg.get("storage_options") is not None:
        config = config.model_copy(update={"storage_options": cfg["storage_options"]})
    loc = RunLocation(cfg["run"], config.storage_options)
    manifest: dict = cfg["manifest"]
    rank, world, device = session.rank, session.world, session.device
    if cfg.get("launched_at"):
        # A worker group restarted after a rank found a damaged shard would only find it again:
        # it stops here, before building anything, with the same message.
        found = integrity.damaged(loc, since=cfg["launched_at"], mode="fail")
        if found:
            raise integrity.CorruptShard(found[0]["message"])
    if device.type == "cpu":
        # Ray exports OMP_NUM_THREADS for the worker, but torch may have sized its pool before:
        # two workers × all cores each would oversubscribe the machine.
        torch.set_num_threads(config.cpus_per_worker)
    else:
        # the views keep fixed sizes, so cuDNN's autotuner picks each convolution's fastest
        # algorithm once, on the first steps (not run here: no GPU in this project's sessions yet)
        torch.backends.cudnn.benchmark = True

    t_imports = time.time()
    # --- how the network runs here: precision "auto" resolves on this device (workers.hardware)
    ex = resolve_here(config.precision, str(device), config.layout_request())
    # --- model: identical initial weights on every rank (DDP also broadcasts them)
    torch.manual_seed(config.seed)
    objective = build_objective(config, manifest["channels"])
    if config.sync_bn and world > 1:  # torch's SyncBatchNorm on CUDA; GlobalBatchNorm on CPU (torch's raises there)
        from ssl_models.sync_bn import convert_sync_batchnorm

        objective = convert_sync_batchnorm(objective, device.type)
    objective = objective.to(device)
    if ex.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optimizer, objective, lr=config.scaled_lr, weight_decay=config.weight_decay,
                                momentum=config.momentum, betas=config.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=ex.grad_scaler)

    # --- schedules, computed up front (with a time budget: once the first steps are measured)
    spe, total = schedule_length(config, manifest)
    warmup = int(config.warmup_epochs * spe)
    budget_plan: Optional[dict] = None

    # --- resume: from this run's latest checkpoint (a rerun, or a worker group restarted after a failure)
    start_step, resumed_from = 0, None
    ckpt = session.latest_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        start_step, resumed_from = int(state["step"]), ckpt.path
        if config.budget_minutes and state.get("budget_plan"):  # the steps chosen before the restart stand
            budget_plan = dict(state["budget_plan"])
            total = int(budget_plan["steps"])
    lrs = lr_schedule(config.scaled_lr, total, warmup, config.min_lr_ratio)
    clock = StepClock() if config.budget_minutes and budget_plan is None else None
    core = objective
    t_built = time.time()
    model = session.wrap(objective) if world > 1 else objective
    if config.compile:
        model = torch.compile(model)
    # Views are drawn from a generator seeded by (seed, rank, start step): a resumed run draws
    # fresh but reproducible augmentations.
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + rank * 7919 + start_step)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ex.precision)
    log = MetricsLog(loc, start_step) if rank == 0 else None
    if log is not None and resumed_from:
        log.append({"event": "resumed", "step": start_step, "from": str(resumed_from), "time": time.time()})
    if log is not None:  # the driver prints this line (and its warning) before the progress bar
        log.append({"event": "execution", "step": start_step, "execution": ex.as_dict(), "time": time.time()})

    t_ready = time.time()
    knn_sets = None

    def knn_monitor() -> Optional[float]:
        """Online kNN top-1 on val: rank 0's answer, None on the others. A collective: every rank
        calls it at the same step and embeds one share of the bank and of the queries."""
        nonlocal knn_sets
        if not (config.knn_monitor and manifest.get("classes") and not manifest.get("multilabel")
                and "val" in manifest["splits"]):
            return None
        if knn_sets is None:
            knn_sets = (in_memory_split(loc, manifest, "train", config.knn_bank, config.image_size, config.on_corrupt),
                        in_memory_split(loc, manifest, "val", config.knn_queries, config.image_size,
                                        config.on_corrupt))
        (bank_x, bank_y), (q_x, q_y) = knn_sets
        if world > 1:  # rank 0's batch-norm statistics on every rank: all shares see one network
            for b in core.backbone.buffers():
                dist.broadcast(b, 0)
        core.eval()
        fn = lambda x: core.backbone(core.preprocess(x))  # noqa: E731
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            fb = extract_features_sharded(fn, bank_x, device=device)
            fq = extract_features_sharded(fn, q_x, device=device)
        core.train()
        if rank != 0:
            return None
        return knn_accuracy(fb, bank_y, fq, q_y, len(manifest["classes"]), k=config.knn_k, temperature=0.07)

    def save_checkpoint(step: int, metrics: dict) -> None:
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"objective": core.state_dict(), "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(), "step": step, "epoch": step // spe,
                            "rng_cpu": torch.get_rng_state(), "training_hash": config.training_hash(),
                            "total_steps": total, "budget_plan": budget_plan},
                           os.path.join(d, "state.pt"))
                with open(os.path.join(d, "config.yaml"), "w") as f:
                    f.write(config.to_yaml())
                session.report(metrics, checkpoint_dir=d)
        else:
            session.report(metrics)

    # --- the loop
    step, t_batch = start_step, None
    t_log, seen_log, loss_sum, loss_n, wait_log = time.perf_counter(), 0, 0.0, 0, 0.0
    while step < total:
        epoch, in_epoch = divmod(step, spe)
        batches = epoch_batches(loc, manifest, epoch, spe * config.grad_accum, rank=rank, world_size=world,
                                local_batch=config.local_batch, loader_workers=config.loader_workers,
                                seed=config.seed, skip=in_epoch * config.grad_accum, image_size=config.image_size,
                                pin_memory=device.type == "cuda", on_corrupt=config.on_corrupt)
        micro = 0
        t_fetch = time.perf_counter()
        for batch in batches:
            wait_log += time.perf_counter() - t_fetch  # time spent waiting on the data stream
            t_batch = t_batch or time.time()
            images = batch["image"].to(device, non_blocking=True)
            views = core.make_views(images, generator=gen)
            if ex.channels_last:
                views = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                         for k, v in views.items()}
            if micro == 0:
                core.set_progress(step, total)  # before the forward: schedules inside it see this step
            last_micro = micro == config.grad_accum - 1
            sync = model.no_sync() if (world > 1 and not last_micro and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(views)
                loss = out["loss"]
                # Every rank must learn of a non-finite loss at the same step. The flag is reduced
                # while the backward runs (async), so the step keeps one synchronisation point, the
                # gradient all-reduce; it is checked before the optimizer step. On the device: NCCL
                # reduces CUDA tensors only.
                bad = (~torch.isfinite(loss.detach())).float().reshape(1)
                flag = dist.all_reduce(bad, op=dist.ReduceOp.MAX, async_op=True) if world > 1 else None
                scaler.scale(loss / config.grad_accum).backward()
                if flag is not None:
                    flag.wait()
                if bad.item() > 0:
                    raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step} (epoch {epoch}) on "
                                        f"{'this' if not torch.isfinite(loss.detach()) else 'another'} rank; "
                                        f"the last good checkpoint is kept. Lower lr or use precision=fp32.")
            loss_sum, loss_n, seen_log = loss_sum + loss.item(), loss_n + 1, seen_log + images.shape[0]
            micro += 1
            if not last_micro:
                t_fetch = time.perf_counter()
                continue
            micro = 0
            for g in optimizer.param_groups:
                g["lr"] = lrs[step]
            if config.clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(objective.parameters(), config.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            core.after_step()
            step += 1
            if log is not None and step == start_step + 1:  # time-to-first-step, for the benchmark
                log.append({"event": "first_step", "step": step, "time": time.time(), "threads": torch.get_num_threads(),
                            "loop_entered": t_enter, "imports_done": t_imports, "model_built": t_built,
                            "model_ready": t_ready, "first_batch": t_batch, "wrapped_as": type(model).__name__,
                            "norm_layers": sorted({type(m).__name__ for m in core.modules() if "Norm" in type(m).__name__}),
                            "execution": ex.as_dict()})
            if clock is not None and clock.tick(step - start_step):
                # Measured: lay the schedule over the steps that fit (the same number on every rank).
                embed_s = _embedding_seconds(core, images, ex, device) if config.knn_monitor else 0.0
                step_s = clock.step_seconds()
                if world > 1:  # rank 0's measurements decide, so every rank plans the same steps
                    m = torch.tensor([step_s, embed_s], dtype=torch.float64, device=device)
                    dist.broadcast(m, 0)
                    step_s, embed_s = float(m[0]), float(m[1])
                budget_plan = fit_steps(config, spe, step, time.time() - t_enter, step_s, embed_s, world)
                total = budget_plan["steps"]
                lrs = lr_schedule(config.scaled_lr, total, warmup, config.min_lr_ratio)
                clock = None
                if log is not None:
                    log.append({"event": "schedule", "step": step, "time": time.time(), **budget_plan})

            end_of_epoch = step % spe == 0 or step == total
            if step % config.log_every == 0 or end_of_epoch or step % config.checkpoint_every == 0:
                dt = time.perf_counter() - t_log
                stats = torch.tensor([loss_sum / max(1, loss_n), seen_log / max(dt, 1e-9)], device=device)
                if world > 1:
                    dist.all_reduce(stats)
                stats = stats.cpu()
                metrics = {"step": step, "epoch": step / spe, "loss": float(stats[0]) / world, "lr": lrs[step - 1],
                           "samples_per_s": float(stats[1]), "samples_per_s_per_worker": float(stats[1]) / world,
                           "data_wait": wait_log / max(dt, 1e-9),  # share of rank 0's time waiting on data
                           "time": time.time()}
                if device.type == "cuda":  # this rank's peak so far
                    metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                mom = _momentum_of(core)
                if mom is not None:
                    metrics["momentum"] = mom
                for k, v in out.items():
                    if k != "loss" and (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
                        metrics[k] = float(v)
                if end_of_epoch:  # on every rank: each embeds a share
                    acc = knn_monitor()
                    if acc is not None:
                        metrics["knn_top1"] = acc
                    if config.on_corrupt == "skip" and rank == 0:  # shards the loaders left out so far
                        metrics["skipped_shards"] = len(integrity.damaged(loc, mode="skip"))
                if log is not None:
                    log.append(metrics)  # the driver's progress bar reads it from there
                t_log, seen_log, loss_sum, loss_n, wait_log = time.perf_counter(), 0, 0.0, 0, 0.0
            # session.report is a barrier across workers (~1 s under Ray Train here), so it runs only
            # with checkpoints; metrics reach metrics.jsonl and the progress bar without it.
            if step % config.checkpoint_every == 0 or step == total:
                save_checkpoint(step, metrics)
                t_log, seen_log, loss_sum, loss_n, wait_log = time.perf_counter(), 0, 0.0, 0, 0.0
            if step >= total or step % spe == 0:
                break
            t_fetch = time.perf_counter()

    if rank == 0:
        export_final(loc, config, manifest, core, step, total, metrics_rows=[json.loads(ln) for ln in log.lines],
                     execution=ex.as_dict(), budget_plan=budget_plan, loop_seconds=time.time() - t_enter)


def _embedding_seconds(core, images: torch.Tensor, ex, device: torch.device) -> float:
    """Seconds to embed one image for the kNN monitor, measured on this batch (eval mode, no grad)."""
    was_training = core.training
    core.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ex.precision)
    x = images[:256]
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            core.backbone(core.preprocess(x[:8]))  # warm the kernels for this shape's layout
            t0 = time.perf_counter()
            core.backbone(core.preprocess(x))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) / len(x)
    finally:
        core.train(was_training)


def export_final(loc: RunLocation, config: PretrainConfig, manifest: dict, objective, step: int, total: int,
                 metrics_rows: Optional[list[dict]] = None, execution: Optional[dict] = None,
                 budget_plan: Optional[dict] = None, loop_seconds: Optional[float] = None) -> None:
    """``checkpoints/final/backbone.pt``: backbone weights + what rebuilds it; ``plots/pretrain.png``
    from ``metrics_rows``; then ``summary.json``, which marks the run finished."""
    backbone = objective.backbone
    payload = {
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "backbone_name": config.backbone,
        "backbone_params": dict(config.backbone_params) | ({"image_size": config.image_size}
                                                          if config.backbone.startswith("vit") else {}),
        "in_channels": int(backbone.in_channels),        # what the backbone takes
        "image_channels": int(manifest["channels"]),     # what the run's images have
        "feature_dim": int(backbone.feature_dim),
        "image_size": config.image_size,
        "objective": config.objective,
        "config": config.model_dump(mode="json"),
        "training_hash": config.training_hash(),
        "steps": step,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    loc.write_atomic(f"{FINAL_DIR}/backbone.pt", buf.getvalue())
    plot = write_pretrain_plot(loc, config, metrics_rows or [], (execution or {}).get("precision"))
    summary = {"steps": step, "total_steps": total, "training_hash": config.training_hash(),
               "objective": config.objective, "backbone": config.backbone, "finished": time.time(),
               "plot": plot, "execution": execution, "budget": budget_plan, "loop_seconds": loop_seconds,
               "skipped_shards": sorted(r["shard"] for r in integrity.damaged(loc, mode="skip"))}
    loc.write_atomic(f"{FINAL_DIR}/summary.json", json.dumps(summary, indent=1).encode())


def write_pretrain_plot(loc: RunLocation, config: PretrainConfig, rows: list[dict],
                        precision: Optional[str] = None) -> Optional[str]:
    """Draw ``plots/pretrain.png``; returns its path in the run, or None. A figure that cannot be
    drawn is reported on stderr and costs the run nothing else."""
    try:
        from workers.report import pretrain_figure

        workers = f"{config.workers} worker{'s' * (config.workers > 1)}"
        png = pretrain_figure(rows, f"{config.objective} / {config.backbone}: {workers}, global batch "
                                    f"{config.batch_size}, {precision or config.precision}")
        if png is None:
            return None
        loc.write_atomic(PRETRAIN_PLOT, png)
        return PRETRAIN_PLOT
    except Exception as e:  # noqa: BLE001 - the weights are written; a plot is not worth losing them over
        print(f"{loc.uri}: could not draw {PRETRAIN_PLOT}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def load_backbone(path_or_uri: str, storage_options: Optional[dict] = None):
    """Rebuild the exported backbone (weights_only load). Returns (backbone, payload)."""
    from ssl_models import backbones
    from workers.storage import filesystem

    with filesystem(path_or_uri, storage_options).open(path_or_uri, "rb") as f:
        payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    model = backbones.build(payload["backbone_name"], in_channels=payload["in_channels"], **payload["backbone_params"])
    model.load_state_dict(payload["backbone"])
    return model, payload


# ----------------------------------------------------------------------------- the driver

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
        from workers.pretrain_budget import CALIBRATION_STEPS, CALIBRATION_WARMUP

        length = (f"{config.budget_minutes:g} min (budget_minutes; the steps are chosen after timing the first "
                  f"{CALIBRATION_WARMUP + CALIBRATION_STEPS} steps)")
    else:
        length = f"{total} steps ({total / spe:.2g} epochs; the progress bar shows the rate)"
    return f"pretraining: {length}, {config.workers} worker(s) on {where}" + (", resuming" if status == "resume" else "")


def _trainer(loc: RunLocation, run: str, config: PretrainConfig, manifest: dict, private: bool,
             launched_at: Optional[float] = None):
    """Ray Train's ``TorchTrainer`` for this run; on a private instance, without what only a shared
    cluster needs (``workers.ray_local``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = _storage_for_ray(loc)
    backend = "nccl" if config.use_gpu else "gloo"
    torch_config = TorchConfig(backend=backend)
    if private:  # our own instance: without the helpers a shared cluster needs
        from workers.ray_local import PrivateRayTorchTrainer as TorchTrainer  # noqa: F811
        from workers.ray_local import torch_free_controller_supported

        if torch_free_controller_supported():
            from workers.ray_controller import LocalTorchConfig

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
        log(f"{run}: pretraining already finished ({FINAL_DIR}/backbone.pt); nothing to do")
        return read_json(loc, f"{FINAL_DIR}/summary.json")
    if status == "resume":
        from workers.train_session import check_resumable_by

        check_resumable_by(loc, "ray")
    loc.write_atomic("config.yaml", config.to_yaml().encode())

    import ray

    from workers import ray_start

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
    try:
        trainer = _trainer(loc, run, config, manifest, private=started_here and not address, launched_at=launched_at)
        log(f"pretraining {config.objective} / {config.backbone} on {run}: {config.workers} workers, "
            f"global batch {config.batch_size}, {'resuming' if status == 'resume' else 'starting'}")
        watcher = threading.Thread(target=watch_progress, args=(loc, schedule_length(config, manifest)[1], stop),
                                   kwargs={"bar": progress_bar, "log": log}, daemon=True)
        watcher.start()
        try:
            result = trainer.fit()
        except Exception:
            _raise_damaged_shard(loc, launched_at)
            raise
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(5)
        if started_here:
            ray_start.shutdown()
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
                    log=print) -> None:
    """Driver-side progress, fed by rank 0's ``metrics.jsonl`` (no actor, no extra process).

    Prints how the workers run (resolved precision, and its warning) and, with a time budget, the
    steps it chose; then a progress bar (``bar``) whose total follows that choice."""
    from tqdm import tqdm

    tail = MetricsTail(loc)
    pbar, skipped = None, 0
    while True:
        done = stop.wait(every)
        for row in tail.read():
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


__all__ = ["launch", "train_loop_per_worker", "run_loop", "load_backbone", "build_objective", "NonFiniteLoss", "prepare_run"]
