"""What ``gelato evaluate`` runs, typed and validated before any work: :class:`EvalConfig`.

The ``evaluate:`` section of a pipeline YAML, or ``gelato evaluate``'s options. Defaults follow the
protocols of the literature; ``budget_minutes`` sizes the evaluation to the machine it meets
(``workers/evaluate/budget.py``).
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.config import ConfigError, load_model, read_config_file, storage_options_in
from workers.evaluate.probe import DEFAULT_WEIGHT_DECAYS

PROTOCOLS = ("probe", "knn", "finetune", "fewshot")


BASELINES = ("raw_pixels", "random_init", "supervised", "init_from", "log_mel")
# audio runs only (workers/evaluate/audio.py): a second target of each utterance, from its labels for
# evaluation (spoken-digits: the voice), probed and kNN-classified on the same frozen features
AUDIO_PROTOCOLS = ("voice_probe", "voice_knn")
AudioProtocol = Literal["voice_probe", "voice_knn"]
# an audio-visual checkpoint on clips with sound (workers/evaluate/audiovisual.py)
AV_PROTOCOLS = ("av_retrieval", "av_localisation")
AVProtocol = Literal["av_retrieval", "av_localisation"]
# clip runs only (workers/evaluate/video.py): motion kind from a clip's frames, propagating the first
# frame's masks, aligning two cameras
VIDEO_PROTOCOLS = ("clip_probe", "clip_knn", "label_propagation", "alignment")
VideoProtocol = Literal["clip_probe", "clip_knn", "label_propagation", "alignment"]


class EvalConfig(BaseModel):
    """Everything ``gelato evaluate`` needs; defaults follow the protocols of the literature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocols: tuple[Literal["probe", "knn", "finetune", "fewshot"], ...] = PROTOCOLS
    # raw_pixels: the input itself, i.e. flattened pixels, or on an audio run the log-mel statistics (log_mel)
    baselines: tuple[Literal["raw_pixels", "random_init", "supervised", "init_from", "log_mel"], ...] = (
        "raw_pixels", "random_init")
    init_from: Optional[str] = Field(
        None, description="the init_from column: the weights a pretraining started from (a gelato run, a "
                          "backbone.pt, a torchvision state dict; workers/init_weights.py), evaluated frozen "
                          "beside random init. Default: the checkpoint's pretraining init_from; the column is "
                          "there whenever random_init is, or init_from is among the baselines")
    checkpoint: Optional[str] = None          # default: RUN/checkpoints/final/backbone.pt
    seed: int = 0
    knn_k: int = Field(200, ge=1)             # InstDisc's protocol
    knn_t: float = Field(0.1, gt=0)
    probe_weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    probe_max_iter: int = Field(100, ge=1)
    finetune_epochs: float = Field(5, gt=0, description="fine-tuning epochs (a fraction of one is allowed)")
    # AdamW; 1e-2 for the head (behind a parameter-free batch norm) and 1e-3 for the backbone fine-tuned
    # small CNNs/ResNets best in short schedules on Fashion-MNIST; lower it for ViTs.
    finetune_lr: float = Field(1e-2, gt=0, description="head learning rate (AdamW); also the supervised reference's")
    finetune_backbone_lr_ratio: float = Field(0.1, gt=0, le=1, description="backbone lr = ratio × head lr")
    finetune_weight_decay: float = Field(1e-4, ge=0)
    finetune_batch_size: int = Field(128, ge=2)
    fewshot_epochs: Optional[int] = Field(None, ge=1, description="default: 4 × finetune_epochs")
    supervised_epochs: Optional[int] = Field(None, ge=1, description="default: the pretraining's epochs")
    batch_size: int = Field(256, ge=1, description="feature extraction batch")
    frozen_input_size: Optional[int] = Field(
        None, ge=8, description="resolution the frozen backbones see (probe, kNN, few-label probe); default: "
                                "the pretraining image_size. Fine-tuning stays at image_size. Pick it on val "
                                "(see workers.evaluate.features.at_size)")
    frozen_grid: int = Field(
        1, ge=1, le=4, description="frozen features (probe, kNN, few-label probe): each of the last frozen_stages "
                                   "feature maps average-pooled to a grid × grid grid and concatenated (Goyal et "
                                   "al. 2019); 1 with frozen_stages 1 is the backbone's own output (global pool)")
    frozen_stages: int = Field(1, ge=1, le=2, description="how many of the last stages frozen_grid pools (1 or 2)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="feature extraction and fine-tuning: auto resolves per device (workers.hardware): bf16 "
                            "where the GPU or CPU has it natively, fp16 on older GPUs, else fp32")
    channels_last: Union[bool, Literal["auto"]] = Field("auto", description="auto: on CPU, and on GPU at bf16/fp16")
    limit: Optional[int] = Field(None, ge=2, description="at most this many samples per split (quick runs)")
    frozen_train_samples: Optional[int] = Field(
        None, ge=10, description="probe and kNN on a class-balanced, seeded subset of this many train samples "
                                 "(it contains the few-label subsets); default: all of train")
    budget_minutes: Optional[float] = Field(
        None, gt=0, description="size the evaluation to fit this many minutes on this machine, from measured costs "
                                "(workers.evaluate.budget): fine-tuning length, frozen input size, probe iterations, train "
                                "subset, pooling, in that order; the plan is in report.json")
    device: str = "auto"
    loggers: tuple[Literal["tensorboard", "mlflow"], ...] = Field(
        (), description="experiment trackers that get the results table, report.md and the plots "
                        "(workers/tracking.py; pip install 'gelato[tracking]'); not part of the settings' hash")
    video_protocols: tuple[VideoProtocol, ...] = Field(
        VIDEO_PROTOCOLS, description="the protocols of a clip run, besides the frame-level ones above (an image "
                                     "run ignores them): clip_probe / clip_knn (the clip's class from the "
                                     "features of clip_eval_frames frames, concatenated), label_propagation "
                                     "(J of the first frame's masks carried through the clip), alignment "
                                     "(nearest frame across two cameras)")
    clip_eval_frames: int = Field(4, ge=1, le=64, description="frames per clip, evenly spaced, of clip_probe and clip_knn")
    propagation_topk: int = Field(10, ge=1, description="label propagation: reference nodes each node copies from")
    propagation_temperature: float = Field(0.05, gt=0, description="label propagation: softmax temperature on cosine")
    propagation_context: int = Field(4, ge=0, description="label propagation: previous frames referenced, beside the first")
    propagation_radius: Optional[float] = Field(
        0.5, gt=0, description="label propagation: only nodes this close (a fraction of the feature map's side) "
                               "are referenced; null: all")
    audio_protocols: tuple[AudioProtocol, ...] = Field(
        AUDIO_PROTOCOLS, description="the protocols of an audio run besides probe and kNN of the class (an image "
                                     "run ignores them): voice_probe / voice_knn predict the label audio_target "
                                     "of each utterance's labels for evaluation")
    av_protocols: tuple[AVProtocol, ...] = Field(
        AV_PROTOCOLS, description="an audio-visual checkpoint (av_correspondence) on clips with sound: av_retrieval "
                                  "(each sound ranks the test frames; right when the top one's sounding item has its "
                                  "class), av_localisation (the similarity map's peak on the sounding item)")
    audio_target: str = Field("voice", min_length=1, description="audio runs: the key of the utterances' labels "
                                                                "(their .json sidecar) the voice_* protocols predict")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="a damaged shard: fail (stop, naming it and the fix) or skip it (counted in the report)")

    def config_hash(self) -> str:
        d = self.model_dump(mode="json")
        d.pop("loggers", None)  # where results are sent does not change them
        if d.get("init_from") is None:  # added 2026-12: evaluations made before keep their hash
            d.pop("init_from", None)
        for k in VIDEO_DEFAULTS | AUDIO_DEFAULTS:  # added 2026-12 with clip and audio runs: likewise, at their defaults
            if d.get(k) == (VIDEO_DEFAULTS | AUDIO_DEFAULTS)[k]:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


