"""The pretraining configuration: typed, validated before any work starts, written to the run.

A config is a YAML file of the fields of :class:`PretrainConfig`, plus ``key=value`` overrides
from the command line (dotted keys reach into the parameter dicts:
``objective_params.temperature=0.2``, ``view.scale=[0.3,1.0]``). Unknown keys and ill-typed
values fail naming the key; objective and backbone parameters are checked against the signature
of the class or function they go to, so a typo in ``objective_params`` fails too.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from workers.credentials import StorageOptions, strip_secrets


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


# The registries' names (ssl_models.objectives.OBJECTIVES, ssl_models.backbones.BACKBONES), spelled
# out so that importing this module does not import torch (validating a config does, to check the
# parameters against the constructors); tests/test_configs.py checks they match.
ObjectiveName = Literal["contrastive", "triplet", "simclr", "moco", "byol", "swav", "cpc", "autoencoder",
                        "denoising_autoencoder", "mae", "rotation", "relative_position", "jigsaw", "colorization",
                        "arrow_of_time", "shuffle_and_learn", "temporal_order", "tcn", "composite_lstm", "igpt",
                        "cycle_consistency", "colorization_tracking", "apc", "cpc_audio", "wav2vec2", "pase",
                        "av_correspondence"]
BackboneName = Literal["small_cnn", "resnet18", "resnet50", "vit_tiny", "vit_small", "igpt_tiny", "audio_conv",
                       "audio_cpc", "audio_transformer", "audio_apc"]


class ViewParams(BaseModel):
    """Augmentation overrides: the fields of ``ssl_models.augment.ViewConfig`` one wants to change.

    A field left out keeps the objective's own default (each objective has its own views, e.g. BYOL's
    two); tests/test_configs.py checks these fields against ViewConfig's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Optional[int] = Field(None, ge=1, description="output side, pixels")
    scale: Optional[tuple[float, float]] = Field(None, description="crop area fraction (min, max)")
    ratio: Optional[tuple[float, float]] = Field(None, description="crop aspect ratio (min, max)")
    flip_p: Optional[float] = Field(None, ge=0, le=1)
    brightness: Optional[float] = Field(None, ge=0)
    contrast: Optional[float] = Field(None, ge=0)
    saturation: Optional[float] = Field(None, ge=0)
    hue: Optional[float] = Field(None, ge=0, le=0.5)
    jitter_p: Optional[float] = Field(None, ge=0, le=1)
    grayscale_p: Optional[float] = Field(None, ge=0, le=1)
    blur_p: Optional[float] = Field(None, ge=0, le=1)
    sigma: Optional[tuple[float, float]] = None
    solarize_p: Optional[float] = Field(None, ge=0, le=1)
    solarize_threshold: Optional[float] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def given(self) -> dict[str, Any]:
        """The overrides as given (what the objective's ``view`` argument takes)."""
        return self.model_dump(exclude_none=True)


DEFAULT_BACKBONE = "resnet18"
# gelato's default network: a narrow ResNet-18 with a stem for small images (28-32 px). These
# belong to the default backbone only: choosing another brings that backbone's own defaults.
DEFAULT_BACKBONE_PARAMS = {"small_stem": True, "width": 32}


