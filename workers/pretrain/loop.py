"""The pretraining loop on one rank: :func:`run_loop`, read top to bottom as named steps.

    config, loc, manifest = unpack(cfg)         the typed config, the run, its manifest
    rig = build(...)                            the objective, optimizer, scaler, schedules, generator
    restore(rig, checkpoint)                    from the latest checkpoint, if there is one
    for each step:
        batches = micro_batches(...)            uint8 batches from this rank's shard stream
        out = train_step(rig, step, batches)    views on the device, forward/backward (DDP), step
        budget / log / checkpoint               every so often; the kNN monitor at epoch ends
    export_final(...)                           backbone.pt, plots/pretrain.png, summary.json

It talks to its launcher through a session (``workers/pretrain/sessions.py``): Ray Train
(:func:`train_loop_per_worker`, started by ``workers/pretrain/launch.py``) or plain
``torch.distributed`` under ``torchrun`` (``workers/pretrain/torchrun.py``). Schedules are computed
up front and indexed by step; with a time budget they are laid over the steps that fit once the
first steps are measured (``workers/pretrain/budget.py``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from workers.config import PretrainConfig
from workers.data import integrity
from workers.hardware import keep_freed_memory
from workers.model import build_objective
from workers.pretrain.export import export_final
from workers.pretrain.optim import build_optimizer, lr_schedule, schedule_length
from workers.pretrain.run_log import MetricsLog
from workers.storage import RunLocation


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; raised on every rank at the same step, before the optimizer step."""


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train's entry on each worker: the loop in a :class:`~workers.pretrain.sessions.RayTrainSession`.

    The storage credentials, if any, come as a reference into Ray's object store (``launch``), never
    inside the loop's config, which Ray keeps and shows."""
    t_enter = time.time()
    from workers.pretrain.sessions import RayTrainSession

    if cfg.get("storage_options") is not None:
        import ray

        cfg = dict(cfg, storage_options=ray.get(cfg["storage_options"]))
    run_loop(cfg, RayTrainSession(), t_enter=t_enter)


# ----------------------------------------------------------------------------- the loop

def run_loop(cfg: dict, session, t_enter: Optional[float] = None) -> None:
    """The training loop on one rank. ``cfg``: {"config": PretrainConfig as JSON (without credentials),
    "run": URI, "manifest": the run's manifest, "storage_options": the StorageOptions with their
    credentials, or None, "launched_at": when the launcher started the workers, or None};
    ``session``: the launcher's side (``workers/pretrain/sessions.py``)."""
    times = {"loop_entered": t_enter or time.time()}  # start-up phases, for the first_step event
    config, loc, manifest = unpack(cfg)
    stop_if_data_damaged(loc, cfg.get("launched_at"))
    size_thread_pool(config, session.device)
    times["imports_done"] = time.time()
    rig = build(config, loc, manifest, session)
    restore(rig, session.latest_checkpoint())
    times["model_built"] = time.time()
    wrap(rig, session)
    times["model_ready"] = time.time()
    monitor = KnnMonitor(rig)
    meter = Meter()

    step, out, images, metrics = rig.start_step, {}, None, {}
    while step < rig.total:
        for batches in micro_batches(rig, step, meter):
            times.setdefault("first_batch", time.time())
            out, images = train_step(rig, step, batches, meter)
            step += 1
            if step == rig.start_step + 1:
                log_first_step(rig, step, times)
            if rig.clock is not None and rig.clock.tick(step - rig.start_step):
                fit_budget(rig, step, images, times["loop_entered"])
            end_of_epoch = step % rig.spe == 0 or step == rig.total
            if step % config.log_every == 0 or end_of_epoch or step % config.checkpoint_every == 0:
                metrics = log_metrics(rig, step, out, meter, monitor if end_of_epoch else None)
            # session.report is a barrier across workers (~1 s under Ray Train here), so it runs only
            # with checkpoints; metrics reach metrics.jsonl and the progress bar without it.
            if step % config.checkpoint_every == 0 or step == rig.total:
                save_checkpoint(rig, session, step, metrics)
                meter.reset()
            if step >= rig.total or step % rig.spe == 0:
                break

    if rig.rank == 0:
        export_final(loc, config, manifest, rig.core, step, rig.total, metrics_rows=rig.log.rows(),
                     execution=rig.ex.as_dict(), budget_plan=rig.budget_plan,
                     loop_seconds=time.time() - times["loop_entered"])


# ----------------------------------------------------------------------------- the steps, in order

