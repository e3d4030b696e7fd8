"""Frozen features for the evaluation protocols, extracted once and cached in the run.

A :class:`FeatureSource` turns a uint8 batch into feature vectors: the pretrained backbone, the
same architecture randomly initialised, a backbone trained from scratch with labels, or the
raw pixels themselves. Features of one source and split are computed once (batched, backbone
in eval mode, no augmentation, no gradient) and stored under
``RUN/eval/features/<key>/<split>.pt``, where ``key`` is the hash of the checkpoint file's bytes
(or a name + hash for the baselines); later protocols and later runs load them. A stored entry is
used only when it was computed from the same samples in the same order (digest of their keys).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from workers.knn import extract_features
from workers.pretrain import build_objective
from workers.storage import RunLocation

FEATURE_DIR = "eval/features"

# Seeded model construction draws from torch's global RNG; tasks may run in threads, so seeded
# construction happens under this lock (everything else in evaluation uses its own Generator).
SEED_LOCK = threading.Lock()
_LAYOUT_LOCK = threading.Lock()  # one thread converts a shared module to channels_last


def autocast(device_type: str, precision: str):
    """bf16 autocast for ``precision="bf16"`` (CPU or CUDA), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def to_layout(x: torch.Tensor, precision: str) -> torch.Tensor:
    """channels_last for image batches at reduced precision (where the conv kernels want it)."""
    return x.contiguous(memory_format=torch.channels_last) if precision != "fp32" and x.ndim == 4 else x


@dataclass
class FeatureSource:
    """What turns images into features. ``module`` is None for raw pixels."""

    name: str                                           # pretrained | random_init | raw_pixels | supervised
    key: str                                            # folder under eval/features/
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, C, H, W) → network input
    module: Optional[nn.Module] = None
    standardize_for_knn: bool = False                   # raw pixels: kNN on standardised dimensions
    _channels_last: bool = False                        # module weights already in channels_last

    @torch.no_grad()
    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Shape: images (B, C, H, W) uint8 → (B, D) float32.

        ``precision="bf16"`` runs the network under bf16 autocast with channels_last inputs (what
        pretraining used on CPU and GPU; ~5x faster than fp32 on a 2-core CPU); features come back
        as float32 either way.
        """
        x = self.preprocess(images)
        if self.module is None:
            return x.flatten(1)                                          # (B, C·H·W)
        if precision != "fp32" and not self._channels_last:
            # Weights in channels_last too: with only the input converted, each conv converts
            # back and forth, and extraction runs at less than half the speed (2-core CPU, bf16).
            with _LAYOUT_LOCK:
                self.module.to(memory_format=torch.channels_last)
                self._channels_last = True
        x = to_layout(x, precision)
        with autocast(x.device.type, precision):
            return self.module(x).float()


def at_size(preprocess: Callable[[torch.Tensor], torch.Tensor], size: Optional[int]):
    """``preprocess`` followed by a bilinear (antialiased) resize to ``size`` × ``size``.

    The evaluation's ``frozen_input_size``: a backbone pretrained on small random crops can give better
    frozen features when evaluated above its training resolution (Touvron et al., "Fixing the
    train-test resolution discrepancy", NeurIPS 2019); the size is a hyper-parameter picked on val.
    ``size=None`` returns ``preprocess`` itself. Normalisation is per-channel affine, so resizing
    after it equals resizing before it.
    """
    if size is None:
        return preprocess

    from ssl_models.augment import resize

    return lambda images: resize(preprocess(images), size)


def _sized_key(key: str, input_size: Optional[int]) -> str:
    return key if input_size is None else f"{key}-{input_size}px"


def pretrained(checkpoint, device: str, input_size: Optional[int] = None) -> FeatureSource:
    """The checkpoint's backbone; cache key = hash of the checkpoint file (+ the input size if set)."""
    return FeatureSource("pretrained", _sized_key(checkpoint.short_hash, input_size),
                         at_size(checkpoint.objective.preprocess, input_size), checkpoint.backbone.to(device).eval())


def random_init(config, in_channels: int, seed: int, device: str, input_size: Optional[int] = None) -> FeatureSource:
    """The same architecture with seeded random weights (and the same input normalisation)."""
    with SEED_LOCK:
        torch.manual_seed(seed)
        objective = build_objective(config, in_channels)
    spec = json.dumps([config.backbone, config.backbone_params, in_channels, config.image_size, seed,
                       torch.__version__], sort_keys=True, default=str)
    key = _sized_key("random_init-" + hashlib.sha256(spec.encode()).hexdigest()[:16], input_size)
    return FeatureSource("random_init", key, at_size(objective.preprocess, input_size),
                         objective.backbone.to(device).eval())


def raw_pixels(image_size: int) -> FeatureSource:
    """Flattened pixels in [0, 1] (images already brought to ``image_size``); standardised by the protocols."""
    from ssl_models.augment import to_float

    return FeatureSource("raw_pixels", f"raw_pixels-{image_size}px", to_float, None, standardize_for_knn=True)


def trained(name: str, objective: nn.Module, weights_sha256: str, device: str,
            input_size: Optional[int] = None) -> FeatureSource:
    """A backbone trained in this run (the supervised reference), keyed by the hash of its saved file."""
    return FeatureSource(name, _sized_key(f"{name}-{weights_sha256[:16]}", input_size),
                         at_size(objective.preprocess, input_size), objective.backbone.to(device).eval())


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def write_file(loc: RunLocation, rel: str, data: bytes, fs=None) -> None:
    """``loc/rel`` written whole or not at all; on S3 through ``fs`` when given (one PUT)."""
    if loc.is_s3 and fs is not None:
        with fs.open(loc.join(rel), "wb") as f:
            f.write(data)
    else:
        loc.write_atomic(rel, data)


def cached_features(loc: RunLocation, source: FeatureSource, split: str, data: dict, device: str,
                    batch_size: int = 256, fs=None, precision: str = "fp32") -> tuple[torch.Tensor, bool]:
    """Features of ``data`` (a :func:`workers.data.load_split` dict) from the cache, or computed and stored.

    A cached entry is used only when it holds the same samples and was computed at the same
    precision. Returns (features (N, D) float32 on CPU, whether they were computed now).
    """
    if source.module is None:
        precision = "fp32"  # raw pixels: no network, nothing to run at lower precision
    rel = f"{FEATURE_DIR}/{source.key}/{split}.pt"
    digest = keys_digest(data["key"])
    fs = fs or loc.fs()
    try:
        with fs.open(loc.join(rel), "rb") as f:
            blob = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        if blob.get("keys_digest") == digest and blob.get("precision", "fp32") == precision:
            return blob["features"], False
    except FileNotFoundError:
        pass
    feats = extract_features(lambda x: source.encode(x, precision), data["image"], batch_size=batch_size,
                             device=device)
    buf = io.BytesIO()
    torch.save({"features": feats, "keys_digest": digest, "source": source.name, "split": split,
                "count": len(feats), "precision": precision}, buf)
    write_file(loc, rel, buf.getvalue(), fs)
    return feats, True