VIDEO_DEFAULTS = {k: EvalConfig.model_fields[k].default for k in
                  ("video_protocols", "clip_eval_frames", "propagation_topk", "propagation_temperature",
                   "propagation_context", "propagation_radius")}
VIDEO_DEFAULTS["video_protocols"] = list(VIDEO_PROTOCOLS)  # as model_dump(mode="json") gives it
AUDIO_DEFAULTS = {"audio_protocols": list(AUDIO_PROTOCOLS), "audio_target": "voice", "av_protocols": list(AV_PROTOCOLS)}


def eval_config(**kwargs) -> EvalConfig:
    """Build an :class:`EvalConfig`; an invalid value fails with a ConfigError naming the key."""
    try:
        return EvalConfig(**kwargs)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(x) for x in err['loc'][:1])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("evaluate: " + "; ".join(msgs)) from None



def load_eval_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                     base: Optional[dict] = None) -> tuple[EvalConfig, dict]:
    """An :class:`EvalConfig` and the file's ``storage_options``.

    ``path`` is a YAML of EvalConfig's fields, or a pipeline YAML (``configs/pipeline_*.yaml``) whose
    ``evaluate:`` section is taken, so ``gelato evaluate --config configs/pipeline_demo.yaml``
    evaluates with the demo's settings. ``base`` (the command line's options) goes on top of the
    file, ``key=value`` overrides on top of both. Errors name the file and the key.
    """
    raw = read_config_file(path)
    opts = storage_options_in(raw, path)
    if isinstance(raw.get("evaluate"), dict) or {"pretrain", "ingest", "run"} & set(raw):
        section = dict(raw.get("evaluate") or {})       # a pipeline config
    else:
        section = {k: v for k, v in raw.items() if k != "storage_options"}
    try:
        return load_model(EvalConfig, None, overrides, base=section | (base or {})), opts
    except ConfigError as e:
        raise ConfigError(f"{path or 'evaluate'}: {str(e).removeprefix('config: ')}") from None
