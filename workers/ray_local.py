"""Ray Train on a private local Ray instance: the stock ``TorchTrainer`` minus three helper actors.

When ``gelato pretrain`` runs with no cluster address it starts a Ray instance of its own, which
lives and dies with the command. Ray Train V2 still starts the helpers a shared, autoscaling
cluster needs, each a new Python process that imports Ray, and on a two-core laptop they sit on the
way to the first step:

- the autoscaling coordinator: the controller waits (``ray.get``) for this actor to start before it
  requests the workers, and pings it every 20 s. A private instance has no autoscaler to tell.
- the ``DatasetManager``, started even when the trainer has no Ray Datasets (gelato streams its
  own shards), before the workers' train context.
- the placement-group cleaner, which removes the workers' placement group if the controller dies;
  on a private instance the whole instance goes with it.

What is left out is chosen by class and method names of Ray Train V2 (Ray 2.5x–2.6x); if a later
Ray renames them, nothing is left out and the stock behaviour runs. On a shared cluster
(``--address`` / ``RAY_ADDRESS``) the stock ``TorchTrainer`` is used. This module imports only Ray:
the controller process unpickles the policy class from here.
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer

_DROPPED_CALLBACKS = ("DatasetsCallback", "PlacementGroupCleanerCallback")
_COORDINATOR_METHODS = ("_send_resource_request", "_maybe_send_resource_request", "_cancel_resource_request")


try:  # Ray Train V2's policy for a fixed number of workers (private module path)
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # another Ray: keep the stock policy
    FixedScalingPolicy = None


if FixedScalingPolicy is not None:
    class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
        """The fixed-size policy, minus its calls to the autoscaling coordinator (no actor started)."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass


class PrivateRayTorchTrainer(TorchTrainer):
    """``TorchTrainer`` for a Ray instance this process started, with no Ray Datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if type(c).__name__ not in _DROPPED_CALLBACKS]

    def _initialize_and_run_controller(self, **kwargs):
        policy = kwargs.get("scaling_policy")
        if FixedScalingPolicy is not None and type(policy) is FixedScalingPolicy \
                and all(hasattr(policy, m) for m in _COORDINATOR_METHODS):
            policy.__class__ = FixedScalingWithoutAutoscaler
        return super()._initialize_and_run_controller(**kwargs)


__all__ = ["PrivateRayTorchTrainer"]
