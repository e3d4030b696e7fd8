"""The run directory of pretraining, checked before any Ray or torch work (this module imports neither).

:func:`prepare_run` reads the manifest, checks that every shard pretraining reads is there with
its size (``workers.data.integrity.check_shards``: one listing), compares the configuration with the
one the run was started with, and says whether the run is fresh, to be resumed, or finished.
``gelato pretrain`` calls it first, so a wrong run fails in about a second, before Prefect's
server or Ray are waited for.
"""
from __future__ import annotations

import json
from typing import Optional

from workers.config import ConfigError, PretrainConfig
from workers.data import integrity
from workers.model import FINAL_DIR, PRETRAIN_PLOT
from workers.storage import RunLocation



def read_json(loc: RunLocation, rel: str) -> Optional[dict]:
    try:
        with loc.fs().open(loc.join(rel), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def prepare_run(loc: RunLocation, config: PretrainConfig, overwrite: bool = False) -> tuple[dict, str]:
    """Check the run before any Ray work. Returns (manifest, status) with status "fresh",
    "resume" or "finished"."""
    from workers.data.manifest import read_manifest

    manifest = read_manifest(loc)
    if manifest is None:
        raise ConfigError(f"{loc.uri}: no manifest.json; run `gelato ingest SOURCE --out {loc.uri}` first")
    if "train" not in manifest["splits"]:
        raise ConfigError(f"{loc.uri}: the manifest has no train split")
    from ssl_models.objectives import OBJECTIVES

    takes, holds = OBJECTIVES[config.objective].modality, manifest.get("modality", "image")
    # an audio-visual objective reads clips (the loop refuses, saying so, clips without a sound track)
    if takes != holds and not (takes == "audiovisual" and holds == "clip"):
        same = sorted(n for n, c in OBJECTIVES.items() if c.modality == holds)
        what = {"clip": "a folder of videos (or moving-fashion-mnist)", "audio": "a folder of audio files (or "
                "spoken-digits)", "audiovisual": "videos with sound (or moving-fashion-mnist-sound)"}.get(takes,
                                                                                                  "a folder of images")
        wants = "clips with their sound" if takes == "audiovisual" else f"{takes}s"
        raise ConfigError(f"{loc.uri} holds {holds}s and objective {config.objective!r} learns from {wants}; "
                          f"{holds} objectives: {', '.join(same)}; or ingest {what} for it")
    # every shard pretraining reads is there, with the manifest's size (one listing, no reads)
    integrity.check_shards(loc, manifest, ["train", "val"] if config.knn_monitor else ["train"])
    fs = loc.fs()
    old = None
    try:
        with fs.open(loc.join("config.yaml"), "r") as f:
            import yaml

            old = PretrainConfig.from_written(yaml.safe_load(f))
    except FileNotFoundError:
        pass
    if overwrite:
        if fs.exists(loc.join("checkpoints")):
            fs.rm(loc.join("checkpoints"), recursive=True)
        for stale in ("metrics.jsonl", PRETRAIN_PLOT):  # nothing left that describes the old training
            if fs.exists(loc.join(stale)):
                fs.rm(loc.join(stale))
        old = None
    status = "fresh"
    if old is not None:
        if old.training_hash() != config.training_hash():
            changed = sorted(k for k, v in config.model_dump().items() if old.model_dump().get(k) != v)
            raise ConfigError(f"{loc.uri} was pretrained with another configuration (differs in: {', '.join(changed)}); "
                              f"rerun with --overwrite to start afresh, or use another --run")
        summary = read_json(loc, f"{FINAL_DIR}/summary.json")
        status = "finished" if summary and summary.get("training_hash") == config.training_hash() else "resume"
    return manifest, status

