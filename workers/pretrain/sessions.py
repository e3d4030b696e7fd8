"""What the pretraining loop needs from whoever started it, and the two launchers that provide it.

The loop (``workers.pretrain.loop.run_loop``) asks five things of its launcher: its rank, the world
size, its device, the latest checkpoint to resume from, and a way to hand over metrics and a new
checkpoint. Two sessions answer them:

- :class:`RayTrainSession`: Ray Train (``gelato pretrain``, locally or on a cluster). Checkpoints
  go through Ray Train's storage as ``RUN/checkpoints/checkpoint_*``; Ray registers one only
  once it is fully persisted.
- :class:`TorchrunSession`: plain ``torch.distributed`` with ``env://`` rendezvous, as ``torchrun``
  sets it up (or one process with none). For machines or schedulers without Ray (``torchrun``
  under Slurm, a single GPU box with PyTorch only); ``workers/pretrain/torchrun.py`` is its entry point.
  Rank 0 writes checkpoints to ``RUN/checkpoints/torchrun/step_<N>/``: the files first, then a
  ``COMPLETE`` marker, and only directories with the marker are ever read, so a checkpoint is
  whole or ignored, on local disk and on S3 alike.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterator, Optional

import torch

from workers.config import ConfigError
from workers.storage import RunLocation

TORCHRUN_DIR = "checkpoints/torchrun"
COMPLETE = "COMPLETE"


def _listing(loc: RunLocation, rel: str) -> list[str]:
    fs, path = loc.fs(), loc.join(rel)
    if loc.is_s3:
        fs.invalidate_cache(path)
    try:
        return [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def check_resumable_by(loc: RunLocation, launcher: str) -> None:
    """Each launcher resumes only the checkpoints it wrote. When a run's checkpoints all come from
    the other one, say so instead of silently starting again from step 0."""
    ray_ckpts = [n for n in _listing(loc, "checkpoints") if n.startswith("checkpoint_")]
    torchrun_ckpts = TorchrunSession.complete_checkpoints(loc)
    if launcher == "torchrun" and ray_ckpts and not torchrun_ckpts:
        raise ConfigError(f"{loc.uri}: its checkpoints were written by Ray Train (`gelato pretrain`), which "
                          f"resumes them; run that again, or pass --overwrite to start afresh under torchrun")
    if launcher == "ray" and torchrun_ckpts and not ray_ckpts:
        raise ConfigError(f"{loc.uri}: its checkpoints were written under torchrun (`python -m workers.torchrun`), "
                          f"which resumes them; run that again, or pass --overwrite to start afresh on Ray")


class RayTrainSession:
    """The loop inside a Ray Train worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        # Ray Train logs every report and checkpoint at INFO (some loggers are named by file path);
        # our metrics.jsonl and progress bar say the same once.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("ray.train") or "/ray/train/" in name:
                logging.getLogger(name).setLevel(logging.WARNING)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self):
        """Ray's ``Checkpoint`` (``.path``, ``.as_directory()``) of this run, or None."""
        import ray.train

        return ray.train.get_checkpoint()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        """Every rank calls this at the same step (a barrier); rank 0 passes the checkpoint."""
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class StoredCheckpoint:
    """A complete ``checkpoints/torchrun/step_<N>/`` directory of a run (local or S3)."""

    def __init__(self, loc: RunLocation, rel: str, step: int):
        self.loc, self.rel, self.step = loc, rel, step

    @property
    def path(self) -> str:
        return self.loc.join(self.rel)

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        if not self.loc.is_s3:
            yield self.path
            return
        with tempfile.TemporaryDirectory() as d:
            fs = self.loc.fs()
            for f in fs.ls(self.path, detail=False):
                fs.get(f, os.path.join(d, os.path.basename(f)))
            yield d


class TorchrunSession:
    """The loop under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``)
    or in one plain process. Joins the process group (NCCL on GPU, gloo on CPU) if the environment
    names a rendezvous and none exists yet."""

    def __init__(self, loc: RunLocation, use_gpu: bool, keep: int = 2):
        import torch.distributed as dist

        self.loc, self.keep = loc, keep
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("use_gpu=true but torch sees no CUDA device here")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if not dist.is_initialized() and (self.world > 1 or "MASTER_ADDR" in os.environ):
            kw = {"device_id": self.device} if self.device.type == "cuda" else {}
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method="env://",
                                    rank=self.rank, world_size=self.world, **kw)
            self.owns_group = True

    def latest_checkpoint(self) -> Optional[StoredCheckpoint]:
        done = self.complete_checkpoints(self.loc)
        return StoredCheckpoint(self.loc, *done[-1]) if done else None

    @staticmethod
    def complete_checkpoints(loc: RunLocation) -> list[tuple[str, int]]:
        """(relative dir, step) of every complete torchrun checkpoint of ``loc``, oldest first."""
        fs, out = loc.fs(), []
        for n in _listing(loc, TORCHRUN_DIR):
            if not (n.startswith("step_") and n[5:].isdigit()):
                continue
            marker = loc.join(f"{TORCHRUN_DIR}/{n}/{COMPLETE}")
            if loc.is_s3:
                fs.invalidate_cache(marker)  # asked of the store, not of a listing cached earlier
            if fs.exists(marker):
                out.append((f"{TORCHRUN_DIR}/{n}", int(n[5:])))
        return sorted(out, key=lambda x: x[1])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        """Rank 0 persists ``checkpoint_dir`` (files, then the marker) and prunes old checkpoints;
        then all ranks meet, as Ray Train's report does."""
        if checkpoint_dir is not None:
            rel = f"{TORCHRUN_DIR}/step_{int(metrics['step']):09d}"
            for name in sorted(os.listdir(checkpoint_dir)):
                with open(os.path.join(checkpoint_dir, name), "rb") as f:
                    self.loc.write_atomic(f"{rel}/{name}", f.read())
            self.loc.write_atomic(f"{rel}/{COMPLETE}", b"")
            fs, done = self.loc.fs(), self.complete_checkpoints(self.loc)
            for old, _ in done[:-self.keep]:
                fs.rm(self.loc.join(f"{old}/{COMPLETE}"))  # unmark first: a half-deleted one is never read
                fs.rm(self.loc.join(old), recursive=True)
            # Unmarked ones are torn writes of an earlier, crashed attempt (rank 0 is the only writer
            # and has just marked its own): never read, so deleted rather than left to pile up.
            marked = {d for d, _ in done} | {rel}
            for n in _listing(self.loc, TORCHRUN_DIR):
                if n.startswith("step_") and f"{TORCHRUN_DIR}/{n}" not in marked:
                    fs.rm(self.loc.join(f"{TORCHRUN_DIR}/{n}"), recursive=True)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
