"""Loading the checkpoint to evaluate, and refusing one that does not belong to the run.

Two kinds are accepted:

* ``checkpoints/final/backbone.pt`` (the default), written by ``workers.pretrain.export.export_final``:
  backbone weights plus the pretraining config;
* a Ray Train checkpoint ``checkpoints/checkpoint_*/state.pt`` (or its folder): the whole
  objective's state dict; its config is the ``config.yaml`` saved beside it, else the run's.

Either way the objective is rebuilt from the config with ``build_objective`` and its
``preprocess`` (un-augmented, normalised as in training) is what feature extraction uses.
A checkpoint trained on another number of channels than the run's images, or with another
backbone than the run's ``config.yaml``, fails with an error naming both.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import yaml

from workers.config import ConfigError, PretrainConfig
from workers.model import BACKBONE_FILE, build_objective
from workers.storage import RunLocation


class CheckpointMismatch(ConfigError):
    """The checkpoint cannot be evaluated on this run (other channels, other backbone)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt objective (backbone + preprocess) and where it came from."""

    uri: str
    sha256: str             # of the file's bytes: the key of the feature cache
    kind: str               # "backbone" (backbone.pt) or "ray" (state.pt)
    config: PretrainConfig
    objective: torch.nn.Module
    steps: Optional[int]

    @property
    def backbone(self) -> torch.nn.Module:
        return self.objective.backbone

    @property
    def short_hash(self) -> str:
        return self.sha256[:16]


def resolve(loc: RunLocation, path: Optional[str] = None, fs=None) -> str:
    """The checkpoint file's URI: ``path`` as given, or relative to the run, or the run's final backbone.

    A folder (a Ray checkpoint) resolves to the ``state.pt`` (or ``backbone.pt``) inside it.
    """
    fs = fs or loc.fs()
    if path is None:
        uri = loc.join(BACKBONE_FILE)
        if not fs.exists(uri):
            raise FileNotFoundError(f"{loc.uri}: no {BACKBONE_FILE}; run `gelato pretrain --run {loc.uri}` "
                                    f"first, or pass --checkpoint PATH")
        return uri
    candidates = [path] if ("://" in path or os.path.isabs(path)) else [path, loc.join(path)]
    for c in candidates:
        cfs = _fs_for(c, loc, fs)
        if cfs.isdir(c):
            for name in ("state.pt", "backbone.pt"):
                inner = c.rstrip("/") + "/" + name
                if cfs.exists(inner):
                    return inner
            raise FileNotFoundError(f"checkpoint folder {c!r} holds neither state.pt nor backbone.pt")
        if cfs.exists(c):
            return c
    raise FileNotFoundError(f"checkpoint {path!r} not found (looked at {', '.join(candidates)})")


def _fs_for(uri: str, loc: RunLocation, run_fs=None):
    """The run's filesystem for a URI on the same kind of storage, else a fresh one for it."""
    from workers.storage import filesystem

    same_kind = uri.startswith("s3://") if loc.is_s3 else "://" not in uri
    if run_fs is not None and same_kind:
        return run_fs
    return filesystem(uri, loc.storage_options)


def _first_conv_channels(state: dict[str, torch.Tensor], prefix: str) -> Optional[int]:
    """Input channels of the first 4-D weight under ``prefix`` (the stem conv / patch embedding)."""
    for k, v in state.items():
        if k.startswith(prefix) and torch.is_tensor(v) and v.ndim == 4:
            return int(v.shape[1])
    return None


def _describe(name: str, params: dict) -> str:
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"


def _run_config(loc: RunLocation, fs) -> Optional[PretrainConfig]:
    try:
        with fs.open(loc.join("config.yaml"), "r") as f:
            return PretrainConfig.from_written(yaml.safe_load(f))
    except FileNotFoundError:
        return None


