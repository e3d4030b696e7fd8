"""What Ray Train's controller actor unpickles for a private local Ray instance: imports Ray only.

When ``gelato pretrain`` runs with no cluster address it starts a Ray instance of its own, which
lives and dies with the command. On a two-core laptop every second the controller spends before it
asks for the workers is a second added to the first step, with the other core idle. Two things in
the stock set-up cost it most of that time, and are replaced here (``workers.pretrain.ray_internals.ray_local`` wires them
in):

- the scaling policy calls the autoscaling coordinator, an actor the controller waits for before it
  requests the workers and pings every 20 s. A private instance has no autoscaler to tell:
  ``FixedScalingWithoutAutoscaler`` leaves the calls out.
- ``TorchConfig``'s module imports torch (2.5 s of the controller's start on this machine), only
  for the controller to send three functions to the workers. ``LocalTorchConfig`` is the same
  configuration whose backend sends the same functions of ``ray.train.torch.config`` by name: they
  are imported in the workers, which load torch anyway.

What is replaced is chosen by Ray Train V2's class, method and function names (Ray 2.5x–2.6x); the
driver checks they exist (``ray_local.torch_free_controller_supported``) and otherwise runs the
stock behaviour. This module must never import torch, directly or through ``ray.train.torch``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

# functions of ray.train.torch.config that the backend runs on the workers, by name
TORCH_CONFIG_FUNCTIONS = ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch")
COORDINATOR_METHODS = ("_send_resource_request", "_maybe_send_resource_request", "_cancel_resource_request")

try:  # Ray Train V2's policy for a fixed number of workers (private module path)
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # another Ray: keep the stock policy
    FixedScalingPolicy = None


try:  # Ray Train V2's failure policy (private module path)
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
except ImportError:  # another Ray: keep the stock policy
    DefaultFailurePolicy = None

DAMAGED_DATA_ERROR = "CorruptShard"  # workers.data.integrity's exception, by name: no torch or fsspec here


if DefaultFailurePolicy is not None:
    class StopOnDamagedData(DefaultFailurePolicy):
        """The stock policy, except that a worker error caused by a damaged shard is raised at once:
        a restarted worker group would read the same bytes (each retry costs a worker-group start)."""

        def make_decision(self, training_failed_error):
            failures = getattr(training_failed_error, "worker_failures", None) or {}
            if any(DAMAGED_DATA_ERROR in f"{type(e).__name__}: {e}" for e in failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)


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


# --- run on the workers -------------------------------------------------------------------------
def _in_torch_config(name: str, **kwargs):
    """Call ``ray.train.torch.config.<name>`` in this worker (torch is imported here, not in the controller)."""
    from ray.train.torch import config as torch_config

    return getattr(torch_config, name)(**kwargs)


def _address_and_port() -> tuple[str, int]:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class TorchDeviceContext:
    """``TorchConfigContextManager`` (selects the worker's CUDA device), imported when entered."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


# --- run in the controller ----------------------------------------------------------------------
class LocalTorchBackend(Backend):
    """``ray.train.torch.config._TorchBackend`` for gloo/NCCL with ``env://`` rendezvous, without torch here."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: "LocalTorchConfig") -> None:
        addr, port = worker_group.execute_single(0, _address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_in_torch_config, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(i, _in_torch_config, "_setup_torch_process_group",
                                                   backend=backend_config.backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: "LocalTorchConfig") -> None:
        from ray.exceptions import GetTimeoutError

        futures = worker_group.execute_async(_in_torch_config, "_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        timeout_s = float(os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", 30))  # as Ray's backend
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s s", timeout_s)


@dataclass
class LocalTorchConfig(BackendConfig):
    """``TorchConfig(backend=..., init_method="env")`` whose module does not import torch."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return LocalTorchBackend

    @property
    def train_func_context(self):
        return TorchDeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


__all__ = ["COORDINATOR_METHODS", "DefaultFailurePolicy", "FixedScalingPolicy", "LocalTorchConfig",
           "TORCH_CONFIG_FUNCTIONS"]
if FixedScalingPolicy is not None:
    __all__.append("FixedScalingWithoutAutoscaler")
if DefaultFailurePolicy is not None:
    __all__.append("StopOnDamagedData")
