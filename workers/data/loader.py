"""The per-worker data stream for pretraining: equal steps on every rank, seeded, resumable.

Each rank reads its own slice of the train shards (``workers.data.stream.open_split`` splits by rank
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

from workers.data.stream import open_split
from workers.storage import RunLocation


def fit_size(image: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """uint8 (C, H, W) → (C, size, size): shorter side resized to ``size`` (antialiased), then a
    centre crop. Images already ``size``×``size`` pass untouched; ``size=None`` keeps every image;
    audio (float (1, L), fitted to its length by the decoder) passes untouched."""
    if size is None or image.ndim == 2 or tuple(image.shape[-2:]) == (size, size):
        return image
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


class Collate:
    """Stack uint8 images (B, C, H, W) and labels (B,), fitting each image to ``size`` first, so
    sources with mixed image sizes (VOC, photo folders) batch; runs in the loader workers."""

    def __init__(self, size: Optional[int] = None):
        self.size = size

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        images = [fit_size(s["image"], self.size) for s in samples]
        try:
            stacked = torch.stack(images)
        except RuntimeError:
            sizes = sorted({tuple(i.shape) for i in images})
            raise ValueError(f"images in one batch differ in size {sizes[:4]} (e.g. sample {samples[0]['key']}); "
                             f"set image_size so the loader resizes them") from None
        out = {"image": stacked, "label": torch.tensor([s["label"] for s in samples])}
        if "clip" in samples[0]:  # a clip run: the clips too, (B, T, C, H, W), each frame fitted alike
            out["clip"] = torch.stack([fit_size(s["clip"], self.size) for s in samples])
            views = sorted(samples[0].get("views") or {})
            if views and all(sorted(s.get("views") or {}) == views for s in samples):  # other cameras
                out["views"] = {v: torch.stack([fit_size(s["views"][v], self.size) for s in samples]) for v in views}
            if all("audio" in s for s in samples):  # sound tracks, (B, 1, L)
                out["audio"] = torch.stack([s["audio"] for s in samples])
        return out


collate = Collate()


def steps_per_epoch(train_count: int, batch_size: int) -> int:
    if train_count < batch_size:
        raise ValueError(f"the train split has {train_count} samples, fewer than one global batch of {batch_size}; "
                         f"lower batch_size")
    return train_count // batch_size


def epoch_batches(run: RunLocation, manifest: dict, epoch: int, n_batches: int, *, rank: int, world_size: int,
                  local_batch: int, loader_workers: int, seed: int, split: str = "train",
                  skip: int = 0, image_size: Optional[int] = None,
                  pin_memory: bool = False, on_corrupt: str = "fail") -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``n_batches`` batches of ``local_batch`` images for this rank in ``epoch``.

    Passes over the rank's shards (each pass reshuffled) until enough full batches were made;
    the first ``skip`` batches are dropped (resume). ``pin_memory`` (for a CUDA device) puts the
    batches in page-locked memory, so that ``.to(device, non_blocking=True)`` copies them while the
    GPU still computes.
    """
    produced = 0
    for rep in range(1_000_000):
        ds = open_split(run, split, rank=rank, world_size=world_size, num_workers=loader_workers, shuffle=True,
                        seed=seed + 1_000_003 * rep, epoch=epoch, manifest=manifest, shuffle_buffer=4 * local_batch,
                        on_corrupt=on_corrupt)
        loader = DataLoader(ds, batch_size=local_batch, num_workers=loader_workers, drop_last=True,
                            collate_fn=Collate(image_size), persistent_workers=False, pin_memory=pin_memory)
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


