"""``init_from``: start a backbone from saved weights instead of random ones.

``init_from: PATH`` (pretraining, and the evaluation's *init* column) reads one of:

* a gelato run (``RUN``: its ``checkpoints/final/backbone.pt``) or a ``backbone.pt``: the same
  architecture is required (name and ``backbone_params``), the error names both;
* a gelato export in the ``torchvision`` or ``timm`` format (``gelato export``), or any
  ``torchvision.models.resnet*`` state dict (``resnet18-f37072fd.pth`` ...; also under a
  ``state_dict`` / ``model`` key, as many training scripts save it): keys are torchvision's, and
  ours are torchvision's under ``net.``; the classifier (``fc.*``) is dropped.

Where the file's first convolution takes 3 channels and the run's images have 1 (Fashion-MNIST), its
kernels are summed over the colour channels, as ``timm.models.adapt_input_conv`` does; the
opposite (1 → 3) repeats them divided by 3. Every other mismatch (a 7×7 stem against the small 3×3
stem, another width or depth) fails naming the file, the key and both shapes. TorchScript and ONNX
exports hold no state dict to start from: export ``torchvision`` instead.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Optional

from workers.config import ConfigError

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


@dataclass
class InitWeights:
    """What ``init_from`` read: the backbone's state dict, where from, and what was adapted."""

    path: str
    sha256: str
    kind: str                                       # "gelato" | "state_dict"
    state: dict = field(repr=False)
    notes: list[str] = field(default_factory=list)  # e.g. the first convolution adapted to 1 channel

    def describe(self) -> str:
        return f"{self.path} ({self.kind}, sha256 {self.sha256[:16]})" + (f"; {'; '.join(self.notes)}" if self.notes else "")


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".onnx", ".ts", ".torchscript")


def _resolve(path: str) -> str:
    """A run (anything but a weights file) means its final backbone.pt."""
    from workers.model import BACKBONE_FILE
    from workers.storage import RunLocation

    return path if path.endswith(WEIGHT_SUFFIXES) else RunLocation(path).join(BACKBONE_FILE)


def _read(path: str, storage_options: Optional[dict]) -> bytes:
    from workers.storage import filesystem

    if path.endswith((".onnx", ".ts", ".torchscript")):
        raise ConfigError(f"init_from {path}: an ONNX / TorchScript export holds no state dict to start from; "
                          f"export the run with --format torchvision and start from that")
    try:
        with filesystem(path, storage_options).open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"init_from {path}: no such file (give a gelato run, a backbone.pt, or a torchvision "
                          f"state dict)") from None


def _adapt_first_conv(name: str, theirs, ours, notes: list[str]):
    """A first convolution's kernels for our input channels (3 → 1 summed, 1 → 3 repeated / 3)."""
    if theirs.dim() != 4 or theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return theirs
    cin, want = theirs.shape[1], ours.shape[1]
    if (cin, want) == (3, 1):
        notes.append(f"{name} summed over its 3 input channels for 1-channel images")
        return theirs.sum(dim=1, keepdim=True)
    if (cin, want) == (1, 3):
        notes.append(f"{name} repeated over 3 input channels (divided by 3)")
        return theirs.repeat(1, 3, 1, 1) / 3
    return theirs


def _matched(path: str, theirs: dict, ours: dict, notes: list[str]) -> dict:
    """``theirs`` renamed to ``ours``' keys (torchvision's keys take the ``net.`` prefix), checked."""
    import torch

    if not set(theirs) & set(ours) and any(k.startswith("net.") for k in ours):
        theirs = {"net." + k: v for k, v in theirs.items()}
    dropped = [k for k in theirs if k not in ours and k.removeprefix("net.").startswith(CLASSIFIER_PREFIXES)]
    theirs = {k: v for k, v in theirs.items() if k not in dropped}
    missing, unexpected = (sorted(k.removeprefix("net.") for k in set(a) - set(b))
                           for a, b in ((ours, theirs), (theirs, ours)))
    if missing or unexpected:
        raise ConfigError(f"init_from {path}: its weights are not this backbone's: "
                          + "; ".join(x for x in (f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                                                  f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"
                                                  if unexpected else "") if x))
    out = {}
    first = next((k for k, v in ours.items() if getattr(v, "dim", lambda: 0)() == 4), None)
    for k, v in theirs.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"init_from {path}: {k} is a {type(v).__name__}, not a tensor")
        if k == first and v.shape != ours[k].shape:
            v = _adapt_first_conv(k.removeprefix("net."), v, ours[k], notes)
        if v.shape != ours[k].shape:
            raise ConfigError(f"init_from {path}: {k.removeprefix('net.')} is {tuple(v.shape)} there and "
                              f"{tuple(ours[k].shape)} in this backbone (another width, depth or stem: "
                              f"backbone_params must match the file's)")
        out[k] = v.to(ours[k].dtype)
    if dropped:
        notes.append(f"classifier dropped ({', '.join(k.removeprefix('net.') for k in dropped)})")
    return out


def read_init(path: str, backbone, storage_options: Optional[dict] = None) -> InitWeights:
    """The state dict ``backbone`` (built by ``backbones.build``) loads with ``strict=True`` from ``path``."""
    import torch

    path = _resolve(os.path.expanduser(path) if path.startswith("~") else path)
    data = _read(path, storage_options)
    sha = hashlib.sha256(data).hexdigest()
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, the file is not weights
        raise ConfigError(f"init_from {path}: not a torch state dict or gelato backbone ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"init_from {path}: holds a {type(loaded).__name__}, not a state dict")
    ours = backbone.state_dict()
    notes: list[str] = []
    if "backbone" in loaded and "backbone_name" in loaded:  # a gelato backbone.pt
        mine = getattr(backbone, "name", None)
        if loaded["backbone_name"] != mine:
            raise ConfigError(f"init_from {path}: a {loaded['backbone_name']} backbone, and this run trains a "
                              f"{mine}; set backbone: {loaded['backbone_name']} (backbone_params "
                              f"{loaded.get('backbone_params')})")
        return InitWeights(path, sha, "gelato", _matched(path, loaded["backbone"], ours, notes), notes)
    for key in ("state_dict", "model", "backbone"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    return InitWeights(path, sha, "state_dict", _matched(path, loaded, ours, notes), notes)


def apply_init(path: str, backbone, storage_options: Optional[dict] = None) -> InitWeights:
    """Load ``path``'s weights into ``backbone`` (strict) and return what was read."""
    init = read_init(path, backbone, storage_options)
    backbone.load_state_dict(init.state, strict=True)
    return init


def check_init(config, in_channels: int, storage_options: Optional[dict] = None) -> InitWeights:
    """Read ``config.init_from`` against the backbone ``config`` builds (the pre-flight: a mismatch
    fails before Ray or Prefect start)."""
    from workers.model import build_objective

    got: list[InitWeights] = []
    build_objective(config, in_channels, lambda b: got.append(read_init(config.init_from, b, storage_options)))
    return got[0]