def unpack(cfg: dict) -> tuple[PretrainConfig, RunLocation, dict]:
    """The typed config (with the credentials from Ray's object store or the launcher), the run, its manifest."""
    config = PretrainConfig(**cfg["config"])
    if cfg.get("storage_options") is not None:
        config = config.model_copy(update={"storage_options": cfg["storage_options"]})
    return config, RunLocation(cfg["run"], config.storage_options), cfg["manifest"]


def stop_if_data_damaged(loc: RunLocation, launched_at: Optional[float]) -> None:
    """A worker group restarted after a rank found a damaged shard would only find it again: it stops
    here, before building anything, with the same message."""
    if launched_at:
        found = integrity.damaged(loc, since=launched_at, mode="fail")
        if found:
            raise integrity.CorruptShard(found[0]["message"])


def size_thread_pool(config: PretrainConfig, device: torch.device) -> None:
    if device.type == "cpu":
        keep_freed_memory()  # each step's activations reused, not faulted in again (workers/hardware.py)
        # Ray exports OMP_NUM_THREADS for the worker, but torch may have sized its pool before:
        # two workers × all cores each would oversubscribe the machine.
        torch.set_num_threads(config.cpus_per_worker)
    else:
        # the views keep fixed sizes, so cuDNN's autotuner picks each convolution's fastest
        # algorithm once, on the first steps (not run here: no GPU in this project's sessions yet)
        torch.backends.cudnn.benchmark = True


@dataclass
class Rig:
    """What one rank trains with: built by :func:`build`, restored by :func:`restore`, wrapped by :func:`wrap`."""

    config: PretrainConfig
    loc: RunLocation
    manifest: dict
    rank: int
    world: int
    device: torch.device
    ex: Any                      # workers.hardware.Execution: precision and layout on this device
    core: torch.nn.Module        # the objective (backbone inside)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    spe: int                     # steps per epoch
    total: int                   # optimizer steps (with a budget: provisional until measured)
    warmup: int
    lrs: list = field(default_factory=list)
    budget_plan: Optional[dict] = None
    clock: Any = None            # workers.pretrain.budget.StepClock while a budget is being measured
    start_step: int = 0
    resumed_from: Optional[str] = None
    model: Any = None            # core, wrapped by DDP and/or torch.compile
    gen: Optional[torch.Generator] = None
    log: Optional[MetricsLog] = None
    init: Optional[object] = None            # workers.init_weights.InitWeights, when init_from is set

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.ex.precision)


def build(config: PretrainConfig, loc: RunLocation, manifest: dict, session) -> Rig:
    """Precision resolved on this device, the objective with identical initial weights on every rank
    (DDP also broadcasts them), the optimizer, the loss scaler and the schedules."""
    from workers.hardware import resolve_here

    device = session.device
    ex = resolve_here(config.precision, str(device), config.layout_request())
    torch.manual_seed(config.seed)
    init = []
    if config.init_from:
        from workers.init_weights import apply_init

        def load_init(backbone):
            init.append(apply_init(config.init_from, backbone, config.storage_options))
    objective = build_objective(config, manifest["channels"], load_init if config.init_from else None)
    if config.sync_bn and session.world > 1:  # torch's SyncBatchNorm on CUDA; GlobalBatchNorm on CPU
        from ssl_models.sync_bn import convert_sync_batchnorm

        objective = convert_sync_batchnorm(objective, device.type)
    objective = objective.to(device)
    if ex.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optimizer, objective, lr=config.scaled_lr, weight_decay=config.weight_decay,
                                momentum=config.momentum, betas=config.betas)
    scaler = torch.amp.GradScaler(device.type, enabled=ex.grad_scaler)
    spe, total = schedule_length(config, manifest)
    return Rig(config, loc, manifest, session.rank, session.world, device, ex, objective, optimizer, scaler,
               spe, total, warmup=int(config.warmup_epochs * spe), init=init[0] if init else None)


def restore(rig: Rig, checkpoint) -> None:
    """Resume from this run's latest checkpoint (a rerun, or a worker group restarted after a failure);
    then lay the learning-rate schedule over the run's steps (with a time budget: provisionally,
    unless the checkpoint holds the steps chosen before the restart)."""
    config = rig.config
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        rig.core.load_state_dict(state["objective"])
        rig.optimizer.load_state_dict(state["optimizer"])
        rig.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        rig.start_step, rig.resumed_from = int(state["step"]), checkpoint.path
        if config.budget_minutes and state.get("budget_plan"):  # the steps chosen before the restart stand
            rig.budget_plan = dict(state["budget_plan"])
            rig.total = int(rig.budget_plan["steps"])
    rig.lrs = lr_schedule(config.scaled_lr, rig.total, rig.warmup, config.min_lr_ratio)
    if config.budget_minutes and rig.budget_plan is None:
        from workers.pretrain.budget import StepClock

        rig.clock = StepClock()


