"""Backbones as the configs name them: built for training, checked before any run starts, loaded back.

* :func:`build_objective` — backbone + objective exactly as a :class:`~workers.config.PretrainConfig`
  says; the same call on every rank, at export, and for the evaluation's random-init baseline.
* :func:`check_buildable` — that call once on the driver (torch's meta device), so a parameter value
  the constructors refuse fails in about a second, naming the config's fields.
* :func:`load_backbone` — the exported ``checkpoints/final/backbone.pt`` rebuilt as a module;
  :func:`load_for_features` — that, with the input preprocessing it was trained with.

torch is imported inside the functions: the run's file names below are read by torch-free code
(``workers/pretrain/run_dir.py``, the command line's checks).
"""
from __future__ import annotations

import io
from typing import Optional

from workers.config import ConfigError, PretrainConfig

FINAL_DIR = "checkpoints/final"                  # what pretraining exports and evaluation loads
BACKBONE_FILE = f"{FINAL_DIR}/backbone.pt"
PRETRAIN_PLOT = "plots/pretrain.png"            # the pretraining's curves; drawn at its end, linked by the report


def build_objective(config: PretrainConfig, in_channels: int, init_backbone=None):
    """Backbone + objective exactly as the config says (the same call on every rank and at export).
    ``init_backbone(backbone)`` loads starting weights (``init_from``) before the objective is built
    around the backbone, so momentum copies (BYOL's target, MoCo's key encoder) start from them too."""
    from ssl_models import backbones, objectives

    backbone_kw = dict(config.backbone_params)
    if fixed_input_size(config.backbone):
        backbone_kw.setdefault("image_size", config.image_size)
    channels = objectives.OBJECTIVES[config.objective].backbone_channels(in_channels)
    backbone = backbones.build(config.backbone, in_channels=channels, **backbone_kw)
    if init_backbone is not None:
        init_backbone(backbone)
    return objectives.build(config.objective, backbone=backbone, image_size=config.image_size,
                            **config.objective_kwargs())


def fixed_input_size(backbone: str) -> bool:
    """Whether the backbone is built for one input size (a ViT's position embeddings): its builder
    takes ``image_size``, which it gets from the config."""
    import inspect

    from ssl_models import backbones

    return "image_size" in inspect.signature(backbones.BACKBONES[backbone]).parameters


def check_buildable(config: PretrainConfig, in_channels: int = 3) -> None:
    """Build the objective once, on the driver, before any Ray or Prefect work: a parameter value the
    constructors refuse fails here, in about a second, naming the config's fields (names were
    checked by the config itself). On torch's meta device (no memory), or on the CPU for the few
    objectives whose constructors compute with tensors."""
    import torch

    try:
        try:
            with torch.device("meta"):
                build_objective(config, in_channels)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
            build_objective(config, in_channels)
    except Exception as e:  # noqa: BLE001 - whatever a constructor raises, the user's values caused it
        given = {k: v for k, v in (("backbone_params", config.backbone_params),
                                   ("objective_params", config.objective_params),
                                   ("view", config.view and config.view.given())) if v}
        raise ConfigError(f"{config.objective} / {config.backbone} cannot be built with "
                          f"{', '.join(f'{k}={v}' for k, v in given.items()) or 'these settings'} "
                          f"(image_size={config.image_size}): {type(e).__name__}: {e}") from None


def backbone_path(run_or_file: str) -> str:
    """The ``backbone.pt`` of a run (``RUN``), or the file given (``.../backbone.pt``)."""
    from workers.storage import RunLocation

    return run_or_file if run_or_file.endswith(".pt") else RunLocation(run_or_file).join(BACKBONE_FILE)


def read_backbone(path_or_uri: str, storage_options: Optional[dict] = None) -> bytes:
    """The bytes of a saved backbone; a missing one is named with the command that makes it."""
    from workers.storage import filesystem

    try:
        with filesystem(path_or_uri, storage_options).open(path_or_uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path_or_uri}: no pretrained backbone here; run `gelato pretrain` first") from None


def load_backbone(path_or_uri: str, storage_options: Optional[dict] = None, data: Optional[bytes] = None):
    """Rebuild the exported backbone (weights_only load) from its file, or from ``data``, its bytes
    already read. Returns (backbone, payload)."""
    import torch

    from ssl_models import backbones

    if data is None:
        data = read_backbone(path_or_uri, storage_options)
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = backbones.build(payload["backbone_name"], in_channels=payload["in_channels"], **payload["backbone_params"])
    model.load_state_dict(payload["backbone"])
    return model, payload


def load_for_features(path_or_uri: str, storage_options: Optional[dict] = None, data: Optional[bytes] = None):
    """The saved backbone in eval mode, the preprocessing its training views used
    (``Objective.preprocess``: uint8 (B, C, H, W) -> normalised float at ``image_size``), and the payload."""
    backbone, payload = load_backbone(path_or_uri, storage_options, data)
    config = PretrainConfig.model_validate(payload["config"])
    objective = build_objective(config, payload.get("image_channels", payload["in_channels"]))
    return backbone.eval(), objective.preprocess, payload
