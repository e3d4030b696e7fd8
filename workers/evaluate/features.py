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
import torch.nn.functional as F
from torch import nn

from workers.hardware import Execution, as_execution
from workers.knn import extract_features
from workers.model import build_objective
from workers.storage import RunLocation

FEATURE_DIR = "eval/features"

# Seeded model construction draws from torch's global RNG; tasks may run in threads, so seeded
# construction happens under this lock (everything else in evaluation uses its own Generator).
SEED_LOCK = threading.Lock()
_LAYOUT_LOCK = threading.Lock()  # one thread converts a shared module to channels_last


def autocast(device_type: str, precision: str):
    """bf16 / fp16 autocast for ``precision`` "bf16" / "fp16" (CPU or CUDA), nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """channels_last for image batches when the execution asks for it (``workers.hardware``)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@dataclass(frozen=True)
class FrozenView:
    """How a frozen network's images and features are taken (the evaluation's ``frozen_*`` settings).

    ``input_size``: the side the images are resized to (None: as stored). ``grid`` and ``stages``:
    the last ``stages`` feature maps are each average-pooled to a ``grid × grid`` grid and
    concatenated, as in the linear-evaluation benchmark of Goyal et al., "Scaling and Benchmarking
    Self-Supervised Visual Representation Learning", ICCV 2019 (which pools every ResNet stage to
    ~9k dimensions). ``grid=1, stages=1`` is the backbone's own output (the usual global average
    pool, or a ViT's class token).
    """

    input_size: Optional[int] = None
    grid: int = 1
    stages: int = 1

    @property
    def pooled(self) -> bool:
        """True when the features are pooled feature maps rather than the backbone's output."""
        return (self.grid, self.stages) != (1, 1)

    def key(self, key: str) -> str:
        """The feature-cache folder for ``key`` seen through this view."""
        key = key if self.input_size is None else f"{key}-{self.input_size}px"
        return f"{key}-grid{self.grid}x{self.stages}" if self.pooled else key


def pooled_feature_maps(module: nn.Module, x: torch.Tensor, grid: int, stages: int) -> torch.Tensor:
    """The last ``stages`` of ``module.feature_maps(x)``, each average-pooled to ``grid × grid``, concatenated.

    Shape: x (B, C, H, W) → (B, Σ_s C_s · grid²), flattened channel-major per stage. Maps over time
    (an audio backbone's, (B, C_s, T)) are pooled to ``grid`` equal spans of time: (B, Σ_s C_s · grid).
    """
    if not hasattr(module, "feature_maps"):
        raise ValueError(f"{type(module).__name__} exposes no feature_maps(); evaluate it with frozen_grid=1 "
                         "and frozen_stages=1")
    maps = module.feature_maps(x)[-stages:]
    return torch.cat([(F.adaptive_avg_pool1d(m, grid) if m.ndim == 3 else F.adaptive_avg_pool2d(m, grid)).flatten(1)
                      for m in maps], dim=1)


@dataclass
class FeatureSource:
    """What turns images into features. ``module`` is None for raw pixels."""

    name: str                                           # pretrained | random_init | raw_pixels | supervised
    key: str                                            # folder under eval/features/
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, C, H, W) → network input
    module: Optional[nn.Module] = None
    standardize_for_knn: bool = False                   # raw pixels: kNN on standardised dimensions
    view: FrozenView = FrozenView()                     # grid/stages: pooled feature maps instead of the output
    _channels_last: bool = False                        # module weights already in channels_last

    @torch.no_grad()
    def encode(self, images: torch.Tensor, execution: Execution | str = "fp32") -> torch.Tensor:
        """Shape: images (B, C, H, W) uint8 → (B, D) float32.

        ``execution`` (``workers.hardware``; a precision name is resolved on the images' device):
        bf16/fp16 autocast and channels_last where it says so (bf16 + channels_last is ~2x fp32 on
        a CPU with native bf16, and channels_last alone ~1.3x in fp32); features come back as
        float32 either way.
        """
        ex = as_execution(execution, images.device.type)
        x = self.preprocess(images)
        if self.module is None:
            return x.flatten(1)                                          # (B, C·H·W)
        if ex.channels_last and not self._channels_last:
            # Weights in channels_last too: with only the input converted, each conv converts
            # back and forth, and extraction runs at less than half the speed (2-core CPU, bf16).
            with _LAYOUT_LOCK:
                self.module.to(memory_format=torch.channels_last)
                self._channels_last = True
        x = to_layout(x, ex.channels_last)
        with autocast(x.device.type, ex.precision):
            if self.view.pooled:
                return pooled_feature_maps(self.module, x, self.view.grid, self.view.stages).float()
            return self.module(x).float()


    @torch.no_grad()
    def dense(self, images: torch.Tensor, execution: Execution | str = "fp32", grid: int = 8) -> torch.Tensor:
        """Dense features for label propagation: the first (largest) of the network's
        ``feature_maps``; raw pixels: each cell of a ``grid × grid`` grid described by a 4 × 4
        thumbnail of its pixels. Shape: images (B, C, H, W) uint8 → (B, D, h, w) float32."""
        ex = as_execution(execution, images.device.type)
        x = self.preprocess(images)
        if self.module is None:
            return F.pixel_unshuffle(F.adaptive_avg_pool2d(x, 4 * grid), 4)             # (B, 16·C, grid, grid)
        if not hasattr(self.module, "feature_maps"):
            raise ValueError(f"{type(self.module).__name__} exposes no feature_maps(): no dense features for "
                             "label propagation")
        with autocast(x.device.type, ex.precision):
            return self.module.feature_maps(x)[0].float()


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


