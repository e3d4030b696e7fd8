"""The shipped run configurations under ``configs/``.

Every YAML file validates with :func:`workers.config.load_config`, names the command that runs it
in its header (a command the CLI parses), and the CPU ones build their objective and take one
forward/backward step on a tiny batch (backbone narrowed to width 8, so the whole file stays
fast). The ImageNet ones are built, not run. Bad keys and ill-typed values fail naming the key.
"""
from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import torch
import yaml

from ssl_models.objectives import OBJECTIVES
from workers.config import ConfigError, load_config
from workers.hardware import resolve_here
from workers.model import build_objective

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIPELINE_CONFIGS = sorted((ROOT / "configs").glob("pipeline_*.yaml"))  # whole-pipeline configs, checked below
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p not in PIPELINE_CONFIGS)
GPU_CONFIGS = [p for p in CONFIGS if p.name.startswith("imagenet_")]
CPU_CONFIGS = [p for p in CONFIGS if p not in GPU_CONFIGS]
IMAGENET = {"imagenet_simclr_r50.yaml": "simclr", "imagenet_moco_v2_r50.yaml": "moco",
            "imagenet_byol_r50.yaml": "byol", "imagenet_mae_vit.yaml": "mae"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(p: pathlib.Path) -> str:
    return p.stem


def _channels(path: pathlib.Path) -> int:
    """Image channels of the source the config is written for (VOC, Moving Fashion-MNIST's tinted
    items are RGB, Fashion-MNIST grayscale)."""
    return 3 if path.name.startswith(("voc07_", "imagenet_", "moving_fmnist_")) else 1


def _header(path: pathlib.Path) -> list[str]:
    """The leading comment block, without the '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _gelato_commands(lines: list[str]) -> list[list[str]]:
    """The words after ``gelato`` of every command line ``gelato STAGE ...`` (or ``... -- gelato STAGE ...``)."""
    out = []
    for line in lines:
        m = re.search(r"(?:^|\s--\s+)gelato\s+(\S.*)$", line)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


# --------------------------------------------------------------------------- coverage

def test_one_cpu_config_per_objective():
    fashion = {p.stem.removeprefix("fashion_mnist_") for p in CONFIGS if p.name.startswith("fashion_mnist_")}
    clips = {n for n, c in OBJECTIVES.items() if c.modality in ("clip", "audiovisual")}
    sound = {n for n, c in OBJECTIVES.items() if c.modality == "audio"}
    # colorization predicts colour, which grayscale Fashion-MNIST lacks: it gets an RGB (VOC) config;
    # the objectives that learn from time get a Moving Fashion-MNIST one, those that learn from sound a
    # spoken-digits one
    assert fashion == set(OBJECTIVES) - {"colorization"} - clips - sound
    assert {p.stem.removeprefix("moving_fmnist_") for p in CONFIGS if p.name.startswith("moving_fmnist_")} == clips
    assert {p.stem.removeprefix("spoken_digits_") for p in CONFIGS if p.name.startswith("spoken_digits_")} == sound
    assert (ROOT / "configs" / "voc07_colorization.yaml").is_file()
    assert {p.name for p in GPU_CONFIGS} == set(IMAGENET)


# --------------------------------------------------------------------------- every file validates

@pytest.mark.parametrize("path", CONFIGS, ids=_ids)
def test_config_loads_and_matches_its_name(path):
    raw = yaml.safe_load(path.read_text())
    config = load_config(str(path))
    assert config.objective == raw["objective"]
    if path.name.startswith("fashion_mnist_"):
        assert config.objective == path.stem.removeprefix("fashion_mnist_")
    elif path.name in IMAGENET:
        assert config.objective == IMAGENET[path.name]
    elif path.name.startswith("moving_fmnist_"):
        assert config.objective == path.stem.removeprefix("moving_fmnist_")
    elif path.name.startswith("spoken_digits_"):
        assert config.objective == path.stem.removeprefix("spoken_digits_") and config.backbone.startswith("audio_")
    else:
        assert path.name == "voc07_colorization.yaml" and config.objective == "colorization"
    assert config.batch_size % (config.workers * config.grad_accum) == 0
    if config.backbone.startswith("vit"):
        assert config.image_size % config.backbone_params["patch_size"] == 0
        assert config.channels_last is False
    else:
        assert config.channels_last == "auto"  # resolved per device (workers/hardware.py)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=_ids)
def test_cpu_config_is_set_for_cpu(path):
    config = load_config(str(path))
    assert not config.use_gpu
    assert config.precision == "auto" and config.workers == 2 and config.loader_workers == 1
    if path.name.startswith("fashion_mnist_"):
        assert config.image_size == 28
    if config.backbone == "resnet18":
        assert config.backbone_params == {"small_stem": True, "width": 32}


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_ids)
def test_imagenet_config_is_set_for_gpus(path):
    config = load_config(str(path))
    assert config.use_gpu and config.workers >= 8
    assert config.image_size == 224 and config.precision == "auto"
    assert 1024 <= config.batch_size <= 4096
    assert 100 <= config.epochs <= 800
    if config.backbone == "resnet50":
        assert config.backbone_params.get("small_stem") is False
    # views that normalise use ImageNet's statistics
    views = [config.view and config.view.given()] + [v for k, v in config.objective_params.items() if k.endswith("view") or k in ("view1", "view2")]
    for v in filter(None, views):
        assert list(v["mean"]) == list(IMAGENET_MEAN) and list(v["std"]) == list(IMAGENET_STD)


# --------------------------------------------------------------------------- the header's command

@pytest.mark.parametrize("path", CONFIGS, ids=_ids)
def test_header_names_a_command_that_runs_this_file(path):
    from gelato.cli import build_parser

    header = _header(path)
    assert header and header[0], f"{path.name}: start with a comment saying what the config is"
    commands = _gelato_commands(header)
    pretrain = [c for c in commands if c[0] == "pretrain"]
    assert pretrain, f"{path.name}: the header names no `gelato pretrain ...` command"
    parser = build_parser()
    for words in commands:
        args = parser.parse_args(words)  # SystemExit here = a stage or option the CLI does not know
        if args.stage == "pretrain":
            assert args.config == f"configs/{path.name}"
            load_config(str(ROOT / args.config), args.overrides)  # its overrides validate too


# --------------------------------------------------------------------------- CPU configs take a step

def _one_step(config, in_channels: int, side: int = 28) -> torch.Tensor:
    """Build the objective as the training loop does, then one forward/backward on 4 random images
    (clips of 8 frames for an objective that learns from time, utterances for one that learns from sound)."""
    torch.manual_seed(0)
    ex = resolve_here(config.precision, "cpu", config.layout_request())  # what the loop runs on this CPU
    objective = build_objective(config, in_channels=in_channels).train()
    if ex.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    clip = (8,) if objective.modality in ("clip", "audiovisual") else ()
    images = torch.randint(0, 256, (4, *clip, in_channels, side, side), dtype=torch.uint8)
    if objective.modality == "audio":  # four one-second utterances at 16 kHz
        images = 0.1 * torch.randn(4, 1, 16000)
    if objective.modality == "audiovisual":  # clips with their 0.8 s sound tracks
        images = {"clip": images, "audio": 0.1 * torch.randn(4, 1, 12800)}
    views = objective.make_views(images, generator=torch.Generator().manual_seed(0))
    if ex.channels_last:
        views = {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.ndim == 4 else v
                 for k, v in views.items()}
    objective.set_progress(0, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ex.precision == "bf16"):
        out = objective(views)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{config.objective}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in objective.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    objective.after_step()
    return loss.detach()


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=_ids)
def test_cpu_config_builds_and_takes_a_step(path):
    backbone = load_config(str(path)).backbone
    cheap = (["backbone_params.width=8"] if backbone.startswith("resnet") else
             ["backbone_params.dim=16"] if backbone.startswith("audio_") else [])
    if path.name == "fashion_mnist_jigsaw.yaml":
        cheap.append("objective_params.n_perms=10")  # the greedy search for 100 permutations takes seconds
    config = load_config(str(path), cheap)
    _one_step(config, _channels(path))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_ids)
def test_imagenet_config_builds(path):
    config = load_config(str(path))
    objective = build_objective(config, in_channels=3)
    expected = {"resnet50": 2048, "vit_small": 384}[config.backbone]
    assert objective.backbone.feature_dim == expected
    assert objective.image_size == 224


# --------------------------------------------------------------------------- bad files fail naming the key

def _write(tmp_path: pathlib.Path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, key", [
    ("objective: simclr\nbatch_sise: 256\n", "batch_sise"),                                 # unknown top-level key
    ("objective: simclr\nobjective_params:\n  temprature: 0.2\n", "temprature"),             # unknown objective param
    ("objective: simclr\nbackbone_params:\n  small_stem: true\n  widht: 32\n", "widht"),   # unknown backbone param
    ("objective: simclr\nview:\n  scale: [0.2, 1.0]\n  blurp: 0.5\n", "blurp"),               # unknown view field
    ("objective: simclr\nbatch_size: lots\n", "batch_size"),                                 # ill-typed
    ("objective: simclr\nlr: fast\n", "lr"),
    ("objective: simclr\nchannels_last: sometimes\n", "channels_last"),
    ("objective: simclr\nprecision: fp8\n", "precision"),                                    # not one of the choices
    ("objective: simclr\nepochs: -1\n", "epochs"),                                           # out of range
    ("objective: simcrl\n", "objective"),                                                    # unknown name
])
def test_bad_key_or_value_fails_naming_it(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load_config(_write(tmp_path, text))


def test_shipped_config_with_a_typo_fails_naming_the_key(tmp_path):
    text = (ROOT / "configs" / "fashion_mnist_moco.yaml").read_text()
    bad = text.replace("queue_size:", "queue_sise:")
    assert bad != text
    with pytest.raises(ConfigError, match="queue_sise"):
        load_config(_write(tmp_path, bad))
    with pytest.raises(ConfigError, match=r"\bepochs\b"):
        load_config(str(ROOT / "configs" / "fashion_mnist_moco.yaml"), ["epochs=many"])


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=_ids)
def test_pipeline_config_validates(path):
    from flows.pipeline import load_pipeline_config

    cfg = load_pipeline_config(str(path))
    assert cfg.pretrain.objective in ("simclr", "moco", "byol", "swav", "tcn", "av_correspondence", "apc", "cpc_audio",
                                      "wav2vec2", "pase") and cfg.evaluate.protocols
    assert cfg.pretrain.precision == cfg.evaluate.precision == "auto"  # resolved on the machine it meets
    if path.name == "pipeline_demo.yaml":  # sized to the machine: within 20 minutes on any 2-core x86 CPU
        assert cfg.pretrain.budget_minutes + cfg.evaluate.budget_minutes <= 14
    if path.name == "pipeline_video_demo.yaml":  # generated clips with masks and two cameras: every video protocol
        assert cfg.ingest.source == "moving-fashion-mnist" and cfg.pretrain.budget_minutes <= 8
        assert set(cfg.evaluate.video_protocols) == {"clip_probe", "clip_knn", "label_propagation", "alignment"}
    if path.name == "pipeline_av_demo.yaml":  # clips with sound: which item sounds, and where
        assert cfg.ingest.source == "moving-fashion-mnist-sound" and cfg.pretrain.budget_minutes <= 8
        assert set(cfg.evaluate.av_protocols) == {"av_retrieval", "av_localisation"}
    if path.name == "pipeline_audio_demo.yaml":  # generated speech: the word and the voice, vs log-mel
        assert cfg.ingest.source == "spoken-digits" and cfg.pretrain.budget_minutes <= 8
        assert "raw_pixels" in cfg.evaluate.baselines and "supervised" in cfg.evaluate.baselines


def test_a_backbone_brings_its_own_defaults():
    # before: `backbone=small_cnn` failed with "backbone_params.small_stem: unknown parameter of small_cnn",
    # the default ResNet's parameters applied to a backbone the user chose
    assert load_config(None, ["backbone=small_cnn"]).backbone_params == {}
    assert load_config(None, ["backbone=vit_tiny"]).backbone_params == {}
    assert load_config(None, []).backbone_params == {"small_stem": True, "width": 32}  # the default network
    assert load_config(None, ["backbone=resnet18"]).backbone_params == {"small_stem": True, "width": 32}
    given = load_config(None, ["backbone=resnet18", "backbone_params={width: 64}"])
    assert given.backbone_params == {"width": 64}  # what the user writes is taken as written
    # a config written before this change reads back to the same training hash
    old = load_config(None, []).model_dump(mode="json")
    assert load_config(None, []).training_hash() == type(load_config(None, []))(**old).training_hash()


@pytest.mark.parametrize("override, says", [
    ("backbone_params.width=0", "width >= 8"),
    ("objective_params.temperature=hot", "objective_params={'temperature': 'hot'}"),
    ("backbone_params.patch_size=5", "divisible by patch_size"),
])
def test_a_parameter_value_the_objective_refuses_fails_before_any_machinery(override, says):
    from workers.model import check_buildable

    extra = ["backbone=vit_tiny"] if "patch_size" in override else []
    config = load_config(None, extra + [override])  # names and types of the fields pass ...
    with pytest.raises(ConfigError, match=re.escape(says)):  # ... the value is refused when built
        check_buildable(config)


def test_the_typed_names_and_view_are_those_of_the_registries():
    """objective/backbone are Literals spelled out in workers/config.py (so configs load without torch)
    and view is a typed model of ViewConfig's fields: each must match what ssl_models holds."""
    import dataclasses
    import typing

    from ssl_models import backbones, objectives
    from ssl_models.augment import ViewConfig
    from workers.config import BackboneName, ObjectiveName, ViewParams

    assert set(typing.get_args(ObjectiveName)) == set(objectives.OBJECTIVES)
    assert set(typing.get_args(BackboneName)) == set(backbones.BACKBONES)
    assert set(ViewParams.model_fields) == {f.name for f in dataclasses.fields(ViewConfig)}
    # every default of ViewConfig is a valid override, and the typed view reaches the objective as given
    defaults = ViewParams(**dataclasses.asdict(ViewConfig()))
    assert dataclasses.replace(ViewConfig(), **defaults.given()) == ViewConfig()


def test_colorization_on_grayscale_images_fails_on_the_driver_naming_the_reason():
    """The objective's own check (ssl_models), reached through check_buildable before any Ray work."""
    from workers.config import ConfigError, load_config
    from workers.model import check_buildable

    config = load_config(None, ["objective=colorization", "backbone=small_cnn"])
    check_buildable(config, 3)
    with pytest.raises(ConfigError, match=r"colorization needs colour images \(3 channels\) but these have 1"):
        check_buildable(config, 1)
