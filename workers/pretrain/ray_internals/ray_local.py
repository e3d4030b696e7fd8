"""Ray Train on a private local Ray instance: the stock ``TorchTrainer`` minus what only a shared
cluster needs, so that the first training step comes sooner on a laptop.

Driver side; what the controller actor unpickles lives in ``workers.pretrain.ray_internals.ray_controller``, which imports
no torch. Left out, on a private instance only:

- the autoscaling coordinator (``FixedScalingWithoutAutoscaler``): the controller waits for this
  actor to start before it requests the workers, and pings it every 20 s.
- the ``DatasetManager``, started even when the trainer has no Ray Datasets (gelato streams its
  own shards), before the workers' train context.
- the placement-group cleaner, which removes the workers' placement group if the controller dies;
  on a private instance the whole instance goes with it.
- torch in the controller (``LocalTorchConfig``): 2.5 s of its start, before it asks for workers.

And one thing changed: a worker error caused by a damaged shard is not retried
(``StopOnDamagedData``): a restarted worker group would only read the same bytes again.

On a shared cluster (``--address`` / ``RAY_ADDRESS``) the stock ``TorchTrainer`` is used. If a later
Ray renames what is replaced, the stock behaviour runs (``torch_free_controller_supported``).
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer

from workers.pretrain.ray_internals.ray_controller import (COORDINATOR_METHODS, TORCH_CONFIG_FUNCTIONS,
                                                           DefaultFailurePolicy, FixedScalingPolicy)

_DROPPED_CALLBACKS = ("DatasetsCallback", "PlacementGroupCleanerCallback")


def torch_free_controller_supported() -> bool:
    """Whether this Ray has the functions ``LocalTorchConfig``'s backend calls on the workers."""
    from ray.train.torch import config as torch_config

    return all(callable(getattr(torch_config, name, None)) for name in TORCH_CONFIG_FUNCTIONS)


class PrivateRayTorchTrainer(TorchTrainer):
    """``TorchTrainer`` for a Ray instance this process started, with no Ray Datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if type(c).__name__ not in _DROPPED_CALLBACKS]

    def _initialize_and_run_controller(self, **kwargs):
        policy = kwargs.get("scaling_policy")
        if FixedScalingPolicy is not None and type(policy) is FixedScalingPolicy \
                and all(hasattr(policy, m) for m in COORDINATOR_METHODS):
            from workers.pretrain.ray_internals.ray_controller import FixedScalingWithoutAutoscaler

            policy.__class__ = FixedScalingWithoutAutoscaler
        failure = kwargs.get("failure_policy")
        if DefaultFailurePolicy is not None and type(failure) is DefaultFailurePolicy:
            from workers.pretrain.ray_internals.ray_controller import StopOnDamagedData

            failure.__class__ = StopOnDamagedData
        return super()._initialize_and_run_controller(**kwargs)


__all__ = ["PrivateRayTorchTrainer", "torch_free_controller_supported"]
