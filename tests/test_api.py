"""``import gelato``: the README's snippet, run as written on a small folder (paths and the
pretraining's size replaced), with real Prefect, Ray, shards and onnxruntime."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from imagegen import write_separable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["backbone=small_cnn", "backbone_params={width: 8}", "image_size=8", "view.size=8", "batch_size=16",
        "workers=1", "steps=2", "knn_monitor=false"]


@pytest.mark.slow  # starts a separate Python process
def test_import_gelato_and_the_command_lines_parser_load_no_torch_ray_or_prefect():
    import subprocess

    code = ("import gelato, gelato.cli, sys; gelato.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_configs_as_models_dicts_or_yaml_with_overrides(tmp_path):
    from gelato.api import _config
    from workers.config import ConfigError, PretrainConfig

    yaml_path = os.path.join(ROOT, "configs", "fashion_mnist_simclr.yaml")
    a = _config(PretrainConfig, yaml_path, ["epochs=5"])
    b = _config(PretrainConfig, a.model_dump(exclude_unset=True), [])
    assert isinstance(a, PretrainConfig) and a.epochs == 5 and b == a
    assert _config(PretrainConfig, a, ["lr=0.5"]).lr == 0.5 and _config(PretrainConfig, a, []) is a
    with pytest.raises(ConfigError, match="epochz"):
        _config(PretrainConfig, {"epochz": 3}, [])
    with pytest.raises(TypeError, match="YAML path"):
        _config(PretrainConfig, 3, [])


@pytest.fixture()
def prefect_harness():
    """Prefect in ephemeral mode (as tests/flows/ has it): its server and log handlers end with the test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow  # starts Prefect's temporary server and a private Ray instance
def test_readme_python_snippet_runs(tmp_path, prefect_harness):
    import contextlib
    import io

    import numpy as np

    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = readme.split("<!-- snippet: python-api -->\n```python\n", 1)[1].split("```", 1)[0]
    write_separable(tmp_path / "photos", n_classes=3, per_class=12, size=8)
    run = str(tmp_path / "mine")
    code = (snippet.replace("~/my_photos", str(tmp_path / "photos")).replace("runs/mine", run)
            .replace('"configs/fashion_mnist_simclr.yaml", overrides=["epochs=5"]', f"None, overrides={TINY!r}"))
    assert code != snippet and "overrides=[" in code
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), scope)
    data, result, backbone = scope["data"], scope["result"], scope["backbone"]
    assert data.splits == {"train": 29, "val": 3, "test": 4} and data.classes == ["class0", "class1", "class2"]
    assert "'test': 4" in printed.getvalue() and "linear probe, top-1" in printed.getvalue()
    assert [r["protocol"] for r in result.table][:1] == ["linear probe, top-1"]
    assert result.table[0]["pretrained"] is not None and os.path.exists(os.path.join(run, "report.json"))
    with open(os.path.join(run, "export", "backbone.onnx.json")) as f:
        assert json.load(f)["format"] == "onnx"
    images = torch.from_numpy(np.zeros((2, 1, 8, 8), np.uint8))
    assert backbone(images).shape == (2, backbone.feature_dim) == (2, 32)
