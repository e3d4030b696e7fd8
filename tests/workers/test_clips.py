"""Video clips through PyAV (real FFmpeg encoders and decoders), and the Moving Fashion-MNIST
generator that writes real video files from the Fashion-MNIST package."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from workers.data.clips import ClipError, decode_clip, encode_clip, read_video
from workers.ingest.moving_fmnist import MOTIONS, generate, simulate
from workers.ingest.sources import FashionMNIST


def _ramp(frames: int = 12, channels: int = 1, size: int = 16) -> np.ndarray:
    """Frame k is flat at 20·k: which source frame a resampled frame came from is its value / 20."""
    clip = np.zeros((frames, channels, size, size), np.uint8)
    for k in range(frames):
        clip[k] = 20 * k
    return clip


@pytest.mark.parametrize("channels", [1, 3])
def test_ffv1_round_trips_exactly_and_h264_closely(channels):
    rng = np.random.default_rng(0)
    clip = _ramp(8, channels, 32)
    clip[:, :, 8:24, 8:24] = rng.integers(0, 255, (8, channels, 16, 16), dtype=np.uint8)
    assert np.array_equal(decode_clip(encode_clip(clip, "ffv1"), channels), clip)
    smooth = _ramp(8, channels, 32)
    got = decode_clip(encode_clip(smooth, "h264"), channels).astype(int)
    assert got.shape == smooth.shape and np.abs(got - smooth).mean() < 2.0


@pytest.mark.parametrize("codec", ["png", "ffv1"])
def test_a_clip_goes_into_sample_members_and_back_exactly(codec):
    from workers.data.clips import clip_from_members, clip_members, clip_views

    rng = np.random.default_rng(1)
    main = rng.integers(0, 255, (5, 3, 16, 16), dtype=np.uint8)
    other = rng.integers(0, 255, (5, 3, 16, 16), dtype=np.uint8)
    sample = clip_members(main, codec) | clip_members(other, codec, view="cam2") | {"cls": b"1", "json": b"{}"}
    if codec == "png":
        assert {"000.png", "004.png", "cam2.000.png"} <= set(sample)
    assert clip_views(sample) == ["", "cam2"]
    assert np.array_equal(clip_from_members(sample, 3), main)
    assert np.array_equal(clip_from_members(sample, 3, "cam2"), other)
    if codec == "png":
        del sample["002.png"]
        with pytest.raises(ClipError, match="s:k: main clip frames are not 000..003"):
            clip_from_members(sample, 3, name="s:k")


def test_a_video_is_resampled_to_the_asked_frame_rate_by_the_nearest_frame(tmp_path):
    path = str(tmp_path / "ramp.mkv")
    with open(path, "wb") as f:
        f.write(encode_clip(_ramp(12), "ffv1", fps=10))          # 1.2 s
    half = read_video(path, fps=5, channels=1)
    assert [int(v) for v in half[:, 0, 0, 0] // 20] == [0, 2, 4, 6, 8, 10]
    double = read_video(path, fps=20, channels=1)
    assert len(double) == 24 and [int(v) for v in double[:6, 0, 0, 0] // 20] == [0, 0, 1, 1, 2, 2]
    first = read_video(path, fps=10, channels=3, size=8, max_frames=4)
    assert first.shape == (4, 3, 8, 8) and [int(v) for v in first[:, 0, 0, 0] // 20] == [0, 1, 2, 3]


def test_undecodable_input_is_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(ClipError, match="broken.mp4: cannot decode"):
        read_video(str(bad), fps=10)
    whole = encode_clip(_ramp(6), "ffv1")
    with pytest.raises(ClipError, match="shards/train-000003.tar:clip_0007"):
        decode_clip(whole[:40], 1, "shards/train-000003.tar:clip_0007")


@pytest.mark.parametrize("motion", MOTIONS)
def test_the_dynamics_lose_energy_so_time_has_an_arrow(motion):
    drops = []
    for seed in range(50):
        _, energy = simulate(motion, 2, 20, 64, np.random.default_rng(seed))
        assert (np.diff(energy, axis=0) <= 1e-9).all()  # never gains energy from one frame to the next
        drops.append(((energy[0] - energy[-1]) / energy[0]).min())
    assert min(drops) > 0.1  # and loses a visible share of it in every clip


def test_the_generator_writes_video_files_two_cameras_and_masks_deterministically(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fm = FashionMNIST()
    index = generate(a, {"train": 4, "test": 2}, fm, frames=10, size=48)
    generate(b, {"train": 4, "test": 2}, fm, frames=10, size=48)
    assert index["splits"] == {"train": 4, "test": 2} and index["motions"] == list(MOTIONS)
    names = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    assert "train/bounce/train_000000.mkv" in names and "train/slide/train_000001.cam2.mkv" in names
    for stem in ("train/bounce/train_000000", "test/slide/test_000001"):
        one, two = read_video(os.path.join(a, stem + ".mkv"), 10), read_video(os.path.join(b, stem + ".mkv"), 10)
        assert one.shape == (10, 3, 48, 48) and np.array_equal(one, two)  # same seed, same frames
        meta = json.load(open(os.path.join(a, stem + ".json")))
        masks = np.load(os.path.join(a, stem + ".masks.npz"))
        assert masks["cam1"].shape == masks["cam2"].shape == (10, 48, 48)
        items = len(meta["classes"])
        assert set(np.unique(masks["cam1"])) <= set(range(items + 1)) and masks["cam1"].max() >= 1
        # cam2 sees the same moment: an item's mask centre there is cam1's through cam2's zoom and shift
        cam = meta["cameras"]["cam2"]
        for t in range(10):
            for i in range(1, items + 1):
                y1, x1 = np.nonzero(masks["cam1"][t] == i)
                y2, x2 = np.nonzero(masks["cam2"][t] == i)
                if len(x1) < 40 or len(x2) < 40 or min(x1.min(), y1.min()) == 0 or max(x1.max(), y1.max()) == 47:
                    continue  # occluded, or cut by the frame's edge: its centre moves
                want_x = (x1.mean() - cam["centre"][0] * 48) * cam["zoom"] + 24
                if x2.min() > 0 and x2.max() < 47:
                    assert abs(x2.mean() - want_x) < 2.5
        # the item is drawn in its colour where its mask says it is (cam1: no tint)
        video = read_video(os.path.join(a, stem + ".mkv"), 10).astype(float)
        inside = masks["cam1"][0] == 1
        colour = np.asarray(meta["colours"][0])
        mean_rgb = video[0][:, inside].mean(1)
        assert np.corrcoef(mean_rgb, colour)[0, 1] > 0.8


def test_an_interrupted_generation_resumes_rewriting_only_what_is_missing(tmp_path):
    root = str(tmp_path / "mf")
    generate(root, {"train": 3}, FashionMNIST(), frames=6, size=32)
    kept = os.path.join(root, "train/bounce/train_000000.mkv")
    mtime = os.stat(kept).st_mtime_ns
    os.remove(os.path.join(root, "train/slide/train_000001.json"))  # as if killed before its last file
    generate(root, {"train": 3}, FashionMNIST(), frames=6, size=32)
    assert os.stat(kept).st_mtime_ns == mtime
    assert os.path.exists(os.path.join(root, "train/slide/train_000001.json"))
