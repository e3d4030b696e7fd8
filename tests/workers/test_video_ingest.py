"""A folder of real video files (the Moving Fashion-MNIST generator's, plus a broken and a short
one) ingested into clip shards and read back through the same stream as images."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from workers.data.clips import encode_clip, read_video
from workers.data.stream import open_split
from workers.ingest.moving_fmnist import generate
from workers.ingest.shards import IngestError, IngestParams, ingest
from workers.ingest.sources import FashionMNIST, open_source
from workers.storage import RunLocation


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos") / "mf"
    generate(str(root), {"train": 6, "test": 4}, FashionMNIST(), frames=10, size=32)
    (root / "train" / "slide" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 300)
    short = np.zeros((3, 3, 32, 32), np.uint8)
    (root / "train" / "bounce" / "short.mkv").write_bytes(encode_clip(short, "ffv1", 10))
    return str(root)


def _ingest(src: str, run: str, **clip) -> dict:
    params = IngestParams(shard_size=4, val_fraction=0, **clip)
    return ingest(RunLocation(run), open_source(src, params=params), params, progress_bar=False)


def _samples(run: str, split: str) -> list[dict]:
    return sorted(open_split(run, split), key=lambda s: s["key"])


def test_videos_become_clip_shards_with_their_views_masks_and_labels(videos, tmp_path):
    run = str(tmp_path / "run")
    m = _ingest(videos, run, clip_frames=8)
    assert m["modality"] == "clip" and m["clip"] == {"frames": 8, "fps": 10.0, "size": None, "codec": "png"}
    assert m["classes"] == ["bounce", "slide"] and m["channels"] == 3
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 6, "test": 4}
    reasons = {r["path"]: r["reason"] for r in m["rejected"]}
    assert "cannot decode" in reasons["train/slide/broken.mp4"]
    assert reasons["train/bounce/short.mkv"].startswith("shorter than a clip: 3 of 8 frames")
    samples = _samples(run, "train")
    assert len(samples) == 6
    for s in samples:
        assert s["clip"].shape == (8, 3, 32, 32) and str(s["clip"].dtype) == "torch.uint8"
        assert s["views"]["cam2"].shape == (8, 3, 32, 32) and set(s["masks"]) == {"main", "cam2"}
        assert s["masks"]["main"].shape == (8, 32, 32)
        assert m["classes"][s["label"]] == s["info"]["motion"]
    # lossless storage: the clip is the video's first 8 frames, exactly
    first = next(s for s in samples if s["info"]["seed"][2] == 0)
    source = read_video(os.path.join(videos, "train/bounce/train_000000.mkv"), 10, max_frames=8)
    assert np.array_equal(first["clip"].numpy(), source)
    masks = np.load(os.path.join(videos, "train/bounce/train_000000.masks.npz"))
    assert np.array_equal(first["masks"]["main"].numpy(), masks["cam1"][:8])


@pytest.mark.parametrize("codec", ["ffv1", "h264"])
def test_the_video_codecs_store_the_same_clips(videos, tmp_path, codec):
    png = {s["key"]: s for s in _samples(_ingested(videos, tmp_path / "png", "png"), "test")}
    other = {s["key"]: s for s in _samples(_ingested(videos, tmp_path / codec, codec), "test")}
    assert png.keys() == other.keys() and len(png) == 4
    for key, s in other.items():
        err = (s["clip"].int() - png[key]["clip"].int()).abs().float().mean()
        assert (err == 0) if codec == "ffv1" else (err < 8)  # H.264 at CRF 18: ~4 grey levels at 32 px
        assert s["views"]["cam2"].shape == png[key]["views"]["cam2"].shape


def _ingested(src: str, run, codec: str) -> str:
    _ingest(src, str(run), clip_frames=8, clip_codec=codec)
    return str(run)


def test_a_lower_frame_rate_takes_every_other_frame_and_mask(videos, tmp_path):
    run = str(tmp_path / "run5")
    _ingest(videos, run, clip_frames=4, clip_fps=5.0, clip_size=16)
    s = next(x for x in _samples(run, "train") if x["info"]["seed"][2] == 0)
    full = read_video(os.path.join(videos, "train/bounce/train_000000.mkv"), 10, size=16)
    assert s["clip"].shape == (4, 3, 16, 16) and np.array_equal(s["clip"].numpy(), full[0:8:2])
    masks = np.load(os.path.join(videos, "train/bounce/train_000000.masks.npz"))["cam1"]
    assert s["masks"]["main"].shape == (4, 16, 16) and (s["masks"]["main"].numpy() > 0).any()
    assert [int((m > 0).sum() > 0) for m in s["masks"]["main"].numpy()] == \
        [int((m > 0).sum() > 0) for m in masks[0:8:2]]


def test_a_finished_video_ingest_is_reused_and_other_clip_settings_are_not(videos, tmp_path):
    run = str(tmp_path / "run")
    first = _ingest(videos, run, clip_frames=8)
    shard = os.path.join(run, "shards", first["splits"]["train"]["shards"][0]["name"])
    mtime = os.stat(shard).st_mtime_ns
    assert _ingest(videos, run, clip_frames=8) == first and os.stat(shard).st_mtime_ns == mtime
    with pytest.raises(IngestError, match="already holds a finished ingest .*clip_frames.: 8"):
        _ingest(videos, run, clip_frames=6)


@pytest.mark.slow  # Prefect's server
def test_gelato_ingest_takes_a_folder_of_videos(videos, tmp_path, capsys):
    from prefect.testing.utilities import prefect_test_harness

    from gelato.cli import main

    run = str(tmp_path / "cli")
    with prefect_test_harness(server_startup_timeout=90):
        assert main(["ingest", videos, "--out", run, "--clip-frames", "8", "--val-fraction", "0", "--shard-size",
                     "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 samples, 2 rejected" in out
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    assert manifest["modality"] == "clip" and manifest["source"]["kind"] == "videofolder"


def test_other_views_are_told_apart_from_videos_with_dots_in_their_names():
    from workers.ingest.videos import split_views

    files = ["a/x.mp4", "a/x.cam2.mp4", "a/x.masks.npz", "a/my.clip.mkv", "a/y.v2.mp4", "a/y.webm", "b.d/z.mp4"]
    assert split_views(files) == {"a/x.mp4": {"cam2": "a/x.cam2.mp4"}, "a/my.clip.mkv": {},
                                  "a/y.webm": {"v2": "a/y.v2.mp4"}, "b.d/z.mp4": {}}


def test_the_loader_batches_clips_with_their_other_camera(videos, tmp_path):
    from workers.data.loader import Collate

    run = str(tmp_path / "run")
    _ingest(videos, run, clip_frames=8, clip_size=16)
    batch = Collate(16)(_samples(run, "test")[:3])
    assert batch["clip"].shape == (3, 8, 3, 16, 16) and batch["views"]["cam2"].shape == (3, 8, 3, 16, 16)
    assert batch["image"].shape == (3, 3, 16, 16) and bool((batch["image"] == batch["clip"][:, 4]).all())