def in_memory_split(run: RunLocation, manifest: dict, split: str, limit: Optional[int] = None,
                    image_size: Optional[int] = None, on_corrupt: str = "fail") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples of a split as tensors (images uint8 (N, C, H, W), labels (N,)).

    Used for the small fixed sets of the online kNN monitor; reads in shard order, no shuffling.
    """
    images, labels = [], []
    for s in open_split(run, split, manifest=manifest, on_corrupt=on_corrupt):
        images.append(fit_size(s["image"], image_size))
        labels.append(s["label"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{run.uri}: split {split!r} is empty")
    return torch.stack(images), torch.tensor(labels)


def load_split(run: RunLocation, manifest: dict, split: str, limit: Optional[int] = None,
               size: Optional[int] = None, on_corrupt: str = "fail") -> dict:
    """A whole split in memory, with every target the evaluation stage needs.

    Returns ``{"key": list[str], "image": uint8 (N, C, H, W), "label": (N,) int64 (-1: unlabelled),
    "labels": (N, K) float multi-hot or None, "difficult": (N, K) bool or None}`` (the last two
    for multi-label sources). A clip run adds ``"clip"`` uint8 (N, T, C, S, S) (``image`` is its
    middle frame), ``"view"`` (the first other camera, like ``clip``, or None unless every clip has
    one), ``"masks"`` uint8 (N, T, H, W) of the main view at the stored size (or None), ``"info"``
    (each clip's labels), ``"item"`` (N,) the middle frame's item class (:func:`frame_item`) and
    ``"audio"`` float32 (N, 1, L), the clips' sound tracks (or None unless every clip has one).
    An audio run's ``image`` is float32 (N, 1, L), the utterances, with ``"info"`` (each one's labels
    for evaluation, e.g. its voice).
    Images are fitted to ``size × size`` as the training loader does
    (:func:`fit_size`; sources such as VOC hold images of many sizes); with ``size=None`` every
    image must have the same size. Reads in shard order, no shuffling, so the same run always
    gives the same order.
    """
    keys, images, labels, multi, difficult = [], [], [], [], []
    clips: dict[str, list] = {"clip": [], "view": [], "masks": [], "info": []}
    for s in open_split(run, split, manifest=manifest, on_corrupt=on_corrupt):
        keys.append(s["key"])
        images.append(fit_size(s["image"], size))
        labels.append(s["label"])
        if "labels" in s:
            multi.append(s["labels"])
            difficult.append(s["difficult"])
        if "clip" in s:
            _add_clip(clips, s, size)
        elif "info" in s:
            clips["info"].append(s["info"])
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"{run.uri}: split {split!r} is empty")
    batch = collate([{"key": k, "image": im, "label": 0} for k, im in zip(keys, images)])
    out = {"key": keys, "image": batch["image"], "label": torch.tensor(labels, dtype=torch.long),
           "labels": torch.stack(multi) if multi else None,
           "difficult": torch.stack(difficult) if difficult else None}
    if clips["clip"]:
        out |= _stack_clips(clips, run.uri, split)
    elif len(clips["info"]) == len(keys):  # audio: each utterance's labels for evaluation (e.g. the voice)
        out["info"] = clips["info"]
    return out


def _add_clip(acc: dict, sample: dict, size: Optional[int]) -> None:
    """One clip sample's frames (fitted to ``size``), first other view, main-view masks and info."""
    acc["clip"].append(fit_size(sample["clip"], size))
    views = sample.get("views") or {}
    acc["view"].append(fit_size(views[min(views)], size) if views else None)
    acc["masks"].append((sample.get("masks") or {}).get("main"))
    acc["info"].append(sample.get("info") or {})
    acc.setdefault("audio", []).append(sample.get("audio"))


def frame_item(info: dict, masks: Optional[torch.Tensor], frame: int) -> int:
    """The item class a frame shows: of the item covering most pixels of frame ``frame`` in the
    masks (0 background, i + 1 item i), else of the clip's first item; -1 where the clip lists none.
    ``info["classes"]`` lists the clip's item classes (``moving-fashion-mnist``: Fashion-MNIST's)."""
    items = info.get("classes") or []
    if not items:
        return -1
    if masks is not None:
        counts = torch.bincount(masks[frame].flatten().long(), minlength=len(items) + 1)[1:len(items) + 1]
        if int(counts.max()) > 0:
            return int(items[int(counts.argmax())])
    return int(items[0])


def _stack_clips(acc: dict, uri: str, split: str) -> dict:
    """The clip entries of :func:`load_split`'s dict (see there)."""
    try:
        clip = torch.stack(acc["clip"])
    except RuntimeError:
        raise ValueError(f"{uri}: clips of split {split!r} differ in length or size "
                         f"{sorted({tuple(c.shape) for c in acc['clip']})[:4]}; set image_size") from None
    mid = clip.shape[1] // 2
    out = {"clip": clip, "info": acc["info"],
           "item": torch.tensor([frame_item(i, m, mid) for i, m in zip(acc["info"], acc["masks"])]),
           "view": None, "masks": None}
    if all(v is not None and v.shape == c.shape for v, c in zip(acc["view"], acc["clip"])):
        out["view"] = torch.stack(acc["view"])
    if all(m is not None for m in acc["masks"]) and len({tuple(m.shape) for m in acc["masks"]}) == 1:
        out["masks"] = torch.stack(acc["masks"])
    sounds = acc.get("audio") or []
    out["audio"] = torch.stack(sounds) if sounds and all(a is not None for a in sounds) else None
    return out