def _check(uri: str, loc: RunLocation, fs, manifest: dict, config: PretrainConfig, backbone_in: Optional[int]) -> None:
    """The checkpoint's backbone input channels (``backbone_in``) against what its objective makes of
    the run's images (colorization objectives feed the L channel of RGB images), and its backbone
    against the run's config.yaml."""
    have = int(manifest["channels"])
    if backbone_in is not None and backbone_in != _backbone_channels(config.objective, have):
        trained = (f"was trained on {backbone_in}-channel images" if _backbone_channels(config.objective, 3) == 3 else
                   f"has a {backbone_in}-channel backbone ({config.objective} feeds it the L channel of RGB images)")
        raise CheckpointMismatch(
            f"checkpoint {uri} {trained} but run {loc.uri} holds "
            f"{have}-channel images (manifest.json); evaluate it on a run of the same kind of images")
    run_cfg = _run_config(loc, fs)
    if run_cfg is None:
        return  # a checkpoint from elsewhere evaluated on a freshly ingested run: nothing to compare
    params = lambda c: {k: v for k, v in c.backbone_params.items() if k != "image_size"}  # noqa: E731
    if (config.backbone, params(config)) != (run_cfg.backbone, params(run_cfg)):
        raise CheckpointMismatch(
            f"checkpoint {uri} holds backbone {_describe(config.backbone, params(config))} but run {loc.uri} "
            f"was configured with {_describe(run_cfg.backbone, params(run_cfg))} (config.yaml); "
            f"pass the checkpoint of this run")


def _backbone_channels(objective: str, image_channels: int) -> Optional[int]:
    """The channels ``objective`` feeds its backbone from images of ``image_channels``; None where it refuses them."""
    from ssl_models.objectives import OBJECTIVES

    try:
        return OBJECTIVES[objective].backbone_channels(image_channels)
    except ValueError:
        return None


def load(loc: RunLocation, manifest: dict, path: Optional[str] = None, fs=None) -> Checkpoint:
    """Resolve, read, check against the run, and rebuild the objective with the checkpoint's weights.

    ``fs``: the run's filesystem, reused (a fresh s3fs instance costs a round of set-up)."""
    fs = fs or loc.fs()
    uri = resolve(loc, path, fs)
    with _fs_for(uri, loc, fs).open(uri, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    try:
        obj: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {uri} cannot be read as a torch checkpoint: {e}") from None
    if isinstance(obj, dict) and "backbone" in obj and "backbone_name" in obj:
        config = PretrainConfig.from_written(obj["config"])
        _check(uri, loc, fs, manifest, config, int(obj["in_channels"]))
        objective = build_objective(config, int(manifest["channels"]))  # the run's images, as in pretraining
        objective.backbone.load_state_dict(obj["backbone"])
        if "objective_state" in obj:  # an audio-visual objective: its audio sub-network and projections
            objective.load_state_dict(obj["objective_state"])
        return Checkpoint(uri, sha, "backbone", config, objective.eval(), obj.get("steps"))
    if isinstance(obj, dict) and "objective" in obj:
        config = _sibling_config(uri, loc, fs) or _run_config(loc, fs)
        if config is None:
            raise ConfigError(f"checkpoint {uri}: no config.yaml beside it nor in {loc.uri}; cannot rebuild the model")
        _check(uri, loc, fs, manifest, config, _first_conv_channels(obj["objective"], "backbone."))
        objective = build_objective(config, int(manifest["channels"]))
        objective.load_state_dict(obj["objective"])
        return Checkpoint(uri, sha, "ray", config, objective.eval(), obj.get("step"))
    raise ConfigError(f"{uri} is not a gelato checkpoint (neither a backbone.pt nor a Ray Train state.pt)")


def _sibling_config(uri: str, loc: RunLocation, fs) -> Optional[PretrainConfig]:
    path = uri.rsplit("/", 1)[0] + "/config.yaml" if "/" in uri else "config.yaml"
    try:
        with _fs_for(path, loc, fs).open(path, "r") as f:
            return PretrainConfig.from_written(yaml.safe_load(f))
    except FileNotFoundError:
        return None
