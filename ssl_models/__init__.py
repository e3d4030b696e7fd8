"""gelato's science: backbones, heads, batched augmentations and SSL objectives.

Pure PyTorch (torch only), usable without the rest of gelato::

    import ssl_models
    backbone = ssl_models.backbones.build("small_cnn", in_channels=1)
    objective = ssl_models.objectives.build("simclr", backbone=backbone, image_size=28)
    views = objective.make_views(images)      # uint8 (B, C, H, W) on any device
    out = objective(views)                    # {"loss": scalar, ...}
    out["loss"].backward(); optimizer.step(); objective.after_step()
"""
from ssl_models import augment, backbones, distributed, heads, losses, objectives  # noqa: F401

__all__ = ["augment", "backbones", "distributed", "heads", "losses", "objectives"]
