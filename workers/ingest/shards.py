"""Ingest's writing of sharded WebDataset archives: planning, writing (resumable, atomic), repair.

:func:`plan_ingest` lists the source and cuts every split into shards of ``shard_size`` records
(deterministically: the same source and parameters give the same plan). :func:`write_shard`
writes one shard: each record is decoded in full (a bad file is rejected with its reason, never
a crash), encoded, and appended to a tar written under a temporary name that is renamed into
place only when complete (locally), or uploaded as one object that appears only when the upload
completes (S3). A small state file per finished shard (``<run>/.ingest/<shard>.json``) records
its sha256 and the digest of its plan, so a killed ingest rerun with the same arguments keeps
the published shards whose sha256 still match and writes the rest. :func:`finalize` writes
``manifest.json`` last; an ingest is complete exactly when the manifest exists.

Reading them back is ``workers/data/stream.py``; the manifest's name and reader are in
``workers/data/manifest.py``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Optional

from workers.data.images import GRAY_MODES, IMAGE_FORMATS, RejectedImage
from workers.data.manifest import FORMAT, MANIFEST, SHARD_DIR, read_manifest
from workers.data.tarformat import add_member
from workers.ingest.sources import Record, Source
from workers.storage import RunLocation

STATE_DIR = ".ingest"


class IngestError(RuntimeError):
    """The ingest cannot go on (nothing valid, conflicting existing run, ...)."""


@dataclass(frozen=True)
class IngestParams:
    """What ``gelato ingest`` was asked to do; part of the manifest, so reruns can be compared."""

    shard_size: int = 1000
    image_format: str = "keep"
    val_fraction: Optional[float] = None  # None: 0.1 where the source has no val split, else 0
    seed: int = 0
    test_fraction: Optional[float] = None  # None: 0.1 for a labelled source with train but no test split, else 0
    # video sources: each video becomes one clip of clip_frames frames at clip_fps, resized to
    # clip_size × clip_size (None: as decoded), stored with clip_codec: png frames, ffv1 or h264 (workers/data/clips.py)
    clip_frames: int = 16
    clip_fps: float = 10.0
    clip_size: Optional[int] = None
    clip_codec: str = "png"
    # audio sources: resampled to audio_rate Hz, mono; files longer than 1.5 × audio_seconds cut into
    # segments of audio_seconds; the loader centres every utterance in audio_seconds (workers/data/audio.py)
    audio_rate: int = 16000
    audio_seconds: float = 1.0

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.test_fraction is not None and not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if (self.val_fraction or 0.0) + (self.test_fraction or 0.0) >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}")
        if self.clip_frames < 1 or self.clip_fps <= 0 or (self.clip_size is not None and self.clip_size < 8):
            raise ValueError(f"clip_frames must be >= 1, clip_fps > 0 and clip_size >= 8, got {self.clip_frames}, "
                             f"{self.clip_fps}, {self.clip_size}")
        if self.audio_rate < 1000 or self.audio_seconds <= 0.05:
            raise ValueError(f"audio_rate must be >= 1000 Hz and audio_seconds > 0.05, got {self.audio_rate}, "
                             f"{self.audio_seconds}")
        from workers.data.clips import CLIP_CODECS

        if self.clip_codec not in CLIP_CODECS:
            raise ValueError(f"clip_codec must be one of {', '.join(CLIP_CODECS)}, got {self.clip_codec!r}")


@dataclass(frozen=True)
class ShardSpec:
    """One shard to write: its split, name and the records (with their sample keys) it holds."""

    split: str
    index: int
    keys: tuple[str, ...]
    records: tuple[Record, ...]
    digest: str  # what the shard's content depends on; a stored shard is reused only if it matches

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class ShardResult:
    split: str
    name: str
    count: int
    sha256: str
    bytes: int
    modes: dict[str, int] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    reused: bool = False


@dataclass(frozen=True)
class IngestPlan:
    source: dict[str, Any]
    fingerprint: str
    params: IngestParams
    classes: Optional[list[str]]
    multilabel: bool
    shards: tuple[ShardSpec, ...]

    @property
    def total(self) -> int:
        return sum(len(s.records) for s in self.shards)

    def splits(self) -> list[str]:
        return list(dict.fromkeys(s.split for s in self.shards))


CLIP_DEFAULTS = {f.name: f.default for f in fields(IngestParams) if f.name.startswith("clip_")}
AUDIO_DEFAULTS = {f.name: f.default for f in fields(IngestParams) if f.name.startswith("audio_")}


def comparable(params: dict) -> dict:
    """Ingest parameters as reruns compare them: a ``test_fraction`` of 0, and clip and audio settings at
    their defaults, are the same ingest as one made before those parameters existed."""
    defaults = CLIP_DEFAULTS | AUDIO_DEFAULTS
    return {k: v for k, v in params.items() if not (k == "test_fraction" and not v)
            and not (k in defaults and v == defaults[k])}


def _hold_out(splits: dict, name: str, frac: float, rng: random.Random) -> None:
    """Move a seeded ``frac`` of ``train`` into split ``name``."""
    train = splits["train"]
    order = list(range(len(train)))
    rng.shuffle(order)
    held = set(order[:int(round(frac * len(train)))])
    splits[name] = [train[i] for i in sorted(held)]
    splits["train"] = [r for i, r in enumerate(train) if i not in held]


def plan_ingest(source: Source, params: IngestParams) -> IngestPlan:
    """Cut each split into shards; take a seeded ``test`` (where the source has none) and then a
    seeded ``val`` from ``train``, where asked."""
    splits = source.splits()
    tfrac = params.test_fraction
    if tfrac is None:
        # a labelled source without a test split gets one: evaluation reports on test
        tfrac = 0.1 if source.classes and "train" in splits and "test" not in splits else 0.0
    if tfrac > 0:
        if "test" in splits:
            raise IngestError(f"source {source.name!r} has its own test split; use --test-fraction 0")
        if "train" not in splits:
            raise IngestError(f"source {source.name!r} has no train split to take test from")
        _hold_out(splits, "test", tfrac, random.Random(f"test-{params.seed}"))
    frac = params.val_fraction
    if frac is None:
        frac = 0.0 if "val" in splits else 0.1
    if frac > 0:
        if "val" in splits:
            raise IngestError(f"source {source.name!r} has its own val split; use --val-fraction 0")
        if "train" not in splits:
            raise IngestError(f"source {source.name!r} has no train split to take val from")
        _hold_out(splits, "val", frac, random.Random(params.seed))
    fingerprint = source.fingerprint()
    # the shards' digests: a test_fraction of 0 leaves those of ingests made before it existed as they were
    params_d = comparable(asdict(params) | {"val_fraction": frac, "test_fraction": tfrac})
    specs = []
    for split in [s for s in ("train", "val", "test") if s in splits] + sorted(set(splits) - {"train", "val", "test"}):
        records = splits[split]
        for i in range(math.ceil(len(records) / params.shard_size)):
            chunk = records[i * params.shard_size:(i + 1) * params.shard_size]
            keys = tuple(f"{split}_{i * params.shard_size + j:08d}" for j in range(len(chunk)))
            h = hashlib.sha256(json.dumps([FORMAT, fingerprint, params_d, split, i], sort_keys=True).encode())
            for r in chunk:
                h.update(f"{r.path}\0{r.label}\0{r.labels}\n".encode())
            specs.append(ShardSpec(split, i, keys, tuple(chunk), h.hexdigest()))
    return IngestPlan(source.describe(), fingerprint, replace(params, val_fraction=frac, test_fraction=tfrac),
                      list(source.classes) if source.classes else None, source.multilabel, tuple(specs))


class _HashingWriter:
    """File-like wrapper that hashes and counts what passes through ."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass


