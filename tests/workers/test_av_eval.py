"""The audio-visual protocols: the scoring on hand-made embeddings (a "network" whose map is the
frame's brightness and whose sound embedding names a colour), then a checkpoint of the
av_correspondence objective evaluated end to end on moving-fashion-mnist-sound clips."""
from __future__ import annotations

import threading
import types

import pytest
import torch
import torch.nn.functional as F

from workers.evaluate.audiovisual import run_av_localisation, run_av_retrieval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Bright:
    """A stand-in objective: a frame's map is its brightness per channel on a 4 x 4 grid, a sound's
    embedding picks the channel its loudest sample sits in (a test double of the trained objective)."""

    def preprocess(self, images):
        return images.float() / 255.0

    def embed_map(self, frames):
        return F.normalize(F.adaptive_avg_pool2d(frames, 4) + 1e-3, dim=1)

    def embed_audio(self, audio):
        return F.one_hot(audio.flatten(1).argmax(1) % 3, 3).float()


def _ev(clips, audio, masks, sound):
    refused = {}
    ev = types.SimpleNamespace(
        config=types.SimpleNamespace(batch_size=4, seed=0), device="cpu", refused=refused,
        checkpoint=types.SimpleNamespace(objective=Bright()), refuse=lambda p, why: refused.__setitem__(p, why),
        lock_for=lambda key: threading.Lock(),
        split=lambda name: {"clip": clips, "audio": audio, "masks": masks, "info": [{"sound": s} for s in sound]})
    return ev


def _scene(n=6, t=3, side=32):
    """Clip i: item 1 (class c) is a square of colour c in one corner, item 2 a grey square elsewhere;
    the sound's loudest sample names colour c. Masks mark both items."""
    clips = torch.zeros(n, t, 3, side, side, dtype=torch.uint8)
    masks = torch.zeros(n, t, side, side, dtype=torch.uint8)
    audio = torch.zeros(n, 1, 30)
    sound = []
    for i in range(n):
        c = i % 3
        y, x = (0, 0) if i % 2 == 0 else (16, 16)
        clips[i, :, c, y:y + 16, x:x + 16] = 255
        masks[i, :, y:y + 16, x:x + 16] = 1
        gy, gx = (16, 0) if i % 2 == 0 else (0, 16)
        clips[i, :, :, gy:gy + 8, gx:gx + 8] = 60
        masks[i, :, gy:gy + 8, gx:gx + 8] = 2
        audio[i, 0, c] = 1.0
        sound.append({"item": 0, "class": c})
    return clips, audio, masks, sound


def test_the_map_peak_on_the_sounding_item_is_a_hit_and_elsewhere_a_miss():
    clips, audio, masks, sound = _scene()
    r = run_av_localisation(_ev(clips, audio, masks, sound), "pretrained")
    assert r.details["hit"] == 1.0 and r.details["clips"] == 6 and r.details["map"] == [4, 4]
    assert r.details["chance"] == pytest.approx(4 / 16)             # the 16 px square covers 4 of 16 cells
    wrong = [{"item": 1, "class": s["class"]} for s in sound]          # say the grey item sounds instead
    assert run_av_localisation(_ev(clips, audio, masks, wrong), "pretrained").details["hit"] == 0.0


def test_retrieval_is_scored_on_the_sounding_class_and_refused_without_sound():
    clips, audio, masks, sound = _scene()
    r = run_av_retrieval(_ev(clips, audio, masks, sound), "pretrained")
    assert r.details["top1_class"] == 1.0 and r.details["chance_class"] == pytest.approx(1 / 3)
    assert r.rows[0]["value"] == 1.0
    ev = _ev(clips, None, masks, sound)
    assert run_av_retrieval(ev, "pretrained").rows == [] and "sound tracks" in ev.refused["av_retrieval"]


def test_an_audio_visual_checkpoint_is_scored_on_retrieval_and_localisation(tmp_path):
    """Generated clips with sound, a few steps of av_correspondence by hand, exported (the whole
    objective rides in backbone.pt), evaluated: both rows for pretrained and random init, with chance."""
    from workers.config import load_config
    from workers.data.loader import load_split
    from workers.evaluate.config import EvalConfig
    from workers.evaluate.evaluation import evaluate
    from workers.ingest.moving_fmnist import generate
    from workers.ingest.shards import IngestParams, ingest
    from workers.ingest.sources import FashionMNIST, open_source
    from workers.model import build_objective
    from workers.pretrain.export import export_final
    from workers.storage import RunLocation

    generate(str(tmp_path / "videos"), {"train": 12, "test": 6}, FashionMNIST(), frames=8, size=32, sound=True)
    run = str(tmp_path / "run")
    params = IngestParams(shard_size=8, val_fraction=0.25, clip_frames=8)
    manifest = ingest(RunLocation(run), open_source(str(tmp_path / "videos"), params=params), params, progress_bar=False)
    config = load_config(None, ["objective=av_correspondence", "backbone=resnet18",
                                "backbone_params={small_stem: true, width: 8}", "image_size=32", "batch_size=4",
                                "workers=1", "seed=0"])
    torch.manual_seed(0)
    objective = build_objective(config, manifest["channels"])
    opt = torch.optim.Adam(objective.parameters(), lr=1e-3)
    train = load_split(RunLocation(run), manifest, "train")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        out = objective(objective.make_views({"clip": train["clip"][:4], "audio": train["audio"][:4]}, generator=gen))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with RunLocation(run).fs().open(RunLocation(run).join("config.yaml"), "w") as f:
        f.write(config.to_yaml())
    export_final(RunLocation(run), config, manifest, objective.eval(), 2, 2)
    report = evaluate(run, EvalConfig(protocols=("probe",), video_protocols=(), baselines=("random_init",),
                                      probe_max_iter=10), log=lambda *_: None)
    cells = {(r["protocol"], r["features"]): r["value"] for r in report["results"]}
    for proto in ("av_retrieval", "av_localisation"):
        assert (proto, "pretrained") in cells and (proto, "random_init") in cells
    assert 0 < report["details"]["av_localisation/pretrained"]["chance"] < 1
    assert report["details"]["av_retrieval/pretrained"]["clips"] == 6
    md = open(f"{run}/report.md").read()
    assert "sound → frame retrieval (sounding item's class), top-1" in md and "sound localisation" in md
    assert "**sound and picture**" in md and "chance" in md
