"""What Ray Train's controller unpickles on a private instance must not import torch (2.5 s of its start)."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from workers.pretrain.ray_internals.ray_controller import FixedScalingWithoutAutoscaler, LocalTorchConfig
from workers.pretrain.ray_internals.ray_local import torch_free_controller_supported

pytestmark = pytest.mark.slow  # subprocesses importing Ray


def test_the_pinned_ray_has_what_the_torch_free_backend_calls():
    # if a Ray upgrade renames these, launch() falls back to the stock TorchConfig: this says so
    assert torch_free_controller_supported()


def test_unpickling_the_controllers_objects_imports_no_torch():
    blob = pickle.dumps((LocalTorchConfig(backend="gloo"), FixedScalingWithoutAutoscaler))
    code = ("import pickle, sys; cfg, policy = pickle.loads(sys.stdin.buffer.read()); "
            "b = cfg.backend_cls(); assert b.share_cuda_visible_devices and cfg.to_dict()['backend'] == 'gloo'; "
            "print(cfg.framework); print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True).stdout.decode()
    framework, modules = out.strip().splitlines()
    assert "TORCH" in framework.upper()
    assert modules == "[]"