def _state_path(loc: RunLocation, spec: ShardSpec) -> str:
    return loc.join(STATE_DIR, spec.name + ".json")


def sha256_of(fs, path: str) -> str:
    """A file's sha256 from a read of its own (the shard reader hashes as it streams instead)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stored_result(loc: RunLocation, fs, spec: ShardSpec) -> Optional[ShardResult]:
    """A published shard's result from its state file, trusted without reading the shard."""
    try:
        with fs.open(_state_path(loc, spec), "r") as f:
            state = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    if state.get("digest") != spec.digest or not fs.exists(loc.join(SHARD_DIR, spec.name)):
        return None
    return ShardResult(**(state["result"] | {"reused": True}))


def _reusable(loc: RunLocation, fs, spec: ShardSpec) -> Optional[ShardResult]:
    """The stored result of a shard published by an earlier run, if the shard still matches it."""
    stored = _stored_result(loc, fs, spec)
    path = loc.join(SHARD_DIR, spec.name)
    if stored is None or fs.size(path) != stored.bytes or sha256_of(fs, path) != stored.sha256:
        return None
    return stored


def write_shard(loc: RunLocation, source: Source, spec: ShardSpec, image_format: str,
                progress: Optional[Callable[[int], None]] = None, fs=None) -> ShardResult:
    """Write one shard atomically, or reuse it if an earlier run already published it intact."""
    fs = fs or loc.fs()
    reused = _reusable(loc, fs, spec)
    if reused is not None:
        if progress:
            progress(len(spec.records))
        return reused
    final = loc.join(SHARD_DIR, spec.name)
    # Locally: a hidden temporary name in the same folder, renamed when complete. On S3 the object
    # only becomes visible when the upload completes, so the final key is written directly.
    tmp = final if loc.is_s3 else loc.join(SHARD_DIR, f".{spec.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    result = ShardResult(spec.split, spec.name, 0, "", 0)
    try:
        _write_records(fs, tmp, source, spec, image_format, result, progress)
    except OSError as e:
        if not loc.is_s3 and os.path.exists(tmp):
            os.remove(tmp)  # nothing half-written stays behind, even under its hidden name
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(loc, f"shard {spec.name}") from None
        raise
    if not loc.is_s3:
        os.replace(tmp, final)
    elif not fs.exists(final):  # s3fs uploads on close; make sure the object really exists
        raise IngestError(f"shard {final} was written but is not visible on S3 after upload")
    # Atomic: a crash while the state is written must not leave a state file that reads as empty.
    try:
        loc.write_atomic(f"{STATE_DIR}/{spec.name}.json", json.dumps({"digest": spec.digest, "result": asdict(result)}),
                         fs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(loc, f"the state of shard {spec.name}") from None
        raise
    return result


def _no_space(loc: RunLocation, what: str) -> IngestError:
    """Disk full: not retried (it is not a hiccup), and the published shards are kept for the rerun."""
    try:
        free = f"{shutil.disk_usage(loc.uri).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return IngestError(f"no space left on the device holding {loc.uri} while writing {what} ({free}); the shards "
                       f"published so far are complete and kept: free some space (or choose another --out) and "
                       f"rerun the same command to go on")


def _write_records(fs, tmp: str, source: Source, spec: ShardSpec, image_format: str, result: ShardResult,
                   progress: Optional[Callable[[int], None]]) -> None:
    """Encode ``spec``'s records into a tar at ``tmp``; fills ``result`` (count, modes, rejected, sha256, bytes)."""
    pending = 0
    with fs.open(tmp, "wb") as raw:
        hw = _HashingWriter(raw)
        for key, rec in zip(spec.keys, spec.records):
            try:
                enc = source.encode(rec, image_format)
            except RejectedImage as e:
                result.rejected.append({"path": rec.path, "reason": str(e)})
            except OSError as e:
                result.rejected.append({"path": rec.path, "reason": f"unreadable: {e.strerror or e}"})
            else:
                # One sample = image (or clip, with its extra views and masks), optional .cls, .json:
                # appended to the tar stream in one write.
                meta = {"source": rec.path, "mode": enc.mode, "size": list(enc.size)} | enc.meta
                sample = io.BytesIO()
                add_member(sample, f"{key}.{enc.ext}", enc.data)
                for ext, data in enc.extras.items():
                    add_member(sample, f"{key}.{ext}", data)
                if rec.label is not None:
                    meta["label"] = rec.label
                    add_member(sample, f"{key}.cls", str(rec.label).encode())
                if rec.labels is not None:
                    meta["labels"] = list(rec.labels)
                    meta["difficult"] = list(rec.difficult or ())
                add_member(sample, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                hw.write(sample.getvalue())
                result.count += 1
                result.modes[enc.mode] = result.modes.get(enc.mode, 0) + 1
            pending += 1
            if progress and pending >= 64:
                progress(pending)
                pending = 0
        hw.write(b"\0" * 1024)  # end-of-archive marker
    if progress and pending:
        progress(pending)
    result.sha256, result.bytes = hw.sha.hexdigest(), hw.n


def plan_repair(loc: RunLocation, plan: IngestPlan, manifest: dict,
                names: Optional[list[str]] = None) -> tuple[list[ShardSpec], list[ShardResult]]:
    """What ``gelato ingest --repair`` rewrites: (shards to check and rewrite, results kept as they are).

    ``names``: the damaged shards an error named; empty or None: every shard. A shard outside
    ``names`` keeps its stored result (no read), unless its state file or the shard is missing.
    :func:`write_shard` checks each target's size and sha256 and rewrites only those that differ;
    shards are deterministic, so a rewritten one gets its manifest sha256 back."""
    known = {s.name for s in plan.shards}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise IngestError(f"--repair: no shard named {', '.join(unknown)} in {loc.uri} "
                          f"(shards look like {plan.shards[0].name if plan.shards else 'train-000000.tar'})")
    fs = loc.fs()
    targets, kept = [], []
    for spec in plan.shards:
        stored = None if (not names or spec.name in names) else _stored_result(loc, fs, spec)
        if stored is None:
            targets.append(spec)
        else:
            kept.append(stored)
    return targets, kept


def prepare_run(loc: RunLocation, plan: IngestPlan, overwrite: bool = False) -> Optional[dict]:
    """Get the run directory ready. Returns the existing manifest when this exact ingest is done.

    A finished ingest with other parameters or another source is refused unless ``overwrite``;
    ``overwrite`` removes the shards, the state files and the manifest and starts afresh.
    Leftover temporary files of a killed run are removed.
    """
    fs = loc.fs()
    existing = read_manifest(loc)
    if overwrite:
        for sub in (SHARD_DIR, STATE_DIR):
            if fs.exists(loc.join(sub)):
                fs.rm(loc.join(sub), recursive=True)
        if existing is not None:
            fs.rm(loc.join(MANIFEST))
        existing = None
    if existing is not None:
        same = (existing.get("source", {}).get("fingerprint") == plan.fingerprint
                and comparable(existing.get("params") or {}) == comparable(asdict(plan.params)))
        if same:
            return existing
        raise IngestError(
            f"{loc.uri} already holds a finished ingest of {existing.get('source', {}).get('name')!r} with "
            f"parameters {existing.get('params')}; rerun with --overwrite to replace it, or choose another --out")
    if not loc.is_s3:
        os.makedirs(loc.join(SHARD_DIR), exist_ok=True)
        os.makedirs(loc.join(STATE_DIR), exist_ok=True)
        for sub in (SHARD_DIR, STATE_DIR):
            for fn in os.listdir(loc.join(sub)):
                if fn.startswith(".") and ".tmp-" in fn:
                    os.remove(loc.join(sub, fn))
    return None


def finalize(loc: RunLocation, plan: IngestPlan, results: list[ShardResult]) -> dict:
    """Check the results, write ``manifest.json`` (last, atomically) and return it."""
    by_name = {r.name: r for r in results}
    missing = [s.name for s in plan.shards if s.name not in by_name]
    if missing:
        raise IngestError(f"{len(missing)} shards were not written (first: {missing[0]})")
    ordered = [by_name[s.name] for s in plan.shards]
    rejected = [rej for r in ordered for rej in r.rejected]
    total = sum(r.count for r in ordered)
    if total == 0:
        raise IngestError(f"no valid sample in source {plan.source.get('path')}: all {len(rejected)} files were "
                          f"rejected (first: {rejected[0]['path'] if rejected else '-'}: "
                          f"{rejected[0]['reason'] if rejected else 'the source is empty'})")
    modes: dict[str, int] = {}
    for r in ordered:
        for m, n in r.modes.items():
            modes[m] = modes.get(m, 0) + n
    splits: dict[str, dict] = {}
    for r in ordered:
        s = splits.setdefault(r.split, {"count": 0, "shards": []})
        s["count"] += r.count
        s["shards"].append({"name": r.name, "count": r.count, "sha256": r.sha256, "bytes": r.bytes})
    modality = plan.source.get("modality", "image")
    params = asdict(plan.params)
    if modality != "clip":  # an image ingest's manifest reads as before clips existed
        params = {k: v for k, v in params.items() if k not in CLIP_DEFAULTS}
    if modality not in ("audio", "clip"):  # a clip's sound track is resampled to audio_rate
        params = {k: v for k, v in params.items() if k not in AUDIO_DEFAULTS}
    manifest = {
        "format": FORMAT,
        "source": plan.source | {"fingerprint": plan.fingerprint},
        "params": params,
        "classes": plan.classes,
        "multilabel": plan.multilabel,
        "channels": 1 if set(modes) <= GRAY_MODES or modality == "audio" else 3,
        "modes": dict(sorted(modes.items())),
        "count": total,
        "splits": splits,
        "rejected": rejected,
    }
    if modality == "clip":
        p = plan.params
        manifest["modality"] = "clip"
        manifest["clip"] = {"frames": p.clip_frames, "fps": p.clip_fps, "size": p.clip_size, "codec": p.clip_codec}
    if modality == "audio":
        p = plan.params
        manifest["modality"] = "audio"
        manifest["audio"] = {"sample_rate": p.audio_rate, "seconds": p.audio_seconds,
                             "samples": int(round(p.audio_rate * p.audio_seconds)), "codec": "flac"}
    fs = loc.fs()
    # Shards a different earlier plan left behind would confuse anyone listing the folder.
    keep = {r.name for r in ordered}
    for path in fs.glob(loc.join(SHARD_DIR, "*.tar")):
        if os.path.basename(path) not in keep:
            fs.rm(path)
    try:
        loc.write_atomic(MANIFEST, json.dumps(manifest, indent=1, sort_keys=False), fs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(loc, MANIFEST) from None
        raise
    return manifest


class Progress:
    """Thread-safe sample counter with an optional tqdm bar (samples/s) on the terminal."""

    def __init__(self, total: int, desc: str = "ingest", bar: bool = True, unit: str = "img"):
        self.total, self.done, self.lock, self.t0 = total, 0, threading.Lock(), time.perf_counter()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.t0)


def ingest(loc: RunLocation, source: Source, params: IngestParams, overwrite: bool = False,
           threads: Optional[int] = None, progress_bar: bool = True) -> dict:
    """The whole ingest without Prefect (threads); the flow in ``flows/ingest.py`` does the same
    with one Prefect task per group of shards."""
    from concurrent.futures import ThreadPoolExecutor

    plan = plan_ingest(source, params)
    done = prepare_run(loc, plan, overwrite)
    if done is not None:
        return done
    progress = Progress(plan.total, bar=progress_bar)
    try:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            results = list(pool.map(lambda s: write_shard(loc, source, s, params.image_format, progress), plan.shards))
    finally:
        progress.close()
    return finalize(loc, plan, results)