class PretrainConfig(BaseModel):
    """Everything ``gelato pretrain`` needs. Defaults: SimCLR, narrow ResNet-18, 28 px, CPU."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to learn
    objective: ObjectiveName = "simclr"
    objective_params: dict[str, Any] = Field(default_factory=dict)
    backbone: BackboneName = DEFAULT_BACKBONE
    backbone_params: dict[str, Any] = Field(
        default_factory=dict, description="the backbone's constructor arguments; when not given, the default "
                                          "backbone gets gelato's small-image defaults and any other its own")
    image_size: int = Field(28, ge=8)
    view: Optional[ViewParams] = Field(None, description="augmentation overrides (ssl_models.augment.ViewConfig "
                                                        "fields); the rest keep the objective's defaults")

    # how long and how big
    batch_size: int = Field(256, ge=2, description="global batch size, all workers together")
    epochs: float = Field(10, gt=0)
    steps: Optional[int] = Field(None, ge=1, description="total optimizer steps; overrides epochs")
    budget_minutes: Optional[float] = Field(
        None, gt=0, description="train for as many steps as fit in this many minutes of the training loop, measured on "
                                "the first steps; replaces epochs (which is then not used) and excludes steps; the "
                                "schedule is laid over those steps (workers.pretrain.budget)")
    grad_accum: int = Field(1, ge=1)

    # optimisation
    optimizer: Literal["sgd", "adamw", "lars"] = "lars"
    lr: float = Field(0.3, gt=0, description="base learning rate for a batch of 256")
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: Optional[float] = Field(None, gt=0)

    # execution
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    loader_workers: int = Field(1, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it (else fp16 + grad scaler), bf16 on a CPU with native "
                            "bf16, else fp32 (workers.hardware)")
    channels_last: Union[bool, Literal["auto"]] = Field("auto", description="auto: on CPU, and on GPU at bf16/fp16")
    compile: bool = False
    sync_bn: bool = Field(False, description="batch norm over the global batch (all workers)")
    seed: int = 0
    init_from: Optional[str] = Field(
        None, description="start the backbone from these weights instead of random ones: a gelato run, a "
                          "backbone.pt, a torchvision/timm export, or a torchvision ResNet state dict "
                          "(workers/init_weights.py); a resumed run continues from its checkpoint")

    # bookkeeping
    log_every: int = Field(20, ge=1)
    loggers: tuple[Literal["tensorboard", "mlflow"], ...] = Field(
        (), description="experiment trackers fed from metrics.jsonl's rows by the driver (workers/tracking.py; "
                        "pip install 'gelato[tracking]')")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="a shard that fails its sha256 or cannot be parsed: fail (stop, naming it and the fix) or "
                            "skip it (counted in metrics.jsonl and summary.json; workers.data.integrity)")
    knn_monitor: bool = True
    knn_k: int = Field(20, ge=1)
    knn_bank: int = Field(5000, ge=10, description="train samples in the online kNN feature bank")
    knn_queries: int = Field(2000, ge=10, description="val samples scored by the online kNN monitor")
    storage_options: StorageOptions = Field(default_factory=StorageOptions,
                                            description="s3fs options; credentials in it are never written "
                                                        "(workers.credentials)")

    @classmethod
    def from_written(cls, raw: dict) -> "PretrainConfig":
        """A config read back from a file gelato wrote (config.yaml, a checkpoint, backbone.pt): any
        credential an older version wrote there is dropped, never used (``workers.credentials``)."""
        raw = dict(raw or {})
        raw["storage_options"] = strip_secrets(raw.get("storage_options"))
        return cls(**raw)

    @model_validator(mode="before")
    @classmethod
    def _backbone_brings_its_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backbone_params") is None:
            data = dict(data)
            default = data.get("backbone", DEFAULT_BACKBONE) == DEFAULT_BACKBONE
            data["backbone_params"] = dict(DEFAULT_BACKBONE_PARAMS) if default else {}
        return data

    @field_validator("init_from")
    @classmethod
    def _init_from_absolute(cls, path: Optional[str]) -> Optional[str]:
        """A local path made absolute where it is given: Ray's workers may start in another folder."""
        if path is None or "://" in path:
            return path
        return os.path.abspath(os.path.expanduser(path))

    @field_serializer("view")
    def _view_as_given(self, view: Optional[ViewParams], info) -> Optional[dict[str, Any]]:
        # only the fields given, as before the view was typed: config.yaml and training_hash unchanged
        return None if view is None else view.model_dump(mode=info.mode, exclude_none=True)

    @model_validator(mode="after")
    def _check_params(self) -> "PretrainConfig":
        from ssl_models import backbones, objectives

        _check_kwargs("objective_params", objectives.OBJECTIVES[self.objective].__init__, self.objective_params,
                      reserved={"self", "backbone", "image_size", "in_channels", "view"})
        _check_kwargs("backbone_params", backbones.BACKBONES[self.backbone], self.backbone_params,
                      reserved={"in_channels"})
        if self.view is not None and "view" not in inspect.signature(objectives.OBJECTIVES[self.objective].__init__).parameters:
            raise ValueError(f"view: objective {self.objective!r} takes no augmentation options")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs use_gpu=true (on CPU use auto, bf16 or fp32)")
        if self.budget_minutes is not None and self.steps is not None:
            raise ValueError("budget_minutes: give steps or budget_minutes, not both (the budget chooses the steps)")
        if self.batch_size % (self.workers * self.grad_accum):
            raise ValueError(f"batch_size: {self.batch_size} is not divisible by workers × grad_accum = "
                             f"{self.workers} × {self.grad_accum}")
        return self

    # derived values
    @property
    def local_batch(self) -> int:
        """Samples per worker per forward pass."""
        return self.batch_size // (self.workers * self.grad_accum)

    @property
    def scaled_lr(self) -> float:
        factor = {"linear": self.batch_size / 256, "sqrt": (self.batch_size / 256) ** 0.5, "none": 1.0}[self.lr_scaling]
        return self.lr * factor

    def layout_request(self) -> Optional[bool]:
        """channels_last as asked: True/False, or None for auto (``workers.hardware.resolve``)."""
        return None if self.channels_last == "auto" else bool(self.channels_last)

    def objective_kwargs(self) -> dict[str, Any]:
        kw = dict(self.objective_params)
        if self.view is not None:
            kw["view"] = self.view.given()
        return kw

    def training_hash(self) -> str:
        """Hash of what determines the trained weights (not workers' bookkeeping such as logging)."""
        skip = {"log_every", "loggers", "knn_monitor", "knn_k", "knn_bank", "knn_queries", "storage_options", "max_failures",
                "keep_checkpoints", "loader_workers", "checkpoint_every"}
        d = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        if d.get("init_from") is None:  # added 2026-12: runs made before keep their hash
            d.pop("init_from", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_kwargs(field: str, fn, params: dict, reserved: set[str]) -> None:
    sig = inspect.signature(fn)
    allowed = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - reserved
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if key in reserved:
            raise ValueError(f"{field}.{key}: set by gelato itself (use the top-level key instead)")
        if key not in allowed and not has_var_kw:
            hint = ""
            if ":" in str(key):  # `{small_stem:true}` is one key in YAML's flow style
                name, _, value = str(key).partition(":")
                hint = f" (YAML needs a space after the colon: {{{name}: {value}}})"
            raise ValueError(f"{field}.{key}: unknown parameter of {getattr(fn, '__qualname__', fn)}; "
                             f"valid: {sorted(allowed)}{hint}")


def _parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars/lists: 5 → int, 0.2 → float, true → bool, [0.3,1] → list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a mapping")
        node[parts[-1]] = _parse_value(value)
    return out


def read_config_file(path: Optional[str]) -> dict[str, Any]:
    """A YAML config file as a mapping ({} without a path); a missing file, bad YAML or a file that is
    not a mapping fails naming it."""
    if not path:
        return {}
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values")
    return loaded


def storage_options_in(raw: dict[str, Any], path: Optional[str]) -> dict[str, Any]:
    """The ``storage_options`` (s3fs keyword arguments) of a config read from ``path``; {} without."""
    opts = raw.get("storage_options") or {}
    if not isinstance(opts, dict):
        raise ConfigError(f"{path}: storage_options must be a mapping of s3fs options")
    return opts


def load_model(model: type[BaseModel], path: Optional[str] = None, overrides: Optional[list[str]] = None,
               base: Optional[dict[str, Any]] = None):
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate into ``model``. Errors name the key."""
    raw: dict[str, Any] = dict(base or {})
    raw.update(read_config_file(path))
    raw = apply_overrides(raw, overrides or [])
    try:
        return model(**raw)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; valid: {_valid_keys(model, err['loc'][:-1])}"
            msgs.append(msg if loc == "config" else f"{loc}: {msg}")
        raise ConfigError(f"{path or 'config'}: " + "; ".join(msgs)) from None


def _valid_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names of the (possibly nested, possibly Optional) model at ``path`` of ``model``."""
    import typing

    for part in path:
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        inner = [a for a in (typing.get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return sorted(model.model_fields)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict[str, Any]] = None) -> PretrainConfig:
    """The pretraining config from ``path`` and overrides (see :func:`load_model`)."""
    return load_model(PretrainConfig, path, overrides, base)
