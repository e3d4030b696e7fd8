"""Shard integrity: every shard's sha256 checked as its bytes stream, damage named with its fix.

``manifest.json`` holds each shard's size and sha256. Reading a shard (``workers.data.stream``) takes
its bytes in one read and hashes them in memory, so the checksum costs no second read; the
digest is compared with the manifest's, and only then are its samples released to the decoders
(one shard in memory per loader worker): no damaged byte reaches a decoder, some of which crash
the process on damaged images. A shard that fails the comparison, or cannot be parsed (a tar
header whose checksum does not add up, a truncated member), raises :class:`CorruptShard`, whose
one-line message names the shard, its expected and actual sha256, and the command that rewrites
only the damaged shards (``gelato ingest ... --repair NAME``). Reading the demo's train split this
way is as fast as the unverified streaming reader before it (``bench/shard_read.py``).

What happens then is the reader's ``on_corrupt``:

* ``fail`` (default): the run stops. The damage is also recorded in ``RUN/damaged_shards/NAME.json``
  so that a launcher whose workers died (Ray reports the first error it sees, often another
  rank's broken connection) can name the shard, and so that retried workers stop at once.
* ``skip``: the damaged shard is left out with a warning, and recorded; the pretraining summary,
  its metrics and the evaluation report count the skipped shards.

``gelato ingest --repair`` removes the records of the shards it rewrote.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from typing import Optional

from workers.storage import RunLocation

DAMAGED_DIR = "damaged_shards"


class CorruptShard(ValueError):
    """A shard that fails its checksum or cannot be parsed.

    Built from its message alone: DataLoader workers hand exceptions to the main process as their
    type and message."""


def shard_entries(manifest: dict) -> dict[str, dict]:
    """Shard name → its manifest entry ({name, count, sha256, bytes}), over every split."""
    return {s["name"]: s for split in manifest.get("splits", {}).values() for s in split.get("shards", [])}


def repair_command(run_uri: str, manifest: dict, names: list[str]) -> str:
    """The ``gelato ingest`` command that rewrites only ``names`` (the source and parameters of the manifest)."""
    src, params = manifest.get("source", {}), manifest.get("params", {})
    if src.get("kind") == "fashion-mnist":
        words = ["gelato", "ingest", "fashion-mnist", "--data-root", src.get("path", "")]
    else:
        words = ["gelato", "ingest", src.get("path", "SOURCE"), "--kind", src.get("kind", "auto")]
    words += ["--out", run_uri]
    for flag, key in (("--shard-size", "shard_size"), ("--image-format", "image_format"),
                      ("--val-fraction", "val_fraction"), ("--seed", "seed")):
        if params.get(key) is not None:
            words += [flag, str(params[key])]
    words += ["--repair", *names]
    cmd = " ".join(shlex.quote(w) for w in words)
    return cmd + (" [--config YOUR.yaml]" if "://" in run_uri else "")


def damage_message(url: str, reason: str, expected: Optional[str], actual: Optional[str], fix: str) -> str:
    return (f"shard {url} is damaged: {reason}; sha256 expected {expected or '(not in the manifest)'}, "
            f"actual {actual or '(unreadable)'}. Rewrite only the damaged shard(s) with: {fix}")


def record(loc: RunLocation, name: str, message: str, expected: Optional[str], actual: Optional[str],
           mode: str) -> None:
    """Write ``RUN/damaged_shards/NAME.json`` (best effort: the error itself is what matters)."""
    body = {"shard": name, "message": message, "expected_sha256": expected, "actual_sha256": actual,
            "on_corrupt": mode, "time": time.time(), "pid": os.getpid()}
    try:
        loc.write_atomic(f"{DAMAGED_DIR}/{name}.json", json.dumps(body, indent=1))
    except Exception:  # noqa: BLE001 - a read-only run must still get the error itself
        pass


def damaged(loc: RunLocation, since: Optional[float] = None, mode: Optional[str] = None) -> list[dict]:
    """The damage records of a run (newest last), optionally only those written since ``since`` / in ``mode``."""
    fs = loc.fs()
    out = []
    try:
        paths = fs.glob(loc.join(DAMAGED_DIR, "*.json"))
    except (FileNotFoundError, OSError):
        return []
    for p in paths:
        try:
            with fs.open(p, "r") as f:
                rec = json.load(f)
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            continue
        if (since is None or rec.get("time", 0) >= since) and (mode is None or rec.get("on_corrupt") == mode):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time", 0))


def clear(loc: RunLocation, names: list[str]) -> None:
    """Remove the damage records of shards that were rewritten."""
    fs = loc.fs()
    for n in names:
        try:
            fs.rm(loc.join(DAMAGED_DIR, f"{n}.json"))
        except (FileNotFoundError, OSError):
            pass


def check_shards(loc: RunLocation, manifest: dict, splits: Optional[list[str]] = None) -> None:
    """Pre-flight: every shard of ``splits`` (default: all) exists with the manifest's size.

    One listing of the shard folder (local or S3), no reads; raises :class:`CorruptShard` naming
    the missing or resized shards and the command that rewrites them."""
    from workers.data.manifest import SHARD_DIR

    fs = loc.fs()
    try:
        if loc.is_s3:
            fs.invalidate_cache(loc.join(SHARD_DIR))
        listing = {os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                   for e in fs.ls(loc.join(SHARD_DIR), detail=True)}
    except FileNotFoundError:
        listing = {}
    wanted = [s for name, split in manifest.get("splits", {}).items() if splits is None or name in splits
              for s in split.get("shards", [])]
    missing = [s["name"] for s in wanted if s["name"] not in listing]
    resized = [(s["name"], s.get("bytes"), listing[s["name"]]) for s in wanted
               if s["name"] in listing and s.get("bytes") is not None and listing[s["name"]] != s["bytes"]]
    if not missing and not resized:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} shard(s) missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if resized:
        n, want, got = resized[0]
        parts.append(f"{len(resized)} shard(s) of the wrong size ({n}: {got} bytes, the manifest says {want}"
                     f"{'; ...' if len(resized) > 1 else ''})")
    names = missing + [r[0] for r in resized]
    raise CorruptShard(f"{loc.join(SHARD_DIR)}: {' and '.join(parts)}. Rewrite them with: "
                       f"{repair_command(loc.uri, manifest, names)}")
