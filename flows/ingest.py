"""Prefect flow ``ingest``: source → sharded WebDataset archives + manifest.json.

The flow plans on the driver, fans out one task per group of shards (threads: image decoding and
PNG/zlib encoding release the GIL), and writes the manifest last. All logic lives in
``workers/ingest/shards.py``; the tasks here are a few lines each.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.credentials import resolve as resolve_credentials
from flows.retries import retry_on_io
from workers.credentials import StorageOptions
from workers.data import integrity
from workers.ingest.shards import (IngestParams, Progress, ShardResult, ShardSpec, finalize, plan_ingest, plan_repair,
                                   prepare_run, write_shard)
from workers.ingest.sources import Source, open_source
from workers.storage import RunLocation, check_writable

DEFAULT_THREADS = max(2, os.cpu_count() or 2)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=exponential_backoff(2), retry_condition_fn=retry_on_io,
      task_run_name="write-shards-{first}")
def write_shards(loc: RunLocation, source: Source, specs: list[ShardSpec], image_format: str,
                 progress: Optional[Progress], first: str) -> list[ShardResult]:
    """Write a group of shards (each atomic; a retry reuses the ones already published)."""
    fs = loc.fs()
    return [write_shard(loc, source, s, image_format, progress, fs=fs) for s in specs]


def _groups(shards: list[ShardSpec], n_groups: int) -> list[list[ShardSpec]]:
    size = max(1, -(-len(shards) // n_groups))
    return [list(shards[i:i + size]) for i in range(0, len(shards), size)]


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_THREADS), log_prints=False)
def ingest_flow(source: str, out: str, shard_size: int = 1000, image_format: str = "keep",
                val_fraction: Optional[float] = None, seed: int = 0, overwrite: bool = False,
                data_root: Optional[str] = None, kind: str = "auto",
                storage_options: Optional[StorageOptions] = None, progress_bar: bool = True,
                repair: Optional[list[str]] = None, test_fraction: Optional[float] = None,
                clip_frames: int = 16, clip_fps: float = 10.0, clip_size: Optional[int] = None,
                clip_codec: str = "png", audio_rate: int = 16000, audio_seconds: float = 1.0) -> dict:
    """Ingest ``source`` into ``out`` (local path or s3://bucket/prefix); returns the manifest.

    ``repair`` (a finished ingest only): check these shards (``[]``: all) against the manifest and
    rewrite the damaged ones, nothing else."""
    log = get_run_logger()
    params = IngestParams(shard_size, image_format, val_fraction, seed, test_fraction, clip_frames, clip_fps,
                          clip_size, clip_codec, audio_rate, audio_seconds)  # validates before any work
    loc = RunLocation(out, resolve_credentials(storage_options))
    src = open_source(source, data_root=data_root, kind=kind, params=params)
    check_writable(loc)
    plan = plan_ingest(src, params)
    done = prepare_run(loc, plan, overwrite)
    if done is not None and repair is None:
        log.info("%s already holds this ingest (%d samples); nothing to do", out, done["count"])
        return done
    targets, results = list(plan.shards), []
    if done is not None:  # --repair: only the named shards (or all) are checked, only damaged ones rewritten
        targets, results = plan_repair(loc, plan, done, repair)
        log.info("repair: checking %d shard(s) of %s against the manifest", len(targets), out)
    else:
        log.info("ingesting %s (%s, %d files) into %s: %d shards", src.name, src.kind, plan.total, out,
                 len(plan.shards))
    t0 = time.perf_counter()
    progress = Progress(sum(len(s.records) for s in targets), desc=f"ingest {src.name}", bar=progress_bar,
                        unit={"clip": "clip", "audio": "utt"}.get(plan.source.get("modality"), "img"))
    groups = _groups(targets, 4 * DEFAULT_THREADS)
    futures = [write_shards.submit(loc, src, g, params.image_format, progress, g[0].name) for g in groups]
    try:
        for fut in as_completed(futures):
            results.extend(fut.result())
    finally:
        progress.close()
    manifest = finalize(loc, plan, results)
    dt = time.perf_counter() - t0
    reused = sum(r.reused for r in results)
    if done is not None:
        rewritten = sorted(r.name for r in results if not r.reused)
        before, after = integrity.shard_entries(done), integrity.shard_entries(manifest)
        changed = [n for n in rewritten if before.get(n, {}).get("sha256") != after[n]["sha256"]]
        integrity.clear(loc, [s.name for s in targets])
        log.info("repair: rewrote %d damaged shard(s)%s in %.1f s; the other %d checked are intact",
                 len(rewritten), f" ({', '.join(rewritten[:10])})" if rewritten else "", dt,
                 len(targets) - len(rewritten))
        if changed:
            log.warning("repair: %d rewritten shard(s) differ from what the manifest recorded (%s): the source "
                        "changed since the ingest; manifest.json now describes the new content", len(changed),
                        ", ".join(changed[:5]))
        return manifest
    log.info("wrote %d samples in %d shards (%d reused) in %.1f s (%.0f %s/s); %d rejected",
             manifest["count"], len(results), reused, dt, plan.total / dt,
             {"clip": "clips", "audio": "utterances"}.get(manifest.get("modality"), "images"), len(manifest["rejected"]))
    for split, s in manifest["splits"].items():
        log.info("  %-5s %7d samples in %d shards", split, s["count"], len(s["shards"]))
    for r in manifest["rejected"][:20]:
        log.warning("  rejected %s: %s", r["path"], r["reason"])
    return manifest