def pretrained(checkpoint, device: str, view: FrozenView = FrozenView()) -> FeatureSource:
    """The checkpoint's backbone; cache key = hash of the checkpoint file (+ the view if not the default)."""
    return FeatureSource("pretrained", view.key(checkpoint.short_hash), at_size(checkpoint.objective.preprocess,
                         view.input_size), checkpoint.backbone.to(device).eval(), view=view)


def random_init(config, in_channels: int, seed: int, device: str, view: FrozenView = FrozenView()) -> FeatureSource:
    """The same architecture with seeded random weights (and the same input normalisation)."""
    with SEED_LOCK:
        torch.manual_seed(seed)
        objective = build_objective(config, in_channels)
    spec = json.dumps([config.backbone, config.backbone_params, in_channels, config.image_size, seed,
                       torch.__version__], sort_keys=True, default=str)
    key = view.key("random_init-" + hashlib.sha256(spec.encode()).hexdigest()[:16])
    return FeatureSource("random_init", key, at_size(objective.preprocess, view.input_size),
                         objective.backbone.to(device).eval(), view=view)


def initialised(config, in_channels: int, path: str, storage_options: Optional[dict], device: str,
                view: FrozenView = FrozenView()) -> FeatureSource:
    """The same architecture with the weights ``init_from`` names (where a pretraining started); cache
    key = hash of those weights' file."""
    from workers.init_weights import apply_init

    got = []
    with SEED_LOCK:
        objective = build_objective(config, in_channels,
                                    lambda b: got.append(apply_init(path, b, storage_options)))
    return FeatureSource("init_from", view.key("init_from-" + got[0].sha256[:16]),
                         at_size(objective.preprocess, view.input_size), objective.backbone.to(device).eval(), view=view)


def raw_pixels(image_size: int) -> FeatureSource:
    """Flattened pixels in [0, 1] (images already brought to ``image_size``); standardised by the protocols."""
    from ssl_models.augment import to_float

    return FeatureSource("raw_pixels", f"raw_pixels-{image_size}px", to_float, None, standardize_for_knn=True)


def log_mel(n_mels: int = 80, spans: int = 1) -> FeatureSource:
    """An audio run's input baseline: each band's mean and standard deviation over each of ``spans``
    equal spans of the utterance of the log-mel spectrogram (``ssl_models.audio.log_mel_stats``, 25 ms
    windows every 10 ms; ``spans``: the evaluation's ``frozen_grid``, as the networks' frames are
    pooled); standardised by the protocols, as raw pixels are."""
    from ssl_models.audio import log_mel_stats

    key = f"log_mel-{n_mels}-stats" + (f"-spans{spans}" if spans > 1 else "")
    return FeatureSource("log_mel", key, lambda x: log_mel_stats(x, n_mels, spans), None, standardize_for_knn=True)


def trained(name: str, objective: nn.Module, weights_sha256: str, device: str,
            view: FrozenView = FrozenView()) -> FeatureSource:
    """A backbone trained in this run (the supervised reference), keyed by the hash of its saved file."""
    return FeatureSource(name, view.key(f"{name}-{weights_sha256[:16]}"), at_size(objective.preprocess, view.input_size),
                         objective.backbone.to(device).eval(), view=view)


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def cached_features(loc: RunLocation, source: FeatureSource, split: str, data: dict, device: str,
                    batch_size: int = 256, fs=None, execution: Execution | str = "fp32",
                    progress=None) -> tuple[torch.Tensor, bool]:
    """Features of ``data`` (a :func:`workers.data.loader.load_split` dict) from the cache, or computed and stored.

    A cached entry is used only when it holds the same samples and was computed at the same
    precision. ``progress(n)`` is called with the images of each batch embedded. Returns
    (features (N, D) float32 on CPU, whether they were computed now).
    """
    ex = as_execution(execution, torch.device(device).type)
    precision = ex.precision if source.module is not None else "fp32"  # raw pixels: no network
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
    feats = extract_features(lambda x: source.encode(x, ex), data["image"], batch_size=batch_size,
                             device=device, progress=progress)
    buf = io.BytesIO()
    torch.save({"features": feats, "keys_digest": digest, "source": source.name, "split": split,
                "count": len(feats), "precision": precision}, buf)
    loc.write_atomic(rel, buf.getvalue(), fs)
    return feats, True
