"""Fine-tuning: the whole backbone plus a new linear head, trained with labels.

Used three ways by the evaluation stage: fine-tuning the pretrained backbone (``finetune``), the
same on 1 % / 10 % of the labels (``fewshot``), and training the randomly initialised
architecture from scratch (the ``supervised`` reference, with the backbone at the head's
learning rate).

Light augmentation on the device, batched: random resized crop (scale 0.5–1) and horizontal
flip, then the objective's own ``preprocess`` (the normalisation the backbone was trained with).
``execution`` (``workers.hardware``) says how the network runs: bf16 or fp16 autocast (fp16 with a
grad scaler) and channels_last, as resolved for the device; weights and optimizer state stay
float32.
AdamW with two parameter groups (backbone at ``backbone_lr``, head at ``head_lr``), cosine
decay computed up front per step; the data order and the crops come from one seeded Generator.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.augment import horizontal_flip, random_resized_crop, to_float
from workers.evaluate.features import SEED_LOCK, autocast, to_layout
from workers.evaluate.metrics import multilabel_ap
from workers.evaluate.probe import classification_report
from workers.hardware import Execution, as_execution


class Classifier(nn.Module):
    """backbone → batch norm without affine parameters → linear head.

    The parameter-free batch norm puts features of any scale on the footing the linear probe
    has after standardising (as MAE does before its linear classifier, He et al. 2022 §A.2), so one
    head learning rate serves every backbone. Shape: x (B, C, H, W) float → logits (B, n_classes).
    """

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.BatchNorm1d(backbone.feature_dim, affine=False),
                                  nn.Linear(backbone.feature_dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def augment(images: torch.Tensor, size: int, generator: torch.Generator,
            scale: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """uint8 (B, C, H, W) → float [0, 1] (B, C, size, size): random resized crop + flip. Audio
    (float (B, 1, L)): gain, speed, time shift and noise (``ssl_models.audio``) → (B, L)."""
    if images.ndim == 3:
        from ssl_models.audio import augment_waveforms

        return augment_waveforms(images, generator=generator)
    x = random_resized_crop(to_float(images), size, scale=scale, generator=generator)
    return horizontal_flip(x, 0.5, generator=generator)


def train_classifier(backbone: nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     targets: torch.Tensor, n_classes: int, *, image_size: int, epochs: float, head_lr: float,
                     backbone_lr: float, weight_decay: float, batch_size: int, seed: int, device: str,
                     multilabel: bool = False, ignore: Optional[torch.Tensor] = None,
                     execution: Execution | str = "fp32", steps: Optional[int] = None,
                     progress: Optional[Callable[[int], None]] = None) -> Classifier:
    """Train a copy of ``backbone`` plus a new head on (images, targets); returns the model in eval mode.

    Shape: images (N, C, H, W) uint8; targets (N,) int, or (N, K) multi-hot when ``multilabel``
    (``ignore`` (N, K) bool leaves VOC "difficult" pairs out of the loss). ``steps``, when given,
    replaces ``epochs`` (the evaluation's time budget sizes it); ``progress(1)`` after each step.
    """
    ex = as_execution(execution, torch.device(device).type)
    n = len(images)
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 labelled images, got {n}")
    with SEED_LOCK:  # the head's initial weights come from the global RNG
        torch.manual_seed(seed)
        model = Classifier(copy.deepcopy(backbone), n_classes)
    model = model.to(device).train()
    if ex.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=ex.grad_scaler)
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": backbone_lr},
                             {"params": model.head.parameters(), "lr": head_lr}], weight_decay=weight_decay)
    base = [backbone_lr, head_lr]
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch (batch norm dislikes tiny batches)
    total = steps if steps is not None else max(1, round(epochs * steps_per_epoch))
    schedule = [0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]  # cosine, per step
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for i in range(min(steps_per_epoch, total - step)):
            idx = order[i * bs:(i + 1) * bs]
            x = to_layout(preprocess(augment(images[idx], image_size, gen).to(device)), ex.channels_last)
            with autocast(torch.device(device).type, ex.precision):
                logits = model(x).float()
            y = targets[idx].to(device)
            if multilabel:
                w = None if ignore is None else (~ignore[idx]).float().to(device)
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), weight=w)
            else:
                loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning: non-finite loss at step {step}; lower the learning rate")
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * schedule[step]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            if progress is not None:
                progress(1)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, preprocess: Callable, images: torch.Tensor, device: str,
            batch_size: int = 256, execution: Execution | str = "fp32") -> torch.Tensor:
    """Logits of un-augmented images. Shape: (N, C, H, W) uint8 → (N, n_classes) on CPU."""
    ex = as_execution(execution, torch.device(device).type)
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_layout(preprocess(images[i:i + batch_size].to(device)), ex.channels_last)
        with autocast(torch.device(device).type, ex.precision):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def classifier_metrics(logits: torch.Tensor, split: dict, n_classes: int, multilabel: bool) -> dict:
    """Test figures of a classifier: mAP etc. (multi-label) or top-1/top-5/per-class/confusion."""
    if multilabel:
        return multilabel_ap(logits, split["labels"], split["difficult"])
    return classification_report(logits, split["label"], n_classes)