def wrap(rig: Rig, session) -> None:
    """DDP (and ``torch.compile``) around the objective; the views' generator, seeded by (seed, rank,
    start step) so a resumed run draws fresh but reproducible augmentations; rank 0's metrics log."""
    config = rig.config
    rig.model = session.wrap(rig.core) if rig.world > 1 else rig.core
    if config.compile:
        rig.model = torch.compile(rig.model)
    rig.gen = torch.Generator().manual_seed(config.seed * 1_000_003 + rig.rank * 7919 + rig.start_step)
    if rig.rank == 0:
        rig.log = MetricsLog(rig.loc, rig.start_step)
        if rig.resumed_from:
            rig.log.append({"event": "resumed", "step": rig.start_step, "from": str(rig.resumed_from),
                            "time": time.time()})
        elif rig.init is not None:  # the backbone's starting weights (a resumed run has its checkpoint's)
            rig.log.append({"event": "init_from", "step": 0, "path": rig.init.path, "sha256": rig.init.sha256,
                            "kind": rig.init.kind, "notes": rig.init.notes, "time": time.time()})
        # the driver prints this line (and its warning) before the progress bar
        rig.log.append({"event": "execution", "step": rig.start_step, "execution": rig.ex.as_dict(),
                        "time": time.time()})


class Meter:
    """Loss, samples and time waited on data since the last logged step (rank-local)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t0, self.samples, self.loss_sum, self.losses, self.data_wait = time.perf_counter(), 0, 0.0, 0, 0.0

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


def micro_batches(rig: Rig, step: int, meter: Meter) -> Iterator[list[dict]]:
    """The rest of ``step``'s epoch from this rank's shard stream, ``grad_accum`` batches per optimizer
    step; the time spent waiting on the stream is counted in ``meter``."""
    from workers.data.loader import epoch_batches

    config = rig.config
    epoch, in_epoch = divmod(step, rig.spe)
    batches = epoch_batches(rig.loc, rig.manifest, epoch, rig.spe * config.grad_accum, rank=rig.rank,
                            world_size=rig.world, local_batch=config.local_batch, loader_workers=config.loader_workers,
                            seed=config.seed, skip=in_epoch * config.grad_accum, image_size=config.image_size,
                            pin_memory=rig.device.type == "cuda", on_corrupt=config.on_corrupt)
    group: list[dict] = []
    t_fetch = time.perf_counter()
    for batch in batches:
        meter.data_wait += time.perf_counter() - t_fetch
        group.append(batch)
        if len(group) == config.grad_accum:
            yield group
            group = []
        t_fetch = time.perf_counter()


def train_step(rig: Rig, step: int, batches: list[dict], meter: Meter) -> tuple[dict, torch.Tensor]:
    """One optimizer step: for each micro-batch, views drawn on the device, forward and backward (the
    gradient all-reduce on the last only); a non-finite loss stops every rank at the same step; then
    the learning rate of this step, clipping, the optimizer and the objective's own update (momentum
    encoder, queue, prototypes). Returns the last forward's outputs and images."""
    config, core, model, amp_dtype = rig.config, rig.core, rig.model, rig.amp_dtype
    for micro, batch in enumerate(batches):
        images = batch["clip" if core.modality in ("clip", "audiovisual") else "image"]
        if core.takes_views and batch.get("views"):  # the main clip and the first other camera: (B, 2, T, C, H, W)
            images = torch.stack([images, batch["views"][sorted(batch["views"])[0]]], 1)
        images = images.to(rig.device, non_blocking=True)
        if core.modality == "audiovisual":  # the clips and their sound tracks
            if "audio" not in batch:
                raise ValueError(f"{rig.config.objective} learns from clips with their sound; the run's clips have "
                                 "no sound track (ingest videos that carry one, or moving-fashion-mnist-sound)")
            views = core.make_views({"clip": images, "audio": batch["audio"].to(rig.device, non_blocking=True)},
                                    generator=rig.gen)
        else:
            views = core.make_views(images, generator=rig.gen)
        if rig.ex.channels_last:
            views = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                     for k, v in views.items()}
        if micro == 0:
            core.set_progress(step, rig.total)  # before the forward: schedules inside it see this step
        last = micro == len(batches) - 1
        sync = model.no_sync() if (rig.world > 1 and not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync:
            with torch.autocast(rig.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(views)
            loss = out["loss"]
            # Every rank must learn of a non-finite loss at the same step. The flag is reduced while
            # the backward runs (async), so the step keeps one synchronisation point, the gradient
            # all-reduce; it is checked before the optimizer step. On the device: NCCL reduces CUDA
            # tensors only.
            bad = (~torch.isfinite(loss.detach())).float().reshape(1)
            flag = dist.all_reduce(bad, op=dist.ReduceOp.MAX, async_op=True) if rig.world > 1 else None
            rig.scaler.scale(loss / config.grad_accum).backward()
            if flag is not None:
                flag.wait()
            if bad.item() > 0:
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step} (epoch {step // rig.spe}) on "
                                    f"{'this' if not torch.isfinite(loss.detach()) else 'another'} rank; "
                                    f"the last good checkpoint is kept. Lower lr or use precision=fp32.")
        meter.loss_sum, meter.losses, meter.samples = meter.loss_sum + loss.item(), meter.losses + 1, \
            meter.samples + images.shape[0]
    for g in rig.optimizer.param_groups:
        g["lr"] = rig.lrs[step]
    if config.clip_grad_norm:
        rig.scaler.unscale_(rig.optimizer)
        torch.nn.utils.clip_grad_norm_(core.parameters(), config.clip_grad_norm)
    rig.scaler.step(rig.optimizer)
    rig.scaler.update()
    rig.optimizer.zero_grad(set_to_none=True)
    core.after_step()
    return out, images


def log_first_step(rig: Rig, step: int, times: dict) -> None:
    """Time-to-first-step and how the workers run, for the benchmark (``bench/startup.py``)."""
    if rig.log is not None:
        rig.log.append({"event": "first_step", "step": step, "time": time.time(), "threads": torch.get_num_threads(),
                        "allocator": keep_freed_memory() if rig.device.type == "cpu" else None,
                        **times, "wrapped_as": type(rig.model).__name__,
                        "norm_layers": sorted({type(m).__name__ for m in rig.core.modules()
                                               if "Norm" in type(m).__name__}),
                        "execution": rig.ex.as_dict()})


def fit_budget(rig: Rig, step: int, images: torch.Tensor, t_enter: float) -> None:
    """The first steps are measured: lay the schedule over the steps that fit the time budget (the
    same number on every rank: rank 0's measurements decide)."""
    from workers.pretrain.budget import fit_steps

    # the monitor embeds images: of a clip batch, the middle frames (what the loader gives it of clips)
    frames = images
    while frames.ndim > 4:  # (B, [cameras,] T, C, H, W) → one frame per sample
        frames = frames[:, frames.shape[1] // 2]
    embed_s = _embedding_seconds(rig, frames) if rig.config.knn_monitor else 0.0
    step_s = rig.clock.step_seconds()
    if rig.world > 1:
        m = torch.tensor([step_s, embed_s], dtype=torch.float64, device=rig.device)
        dist.broadcast(m, 0)
        step_s, embed_s = float(m[0]), float(m[1])
    rig.budget_plan = fit_steps(rig.config, rig.spe, step, time.time() - t_enter, step_s, embed_s, rig.world)
    rig.total = rig.budget_plan["steps"]
    rig.lrs = lr_schedule(rig.config.scaled_lr, rig.total, rig.warmup, rig.config.min_lr_ratio)
    rig.clock = None
    if rig.log is not None:
        rig.log.append({"event": "schedule", "step": step, "time": time.time(), **rig.budget_plan})


def log_metrics(rig: Rig, step: int, out: dict, meter: Meter, monitor: Optional["KnnMonitor"]) -> dict:
    """The figures since the last log, reduced over ranks; at epoch ends (``monitor`` given) the kNN
    monitor and the damaged shards skipped so far. Rank 0 appends them to ``metrics.jsonl``."""
    dt = meter.seconds()
    stats = torch.tensor([meter.loss_sum / max(1, meter.losses), meter.samples / dt], device=rig.device)
    if rig.world > 1:
        dist.all_reduce(stats)
    stats = stats.cpu()
    metrics = {"step": step, "epoch": step / rig.spe, "loss": float(stats[0]) / rig.world, "lr": rig.lrs[step - 1],
               "samples_per_s": float(stats[1]), "samples_per_s_per_worker": float(stats[1]) / rig.world,
               "data_wait": meter.data_wait / dt,  # share of rank 0's time waiting on data
               "time": time.time()}
    if rig.device.type == "cuda":  # this rank's peak so far
        metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated(rig.device) / 2**30
    momentum = _momentum_of(rig.core)
    if momentum is not None:
        metrics["momentum"] = momentum
    for k, v in out.items():
        if k != "loss" and (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
            metrics[k] = float(v)
    if monitor is not None:  # on every rank: each embeds a share
        acc = monitor()
        if acc is not None:
            metrics["knn_top1"] = acc
        if rig.config.on_corrupt == "skip" and rig.rank == 0:  # shards the loaders left out so far
            metrics["skipped_shards"] = len(integrity.damaged(rig.loc, mode="skip"))
    if rig.log is not None:
        rig.log.append(metrics)  # the driver's progress bar reads it from there
    meter.reset()
    return metrics


def save_checkpoint(rig: Rig, session, step: int, metrics: dict) -> None:
    """Rank 0 writes the state and the config into a checkpoint the session persists; every rank reports."""
    if rig.rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"objective": rig.core.state_dict(), "optimizer": rig.optimizer.state_dict(),
                    "scaler": rig.scaler.state_dict(), "step": step, "epoch": step // rig.spe,
                    "rng_cpu": torch.get_rng_state(), "training_hash": rig.config.training_hash(),
                    "total_steps": rig.total, "budget_plan": rig.budget_plan},
                   os.path.join(d, "state.pt"))
        with open(os.path.join(d, "config.yaml"), "w") as f:
            f.write(rig.config.to_yaml())
        session.report(metrics, checkpoint_dir=d)


# ----------------------------------------------------------------------------- the kNN monitor

class KnnMonitor:
    """Online kNN top-1 on val: rank 0's answer, None on the others. A collective: every rank calls it
    at the same step and embeds one share of the bank and of the queries (held in memory once)."""

    def __init__(self, rig: Rig):
        m, c = rig.manifest, rig.config
        self.rig, self.sets = rig, None
        self.enabled = bool(c.knn_monitor and m.get("classes") and not m.get("multilabel") and "val" in m["splits"])

    def __call__(self) -> Optional[float]:
        from workers.data.loader import in_memory_split
        from workers.knn import extract_features_sharded, knn_accuracy

        if not self.enabled:
            return None
        rig, c = self.rig, self.rig.config
        if self.sets is None:
            self.sets = (in_memory_split(rig.loc, rig.manifest, "train", c.knn_bank, c.image_size, c.on_corrupt),
                         in_memory_split(rig.loc, rig.manifest, "val", c.knn_queries, c.image_size, c.on_corrupt))
        (bank_x, bank_y), (q_x, q_y) = self.sets
        core = rig.core
        if rig.world > 1:  # rank 0's batch-norm statistics on every rank: all shares see one network
            for b in core.backbone.buffers():
                dist.broadcast(b, 0)
        core.eval()
        fn = lambda x: core.backbone(core.preprocess(x))  # noqa: E731
        with torch.autocast(rig.device.type, dtype=rig.amp_dtype, enabled=rig.amp_dtype is not None):
            fb = extract_features_sharded(fn, bank_x, device=rig.device)
            fq = extract_features_sharded(fn, q_x, device=rig.device)
        core.train()
        if rig.rank != 0:
            return None
        return knn_accuracy(fb, bank_y, fq, q_y, len(rig.manifest["classes"]), k=c.knn_k, temperature=0.07)


# ----------------------------------------------------------------------------- small helpers

def _momentum_of(objective) -> Optional[float]:
    if hasattr(objective, "current_momentum"):
        return float(objective.current_momentum())
    m = getattr(objective, "momentum", None)
    return float(m) if isinstance(m, (int, float)) else None


def _embedding_seconds(rig: Rig, images: torch.Tensor) -> float:
    """Seconds to embed one image for the kNN monitor, measured on this batch (eval mode, no grad)."""
    core = rig.core
    was_training = core.training
    core.eval()
    x = images[:256]
    try:
        with torch.no_grad(), torch.autocast(rig.device.type, dtype=rig.amp_dtype, enabled=rig.amp_dtype is not None):
            core.backbone(core.preprocess(x[:8]))  # warm the kernels for this shape's layout
            t0 = time.perf_counter()
            core.backbone(core.preprocess(x))
            if rig.device.type == "cuda":
                torch.cuda.synchronize(rig.device)
            return (time.perf_counter() - t0) / len(x)
    finally:
        core.train(was_training)
