"""The end of pretraining: ``checkpoints/final/backbone.pt``, ``plots/pretrain.png``, ``summary.json``.

Written by rank 0 once the last step is taken; ``summary.json`` comes last and marks the run finished
(:func:`workers.pretrain.run_dir.prepare_run` reads it to reuse the run). The backbone file holds the
weights and what rebuilds them (:func:`workers.model.load_backbone`), loaded with ``weights_only``.
"""
from __future__ import annotations

import io
import json
import sys
import time
from typing import Optional

import torch

from workers.config import PretrainConfig
from workers.data import integrity
from workers.model import BACKBONE_FILE, FINAL_DIR, PRETRAIN_PLOT
from workers.storage import RunLocation


def export_final(loc: RunLocation, config: PretrainConfig, manifest: dict, objective, step: int, total: int,
                 metrics_rows: Optional[list[dict]] = None, execution: Optional[dict] = None,
                 budget_plan: Optional[dict] = None, loop_seconds: Optional[float] = None) -> None:
    """``checkpoints/final/backbone.pt``: backbone weights + what rebuilds it; ``plots/pretrain.png``
    from ``metrics_rows``; then ``summary.json``, which marks the run finished."""
    backbone = objective.backbone
    payload = {
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "backbone_name": config.backbone,
        # as built (the config's backbone_params, and image_size for a fixed-size backbone)
        "backbone_params": {k: v for k, v in backbone.build_args.items() if k not in ("name", "in_channels")},
        "in_channels": int(backbone.in_channels),        # what the backbone takes
        "image_channels": int(manifest["channels"]),     # what the run's images have
        "feature_dim": int(backbone.feature_dim),
        "image_size": config.image_size,
        "objective": config.objective,
        "config": config.model_dump(mode="json"),
        "training_hash": config.training_hash(),
        "steps": step,
    }
    if getattr(objective, "modality", None) == "audiovisual":  # its audio sub-network and joint space too
        payload["objective_state"] = {k: v.detach().cpu() for k, v in objective.state_dict().items()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    loc.write_atomic(BACKBONE_FILE, buf.getvalue())
    plot = write_pretrain_plot(loc, config, metrics_rows or [], (execution or {}).get("precision"))
    summary = {"steps": step, "total_steps": total, "training_hash": config.training_hash(),
               "objective": config.objective, "backbone": config.backbone, "finished": time.time(),
               "plot": plot, "execution": execution, "budget": budget_plan, "loop_seconds": loop_seconds,
               "skipped_shards": sorted(r["shard"] for r in integrity.damaged(loc, mode="skip"))}
    loc.write_atomic(f"{FINAL_DIR}/summary.json", json.dumps(summary, indent=1).encode())


def write_pretrain_plot(loc: RunLocation, config: PretrainConfig, rows: list[dict],
                        precision: Optional[str] = None) -> Optional[str]:
    """Draw ``plots/pretrain.png``; returns its path in the run, or None. A figure that cannot be
    drawn is reported on stderr and costs the run nothing else."""
    try:
        from workers.plots import pretrain_figure

        workers = f"{config.workers} worker{'s' * (config.workers > 1)}"
        png = pretrain_figure(rows, f"{config.objective} / {config.backbone}: {workers}, global batch "
                                    f"{config.batch_size}, {precision or config.precision}")
        if png is None:
            return None
        loc.write_atomic(PRETRAIN_PLOT, png)
        return PRETRAIN_PLOT
    except Exception as e:  # noqa: BLE001 - the weights are written; a plot is not worth losing them over
        print(f"{loc.uri}: could not draw {PRETRAIN_PLOT}: {type(e).__name__}: {e}", file=sys.stderr)
        return None

