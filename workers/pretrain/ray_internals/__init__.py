"""A private Ray instance for one ``gelato pretrain`` command, tuned so the first step comes sooner.

Fenced here because it reaches into Ray Train's private modules (the v2 controller, its scaling and
failure policies, the callbacks it starts). Checked against ray==2.60.0, the version pyproject.toml
pins; ``ray_local.torch_free_controller_supported`` falls back to the stock ``TorchTrainer`` when a
later Ray renames what is replaced, and a shared cluster (``--address``) always gets the stock one.

    ray_start.py        starting (early, beside Prefect) and stopping the private instance
    ray_local.py        the trainer minus what only a shared cluster needs (driver side)
    ray_controller.py   what the controller actor unpickles: imports Ray only, never torch
"""
