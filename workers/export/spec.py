"""What a user needs to feed an exported backbone: written beside every export as ``<out>.json``.

A gelato backbone takes ``uint8`` images turned into floats in [0, 1], resized to the run's
``image_size`` and normalised with the mean and standard deviation its training views used
(``Objective.preprocess``), and returns one feature vector per image. The spec records exactly
that, read from the objective rebuilt from the run's config, so it cannot drift from what
evaluation feeds the backbone.
"""
from __future__ import annotations

from workers.config import PretrainConfig
from workers.model import build_objective


def input_spec(payload: dict) -> dict:
    """Architecture, input and normalisation of a saved backbone (the JSON written beside an export)."""
    config = PretrainConfig.model_validate(payload["config"])
    objective = build_objective(config, payload.get("image_channels", payload["in_channels"]))
    cfg = getattr(objective, "view_config", None)
    mean, std = (cfg.mean, cfg.std) if cfg is not None else ((0.5,), (0.5,))
    channels = int(payload["in_channels"])
    expand = (lambda v: [float(x) for x in (list(v) * channels if len(v) == 1 else v)])  # noqa: E731
    return {
        "architecture": payload["backbone_name"],
        "backbone_params": dict(payload["backbone_params"]),
        "in_channels": channels,
        "image_size": int(payload["image_size"]),
        "feature_dim": int(payload["feature_dim"]),
        "mean": expand(mean),
        "std": expand(std),
        "preprocessing": "uint8 image / 255, resized to image_size x image_size (bilinear), then (x - mean) / std "
                         "per channel; input (B, in_channels, image_size, image_size) float32 -> (B, feature_dim)",
        "objective": payload.get("objective"),
        "steps": payload.get("steps"),
        "training_hash": payload.get("training_hash"),
    }
