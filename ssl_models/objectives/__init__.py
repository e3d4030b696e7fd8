"""Objective registry: a plain dict from name to class (no string magic; go to definition works).

    objective = ssl_models.objectives.build("simclr", backbone=backbone, image_size=28, temperature=0.2)
"""
from __future__ import annotations

from torch import nn

from ssl_models.objectives.apc import APC
from ssl_models.objectives.arrow_of_time import ArrowOfTime
from ssl_models.objectives.autoencoder import Autoencoder
from ssl_models.objectives.av_correspondence import AVCorrespondence
from ssl_models.objectives.base import Objective
from ssl_models.objectives.byol import BYOL
from ssl_models.objectives.colorization import Colorization
from ssl_models.objectives.colorization_tracking import ColorizationTracking
from ssl_models.objectives.composite_lstm import CompositeLSTM
from ssl_models.objectives.contrastive import PairwiseContrastive
from ssl_models.objectives.cpc import CPC
from ssl_models.objectives.cpc_audio import CPCAudio
from ssl_models.objectives.cycle_consistency import CycleConsistency
from ssl_models.objectives.denoising_autoencoder import DenoisingAutoencoder
from ssl_models.objectives.igpt import IGPT
from ssl_models.objectives.jigsaw import Jigsaw
from ssl_models.objectives.mae import MAE
from ssl_models.objectives.pase import PASE
from ssl_models.objectives.moco import MoCo
from ssl_models.objectives.relative_position import RelativePosition
from ssl_models.objectives.rotation import Rotation
from ssl_models.objectives.simclr import SimCLR
from ssl_models.objectives.swav import SwAV
from ssl_models.objectives.tcn import TCN
from ssl_models.objectives.temporal_order import ShuffleAndLearn, TemporalOrder
from ssl_models.objectives.triplet import Triplet
from ssl_models.objectives.wav2vec2 import Wav2Vec2

OBJECTIVES: dict[str, type[Objective]] = {
    # contrastive
    "contrastive": PairwiseContrastive,
    "triplet": Triplet,
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "swav": SwAV,
    "cpc": CPC,
    # predictive
    "autoencoder": Autoencoder,
    "denoising_autoencoder": DenoisingAutoencoder,
    "mae": MAE,
    "rotation": Rotation,
    "relative_position": RelativePosition,
    "jigsaw": Jigsaw,
    "colorization": Colorization,
    "igpt": IGPT,
    # predictive, on clips (modality "clip": make_views takes (B, T, C, H, W))
    "arrow_of_time": ArrowOfTime,
    "shuffle_and_learn": ShuffleAndLearn,
    "temporal_order": TemporalOrder,
    "composite_lstm": CompositeLSTM,
    "colorization_tracking": ColorizationTracking,
    # contrastive, on clips
    "tcn": TCN,
    "cycle_consistency": CycleConsistency,
    # on audio (modality "audio": make_views takes utterances, float (B, 1, L) at 16 kHz)
    "apc": APC,
    "cpc_audio": CPCAudio,
    "pase": PASE,
    "wav2vec2": Wav2Vec2,
    # on clips with their sound (modality "audiovisual": make_views takes {"clip", "audio"})
    "av_correspondence": AVCorrespondence,
}


def build(name: str, backbone: nn.Module, image_size: int, **params) -> Objective:
    """Build objective ``name`` around ``backbone``; ``params`` are the objective's own arguments."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](backbone=backbone, image_size=image_size, **params)


__all__ = ["OBJECTIVES", "Objective", "build"]
