"""``gelato export``: each format loaded back with its own library (torchvision, timm, TorchScript,
onnxruntime) gives gelato's features on the same batch, within ``ATOL`` (float32, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from evalrun import ingest_folder, pretrain_by_hand
from imagegen import write_separable
from workers.export.formats import ATOL, ExportError, export, timm_model, torchvision_model
from workers.model import load_backbone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESNET = ("backbone=resnet18", "backbone_params={small_stem: true, width: 64}", "image_size=16", "view.size=16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two briefly pretrained runs on 1-channel 16 px images: a small-stem ResNet-18 of width 64 and
    the tests' small CNN."""
    root = tmp_path_factory.mktemp("export")
    write_separable(root / "src", n_classes=3, per_class=12, size=16)
    out = {}
    for name, overrides in (("resnet", RESNET), ("cnn", ())):
        run = str(root / name)
        pretrain_by_hand(run, ingest_folder(str(root / "src"), run), steps=2, overrides=overrides)
        out[name] = run
    out["src"] = str(root / "src")
    return out


def _batch(spec: dict, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, spec["in_channels"], spec["image_size"], spec["image_size"],
                       generator=torch.Generator().manual_seed(seed))


def _ours(run: str, x: torch.Tensor) -> torch.Tensor:
    backbone, _ = load_backbone(os.path.join(run, "checkpoints/final/backbone.pt"))
    with torch.no_grad():
        return backbone.eval()(x)


def test_torchvision_state_dict_loads_into_torchvision_resnet18(runs, tmp_path):
    import torchvision

    out = str(tmp_path / "r18.pth")
    spec = export(runs["resnet"], "torchvision", out)
    assert spec["check"]["max_abs_diff"] <= ATOL and spec["format"] == "torchvision"
    # as a user would, from the JSON alone: torchvision's own resnet18 with the stem the JSON names
    with open(out + ".json") as f:
        saved = json.load(f)
    assert saved["architecture"] == "resnet18" and saved["backbone_params"]["small_stem"] is True
    assert saved["in_channels"] == 1 and saved["image_size"] == 16 and saved["feature_dim"] == 512
    assert len(saved["mean"]) == len(saved["std"]) == 1 and "maxpool = torch.nn.Identity()" in saved["load"]
    m = torchvision.models.resnet18(weights=None)
    m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    missing, unexpected = m.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert (sorted(missing), unexpected) == (["fc.bias", "fc.weight"], [])
    m.fc = torch.nn.Identity()
    x = _batch(saved)
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), _ours(runs["resnet"], x), atol=ATOL)


def test_timm_state_dict_loads_strictly_into_timm_resnet18(runs, tmp_path):
    import timm

    out = str(tmp_path / "r18-timm.pth")
    export(runs["resnet"], "timm", out)
    m = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = _batch({"in_channels": 1, "image_size": 16})
    with torch.no_grad():
        assert torch.allclose(m.eval()(x), _ours(runs["resnet"], x), atol=ATOL)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_torchscript_and_onnx_run_without_gelato_and_take_any_batch(runs, tmp_path, fmt):
    out = str(tmp_path / f"cnn.{fmt}")
    spec = export(runs["cnn"], fmt, out)
    assert spec["architecture"] == "small_cnn" and spec["check"]["max_abs_diff"] <= ATOL
    x = _batch(spec, n=5)  # another batch size than the export's
    if fmt == "torchscript":
        got = torch.jit.load(out)(x)
    else:
        import onnxruntime

        s = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(s.run(["features"], {"image": x.numpy()})[0])
    assert got.shape == (5, spec["feature_dim"])
    assert torch.allclose(got, _ours(runs["cnn"], x), atol=ATOL)


def test_formats_that_cannot_hold_the_backbone_say_which_can(runs, tmp_path):
    for fmt in ("torchvision", "timm"):
        with pytest.raises(ExportError, match="torchscript or onnx"):
            export(runs["cnn"], fmt, str(tmp_path / f"x.{fmt}"))
    spec = {"architecture": "resnet18", "backbone_params": {"small_stem": True, "width": 32}, "in_channels": 1}
    with pytest.raises(ExportError, match="width 32"):
        torchvision_model(spec)
    with pytest.raises(ExportError, match="width 32"):
        timm_model(spec)
    with pytest.raises(ExportError, match="choose one of torchvision, timm, torchscript, onnx"):
        export(runs["cnn"], "keras", str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="gelato pretrain"):
        export(str(tmp_path / "no-run"), "onnx", str(tmp_path / "x.onnx"))
    assert not [p for p in os.listdir(tmp_path) if not p.startswith("no-run")]  # nothing half-written


@pytest.mark.slow  # starts a separate Python process
def test_cli_export_writes_the_file_and_its_spec(runs, tmp_path):
    out = tmp_path / "exported" / "backbone.onnx"
    done = subprocess.run([sys.executable, "-m", "gelato.cli", "export", "--run", runs["cnn"], "--format", "onnx",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists() and "max |difference|" in done.stdout and str(out) in done.stdout
    assert json.loads((tmp_path / "exported" / "backbone.onnx.json").read_text())["format"] == "onnx"
    bad = subprocess.run([sys.executable, "-m", "gelato.cli", "export", "--run", runs["cnn"], "--format", "timm",
                          "--out", str(tmp_path / "t.pth")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "torchscript or onnx" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_export_commands_and_snippet_embed_images_as_gelato_does(runs, tmp_path):
    """The README's `gelato export` lines and its "use your backbone" snippet, run as written with
    runs/demo replaced by a test run: the snippet's embeddings of image files equal gelato's."""
    import re

    import numpy as np
    from PIL import Image

    from gelato.cli import main
    from workers.config import PretrainConfig
    from workers.model import build_objective

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Use your backbone"):]
    commands = re.findall(r"^gelato (export .*)$", section, re.M)
    assert len(commands) == 2
    run = runs["resnet"]  # 16 px, as the image files: gelato's resize and PIL's are not compared here
    for line in commands:
        assert main(line.replace("runs/demo", run).split()) == 0
    snippet = section.split("<!-- snippet: use-backbone -->\n```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet.replace("runs/demo", run), "README.md", "exec"), scope)

    import pathlib

    paths = sorted(str(p) for p in pathlib.Path(runs["src"]).rglob("*.png"))[:4]
    assert len(paths) == 4
    got = torch.from_numpy(scope["embed"](paths))
    payload = torch.load(os.path.join(run, "checkpoints/final/backbone.pt"), weights_only=True)
    objective = build_objective(PretrainConfig.model_validate(payload["config"]), 1)
    backbone, _ = load_backbone(os.path.join(run, "checkpoints/final/backbone.pt"))
    images = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("L")) for p in paths]))[:, None]
    with torch.no_grad():
        want = backbone.eval()(objective.preprocess(images))
    assert got.shape == want.shape and torch.allclose(got, want, atol=ATOL)
