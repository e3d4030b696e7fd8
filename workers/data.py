"""The per-worker data stream for pretraining: equal steps on every rank, seeded, resumable.

Each rank reads its own slice of the train shards (``workers.shards.open_split`` splits by rank
and by DataLoader worker, shard order permuted per epoch with the seed). Ranks may hold different
numbers of samples when shards are uneven, so the stream of every rank wraps around within an
epoch until it has produced exactly ``steps_per_epoch × grad_accum`` batches: all ranks take the
same number of steps and DDP never waits on a rank that ran dry.

The batches of training epoch ``e`` depend only on (seed, e, rank), so a run resumed at step
``s`` restarts epoch ``s // steps_per_epoch`` and skips the batches already trained on (decoding
is ~50x faster than training, so skipping is cheap and exact).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from workers.shards import open_split
from workers.storage import RunLocation


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack uint8 images (B, C, H, W) and labels (B,); images of different sizes fail naming the keys."""
    try:
        images = torch.stack([s["image"] for s in samples])
    except RuntimeError:
        sizes = {tuple(s["image"].shape) for s in samples}
        raise ValueError(f"images in one batch differ in size {sorted(sizes)[:4]} (e.g. sample "
                         f"{samples[0]['key']}); set image_size and let the loader resize, or ingest "
                         f"images of one size") from None
    return {"image": images, "label": torch.tensor([s["label"] for s in samples])}


def steps_per_epoch(train_count: int, batch_size: int) -> int:
    if train_count < batch_size:
        raise ValueError(f"the train split has {train_count} samples, fewer than one global batch of {batch_size}; "
                         f"lower batch_size")
    return train_count // batch_size


def epoch_batches(run: RunLocation, manifest: dict, epoch: int, n_batches: int, *, rank: int, world_size: int,
                  local_batch: int, loader_workers: int, seed: int, split: str = "train",
                  skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``n_batches`` batches of ``local_batch`` images for this rank in ``epoch``.

    Passes over the rank's shards (each pass reshuffled) until enough full batches were made;
    the first ``skip`` batches are dropped (resume).
    """
    produced = 0
    for rep in range(1_000_000):
        ds = open_split(run, split, rank=rank, world_size=world_size, num_workers=loader_workers, shuffle=True,
                        seed=seed + 1_000_003 * rep, epoch=epoch, manifest=manifest, shuffle_buffer=4 * local_batch)
        loader = DataLoader(ds, batch_size=local_batch, num_workers=loader_workers, drop_last=True,
                            collate_fn=collate, persistent_workers=False)
        got_any = False
        for batch in loader:
            got_any = True
            if produced >= skip:
                yield batch
            produced += 1
            if produced >= n_batches:
                return
        if not got_any:
            raise ValueError(f"rank {rank} got no full batch of {local_batch} from split {split!r}: its shards hold "
                             f"fewer samples than local_batch; lower batch_size or re-ingest with smaller shards")
    raise RuntimeError("unreachable")


def in_memory_split(run: RunLocation, manifest: dict, split: str, limit: Optional[int] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples of a split as tensors (images uint8 (N, C, H, W), labels (N,)).

    Used for the small fixed sets of the online kNN monitor; reads in shard order, no shuffling.
    """
    images, labels = [], []
    for s in open_split(run, split, manifest=manifest):
        images.append(s["image"])
        labels.append(s["label"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{run.uri}: split {split!r} is empty")
    return torch.stack(images), torch.tensor(labels)
