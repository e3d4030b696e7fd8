"""A run's backbone written for the library a user loads it with, and checked there.

``export(run, fmt, out)`` reads ``checkpoints/final/backbone.pt`` (or a given ``backbone.pt``),
writes ``out`` in one of :data:`FORMATS` and ``out.json`` beside it (``spec.input_spec``: the
architecture, input size, channels and normalisation), then loads ``out`` back with the target
library and compares its features with gelato's own backbone on the same batch of random inputs,
refusing the export if they differ by more than :data:`ATOL` (float32, CPU):

* ``torchvision`` — a ``state_dict`` for ``torchvision.models.resnet18`` / ``resnet50`` (ResNet
  backbones of width 64: torchvision's and timm's constructors have no narrower ResNet, so the
  demo's width-32 backbone goes out as TorchScript or ONNX); every key matches, the classifier
  ``fc`` excepted. A small-stem backbone
  loads into the same model with its stem swapped (``conv1`` 3×3 stride 1, ``maxpool`` removed):
  the JSON's ``load`` field says how;
* ``timm`` — a ``state_dict`` for ``timm.create_model("resnet18" | "resnet50", num_classes=0)``
  (width 64, the small stem swapped in the same way), loaded with ``strict=True``;
* ``torchscript`` — ``torch.jit.trace`` of the backbone: ``torch.jit.load(out)`` needs neither
  gelato nor the architecture's code (any backbone);
* ``onnx`` — ``torch.onnx.export`` with a dynamic batch axis, opset 18, input ``image``, output
  ``features``; checked with onnxruntime (any backbone; fixed ``image_size``).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Callable, Optional

import torch

from workers.export import FORMATS
from workers.export.spec import input_spec
from workers.model import backbone_path, load_backbone
from workers.storage import filesystem

ATOL = 1e-4                 # max |difference| of the features, float32 on CPU
OPSET = 18
EXTRA = "pip install 'gelato[export]'"


class ExportError(ValueError):
    """This backbone cannot be written in this format (the message says which formats can)."""


def _resnet_depth(spec: dict, fmt: str) -> int:
    if spec["architecture"] not in ("resnet18", "resnet50"):
        raise ExportError(f"{fmt}: only ResNet-18/50 backbones map onto {fmt}'s models; this one is "
                          f"{spec['architecture']}: export it as torchscript or onnx")
    return int(spec["architecture"][len("resnet"):])


def _stem(spec: dict) -> tuple[bool, int]:
    p = spec["backbone_params"]
    return bool(p.get("small_stem", False)), int(p.get("width", 64))


def _torchvision_state(backbone: torch.nn.Module) -> dict:
    """Our ResNet's keys are torchvision's under ``net.`` (``ssl_models/resnet.py``)."""
    return {k[len("net."):]: v for k, v in backbone.state_dict().items() if k.startswith("net.")}


def torchvision_model(spec: dict) -> torch.nn.Module:
    """The torchvision model an exported ``state_dict`` loads into (its ``fc`` left as built)."""
    import torchvision

    depth = _resnet_depth(spec, "torchvision")
    small, width = _stem(spec)
    if width != 64:
        raise ExportError(f"torchvision: its ResNet constructors have no width; this backbone has width {width}: "
                          "export it as timm (any width), torchscript or onnx, or pretrain with width 64")
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if small:
        model.conv1 = torch.nn.Conv2d(spec["in_channels"], width, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    elif spec["in_channels"] != 3:
        model.conv1 = torch.nn.Conv2d(spec["in_channels"], width, 7, 2, 3, bias=False)
    return model


def timm_model(spec: dict) -> torch.nn.Module:
    """The timm model an exported ``state_dict`` loads into with ``strict=True`` (no classifier)."""
    try:
        import timm
    except ImportError:
        raise ExportError(f"timm is not installed: {EXTRA}") from None
    depth = _resnet_depth(spec, "timm")
    small, width = _stem(spec)
    if width != 64:  # timm's ResNet takes `channels`, but its plain stem is 64 wide whatever they are
        raise ExportError(f"timm: its ResNet stem is 64 channels wide; this backbone has width {width}: "
                          "export it as torchscript or onnx, or pretrain with width 64")
    model = timm.create_model(f"resnet{depth}", pretrained=False, num_classes=0, in_chans=spec["in_channels"])
    if small:
        model.conv1 = torch.nn.Conv2d(spec["in_channels"], width, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def _load_snippet(fmt: str, spec: dict, name: str) -> str:
    small, width = _stem(spec) if spec["architecture"].startswith("resnet") else (False, 0)
    stem = (f"; m.conv1 = torch.nn.Conv2d({spec['in_channels']}, {width}, 3, 1, 1, bias=False); "
            "m.maxpool = torch.nn.Identity()") if small else ""
    if fmt == "torchvision":
        return (f"m = torchvision.models.{spec['architecture']}(weights=None){stem}; "
                f"m.load_state_dict(torch.load('{name}'), strict=False)  # all but fc; then m.fc = torch.nn.Identity()")
    if fmt == "timm":
        return (f"m = timm.create_model('{spec['architecture']}', num_classes=0, in_chans={spec['in_channels']})"
                f"{stem}; m.load_state_dict(torch.load('{name}'))")
    if fmt == "torchscript":
        return f"m = torch.jit.load('{name}')"
    return (f"s = onnxruntime.InferenceSession('{name}'); "
            "features = s.run(['features'], {'image': x.numpy()})[0]")


def _write_local(out: str, write: Callable[[str], None]) -> None:
    """``write(path)`` to a temporary file beside ``out``, then renamed: never a half-written export."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check(fmt: str, out: str, spec: dict, backbone: torch.nn.Module, x: torch.Tensor) -> float:
    """Load ``out`` with the target library; the largest |difference| from ``backbone`` on ``x``."""
    with torch.no_grad():
        want = backbone(x)
        if fmt in ("torchvision", "timm"):
            model = torchvision_model(spec) if fmt == "torchvision" else timm_model(spec)
            state = torch.load(out, map_location="cpu", weights_only=True)
            if fmt == "torchvision":
                missing, unexpected = model.load_state_dict(state, strict=False)
                if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
                    raise ExportError(f"torchvision: the state dict does not match: missing {missing}, "
                                      f"unexpected {unexpected}")
                model.fc = torch.nn.Identity()
            else:
                model.load_state_dict(state, strict=True)
            got = model.eval()(x)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                got = torch.jit.load(out, map_location="cpu")(x)
        else:
            try:
                import onnxruntime
            except ImportError:
                raise ExportError(f"onnxruntime is not installed: {EXTRA}") from None
            session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(["features"], {"image": x.numpy()})[0])
    if got.shape != want.shape:
        raise ExportError(f"{fmt}: {out} gives features of shape {tuple(got.shape)}, gelato's backbone "
                          f"{tuple(want.shape)}")
    return float((got - want).abs().max())


