"""Reading shards back: a split of a run as a WebDataset stream, written out stage by stage.

Node splitting is explicit (rank/world_size passed in, not discovered), DataLoader-worker
splitting happens inside each loader worker, shard order is permuted per epoch with the seed,
and a split with fewer shards than ranks × loader workers is refused (the case that hangs
distributed training with webdataset).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Iterator, Optional

from workers.data import integrity
from workers.data.images import decode_bytes, native_decoder
from workers.data.manifest import MANIFEST, SHARD_DIR, read_manifest
from workers.data.tarformat import TarFormatError, iter_members
from workers.storage import RunLocation

ON_CORRUPT = ("fail", "skip")


def shard_urls(loc: RunLocation, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise KeyError(f"{loc.uri}: split {split!r} not in the manifest (have {sorted(manifest['splits'])})")
    return [loc.join(SHARD_DIR, s["name"]) for s in manifest["splits"][split]["shards"]]


def open_split(run: str | RunLocation, split: str, *, rank: int = 0, world_size: int = 1,
               num_workers: int = 0, shuffle: bool = False, seed: int = 0, epoch: int = 0,
               shuffle_buffer: int = 1000, manifest: Optional[dict] = None, on_corrupt: str = "fail"):
    """A split of a run as an ``IterableDataset`` of ``{"key", "image" (C,H,W) uint8, "label"}``.

    Every shard's sha256 is checked against the manifest as its bytes stream (``workers.data.integrity``),
    and its samples are released only once it passed; a damaged shard raises
    :class:`~workers.data.integrity.CorruptShard`, or with ``on_corrupt="skip"`` is left out and recorded.

    Node splitting is explicit (``rank``/``world_size``, not discovered), DataLoader-worker
    splitting happens inside each worker; with ``shuffle`` the shard order is permuted with
    ``seed + epoch`` (identically on every rank, before splitting) and samples pass a buffer.
    Refuses when the split has fewer shards than ``world_size × max(1, num_workers)``, the case
    that makes webdataset hang distributed training.
    """
    import webdataset as wds

    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    loc = run if isinstance(run, RunLocation) else RunLocation(run)
    manifest = manifest or read_manifest(loc)
    if manifest is None:
        raise FileNotFoundError(f"{loc.uri}: no {MANIFEST}; run `gelato ingest ... --out {loc.uri}` first")
    urls = shard_urls(loc, manifest, split)
    needed = world_size * max(1, num_workers)
    if len(urls) < needed:
        raise ValueError(
            f"{loc.uri}: split {split!r} has {len(urls)} shards but {world_size} ranks × "
            f"{max(1, num_workers)} loader workers need at least {needed}; re-ingest with a smaller "
            f"--shard-size, or use fewer workers")
    return wds.DataPipeline(
        # 1. every rank sees the same, per-epoch-permuted shard list ...
        _ShardList(urls, shuffle, seed + epoch),
        # 2. ... and keeps its own slice; 3. each DataLoader worker keeps a slice of that.
        _split_by_rank(rank, world_size),
        _split_by_loader_worker,
        # 4. open each shard through fsspec (one filesystem per process: s3fs is not fork-safe).
        _open_with_fsspec(loc.storage_options),
        # 5. tar members grouped into samples by key, each shard's sha256 checked as it streams.
        _VerifiedSamples(loc, manifest, on_corrupt),
        # 6. sample-level shuffle buffer (seeded), then decode to tensors.
        *( [wds.shuffle(shuffle_buffer, rng=random.Random(seed + epoch + 7919 * rank))] if shuffle else [] ),
        wds.map(SampleDecoder(manifest)),
    )


def _iterable_dataset_base():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class _ShardList(_iterable_dataset_base()):
    def __init__(self, urls: list[str], shuffle: bool, seed: int):
        self.urls, self.shuffle, self.seed = list(urls), shuffle, seed

    def __iter__(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed).shuffle(urls)
        for u in urls:
            yield {"url": u}


def _split_by_rank(rank: int, world_size: int):
    def stage(src):
        for i, item in enumerate(src):
            if i % world_size == rank:
                yield item
    return stage


def _split_by_loader_worker(src):
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
    for i, item in enumerate(src):
        if i % n == wid:
            yield item


def _open_with_fsspec(storage_options: dict):
    def stage(src):
        from workers.storage import filesystem

        fs = None
        for sample in src:
            url = sample["url"]
            fs = fs or filesystem(url, storage_options)
            with fs.open(url, "rb") as stream:
                yield {"url": url, "stream": stream}
    return stage


def group_samples(members, url: str) -> Iterator[dict]:
    """Tar members → samples {"__key__", "__url__", ext: bytes, ...}, grouped by key."""
    current = None
    for name, data in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1:].lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        current[ext] = data
    if current is not None:
        yield current


class _VerifiedSamples:
    """{url, stream} → samples, with the shard's bytes hashed on their way to the tar reader.

    A shard is read whole (hashed as it streams in) and its samples are released only when its
    sha256 matches the manifest's: no byte of a damaged shard reaches a decoder (torchvision's PNG
    decoder crashes the process on some damaged images, where no exception could name the shard).
    The cost is one shard in memory per loader worker. An intact shard is parsed without checking
    its tar headers (its bytes are the ones ingest wrote); a damaged one is parsed with the checks,
    to say where the damage is. A damaged shard raises :class:`~workers.data.integrity.CorruptShard`
    (``fail``) or yields nothing (``skip``)."""

    def __init__(self, loc: RunLocation, manifest: dict, on_corrupt: str):
        self.loc, self.manifest, self.on_corrupt = loc, manifest, on_corrupt
        self.entries = integrity.shard_entries(manifest)

    def __call__(self, src) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            entry = self.entries.get(url.rsplit("/", 1)[-1], {})
            raw = item["stream"].read()  # the whole shard in one read, hashed in memory
            expected, actual = entry.get("sha256"), hashlib.sha256(raw).hexdigest()
            intact = expected is not None and actual == expected
            problem = None
            try:  # the bytes of an intact shard are what ingest wrote: their headers need no checking
                held = list(group_samples(iter_members(io.BytesIO(raw), url, check_headers=not intact), url))
            except TarFormatError as e:
                problem, held = str(e), []
            if problem is None and expected is not None and not intact:
                problem = "its bytes do not match the manifest's checksum"
                if entry.get("bytes") is not None and len(raw) != entry["bytes"]:
                    problem += f" ({len(raw)} bytes, the manifest says {entry['bytes']})"
            del raw
            if problem is not None and self._damaged(url, problem, expected, actual):
                continue
            yield from held

    def _damaged(self, url: str, reason: str, expected: Optional[str], actual: Optional[str]) -> bool:
        """Record the damage; True to skip the shard, else raise :class:`CorruptShard`."""
        name = url.rsplit("/", 1)[-1]
        msg = integrity.damage_message(url, reason, expected, actual,
                                       integrity.repair_command(self.loc.uri, self.manifest, [name]))
        integrity.record(self.loc, name, msg, expected, actual, self.on_corrupt)
        if self.on_corrupt == "skip":
            import warnings

            warnings.warn(f"skipping {msg}", stacklevel=2)
            return True
        raise integrity.CorruptShard(msg)


class SampleDecoder:
    """Raw tar members → ``{"key", "image" uint8 (C, H, W), "label" int (-1: none), "labels"?, "difficult"?}``."""

    def __init__(self, manifest: dict):
        self.channels = int(manifest.get("channels", 3))
        self.multilabel = bool(manifest.get("multilabel"))
        self.n_classes = len(manifest.get("classes") or [])
        self.clips = manifest.get("modality") == "clip"
        self.audio = (manifest.get("audio") or {}).get("samples") if manifest.get("modality") == "audio" else None

    def __call__(self, sample: dict) -> dict:
        import torch

        if self.clips:
            return self._clip(sample)
        if self.audio:
            return self._audio(sample)

        ext = next((k for k in _FAST_EXTS + _OTHER_EXTS if k in sample), None)
        if ext is None:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")
        try:
            image = self._decode(sample[ext], ext)
        except Exception as e:  # the shard matched its checksum: the image was written this way
            raise ValueError(f"cannot decode sample {sample.get('__key__')} in {sample.get('__url__')} "
                             f"({type(e).__name__}: {e}); its shard is intact, so re-ingest with "
                             f"--image-format png") from e
        out = {"key": sample["__key__"], "image": image,
               "label": int(sample["cls"]) if "cls" in sample else -1}
        if self.multilabel:
            meta = json.loads(sample["json"])
            target = torch.zeros(self.n_classes)
            target[list(meta.get("labels", []))] = 1.0
            out["labels"] = target
            difficult = torch.zeros(self.n_classes, dtype=torch.bool)  # VOC: present only as "difficult"
            difficult[list(meta.get("difficult", []))] = True
            out["difficult"] = difficult
        return out

    def _clip(self, sample: dict) -> dict:
        """``{"key", "clip" uint8 (T, C, H, W), "image" (its middle frame), "label", "views": {name: clip},
        "masks": {view: (T, H, W)}, "info": the source's labels, "audio": float32 (1, L) its sound track}``
        (views, masks, info, audio where the sample has them)."""
        import io

        import numpy as np
        import torch

        from workers.data.clips import clip_from_members, clip_views

        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        clip = torch.from_numpy(clip_from_members(sample, self.channels, "", where))
        # "image", the middle frame: what the image protocols (kNN monitor, evaluation) read of a clip
        out = {"key": sample["__key__"], "clip": clip, "image": clip[len(clip) // 2],
               "label": int(sample["cls"]) if "cls" in sample else -1}
        views = {v: torch.from_numpy(clip_from_members(sample, self.channels, v, where))
                 for v in clip_views(sample) if v}
        if views:
            out["views"] = views
        if "masks.npz" in sample:
            with np.load(io.BytesIO(sample["masks.npz"])) as m:
                out["masks"] = {k: torch.from_numpy(v) for k, v in m.items()}
        if "audio.flac" in sample:  # the clip's sound track: float32 (1, L)
            from workers.data.audio import AudioError, read

            try:
                out["audio"] = torch.from_numpy(read(sample["audio.flac"])[0].copy())[None]
            except AudioError as e:
                raise ValueError(f"{where}: its sound track cannot be decoded ({e})") from None
        if "json" in sample:
            info = json.loads(sample["json"]).get("info")
            if info is not None:
                out["info"] = info
        return out

    def _audio(self, sample: dict) -> dict:
        """``{"key", "image": float32 (1, L) the utterance centred in the ingest's ``audio_seconds``,
        "label", "info"}`` (``image``: the slot every protocol reads; ``ssl_models.audio``)."""
        import torch

        from workers.data.audio import AudioError, fit_length, read

        try:
            x, _ = read(sample["flac"])
        except (KeyError, AudioError) as e:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no readable .flac "
                             f"member ({e})") from None
        out = {"key": sample["__key__"], "image": torch.from_numpy(fit_length(x, int(self.audio)).copy())[None],
               "label": int(sample["cls"]) if "cls" in sample else -1}
        if "json" in sample:
            info = json.loads(sample["json"]).get("info")
            if info is not None:
                out["info"] = info
        return out

    def _decode(self, data: bytes, ext: str):
        """uint8 (C, H, W): torchvision's C++ decoders for PNG/JPEG/WebP, Pillow for the rest and 16-bit."""
        import torch

        decode = native_decoder() if ext in _FAST_EXTS else None
        if decode is not None:
            img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), 1 if self.channels == 1 else 3, False)
            if img.dtype == torch.uint8 and img.shape[0] == self.channels:  # not 16-bit; WebP has no gray mode
                return img
        arr = decode_bytes(data, self.channels)                   # (H, W, C) via Pillow
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (C, H, W)


# torchvision 0.29 deprecates its decoders in favour of torchcodec, but they are the fastest we
# have for small images (~9x Pillow on 28 px PNGs); the Pillow path above is the fallback.
_FAST_EXTS = ("png", "jpg", "jpeg", "webp")
_OTHER_EXTS = ("bmp", "tif", "tiff", "gif", "ppm")