def export(run_or_file: str, fmt: str, out: str, storage_options: Optional[dict] = None,
           batch: int = 4, seed: int = 0) -> dict:
    """Write a run's backbone as ``fmt`` to the local path ``out`` and its spec to ``out.json``;
    returns the spec with the check's result. See the module for the formats."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if "://" in out and not out.startswith("file://"):
        raise ExportError(f"--out {out}: exports are written to a local path")
    out = out[len("file://"):] if out.startswith("file://") else out
    path = backbone_path(run_or_file)
    backbone, payload = load_backbone(path, storage_options)
    spec = input_spec(payload)
    backbone.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec["in_channels"], spec["image_size"], spec["image_size"], generator=g)

    if fmt in ("torchvision", "timm"):
        model = torchvision_model(spec) if fmt == "torchvision" else timm_model(spec)  # refuses what cannot map
        state = _torchvision_state(backbone)
        if fmt == "timm":
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        target = set(model.state_dict()) - ({"fc.weight", "fc.bias"} if fmt == "torchvision" else set())
        if set(state) != target:
            raise ExportError(f"{fmt}: keys differ from {type(model).__name__}'s: "
                              f"only ours {sorted(set(state) - target)[:5]}, only theirs {sorted(target - set(state))[:5]}")
        _write_local(out, lambda p: torch.save(state, p))
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript; users still load it
            traced = torch.jit.trace(backbone, x)
            _write_local(out, lambda p: torch.jit.save(traced, p))
    else:
        try:
            import onnx  # noqa: F401 - torch.onnx.export needs it
            import onnxscript  # noqa: F401
        except ImportError:
            raise ExportError(f"onnx export needs onnx and onnxscript: {EXTRA}") from None
        _write_local(out, lambda p: torch.onnx.export(
            backbone, (x,), p, input_names=["image"], output_names=["features"], opset_version=OPSET,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, external_data=False, dynamo=True))
    diff = _check(fmt, out, spec, backbone, x)
    if diff > ATOL:
        os.remove(out)
        raise ExportError(f"{fmt}: {out} differs from gelato's backbone by {diff:.2e} (> {ATOL:g}); removed")
    spec |= {"format": fmt, "file": os.path.basename(out), "source": path,
             "load": _load_snippet(fmt, spec, os.path.basename(out)),
             "check": {"max_abs_diff": diff, "atol": ATOL, "batch": batch}}
    with filesystem(out + ".json").open(out + ".json", "w") as f:
        json.dump(spec, f, indent=1)
    return spec
