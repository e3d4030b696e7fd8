"""Videos with sound: a sound track muxed into the video file (or an audio file beside it) is kept
for the clip's span, resampled, and read back with the clip; moving-fashion-mnist-sound's tracks
are the sounding item's class timbre, louder as it moves faster."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from workers.data.clips import encode_clip, read_audio_track
from workers.data.loader import Collate, load_split
from workers.data.stream import open_split
from workers.ingest.moving_fmnist import CLASS_F0, generate
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import FashionMNIST, open_source
from workers.storage import RunLocation


@pytest.fixture(scope="module")
def sounding(tmp_path_factory):
    root = tmp_path_factory.mktemp("av") / "mf"
    generate(str(root), {"train": 4, "test": 2}, FashionMNIST(), frames=8, size=32, sound=True)
    return str(root)


def _clips(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".mkv") and ".cam2" not in f)


def test_a_sound_track_round_trips_through_the_video_file_at_another_rate(tmp_path):
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "a.mkv"
    path.write_bytes(encode_clip(np.zeros((10, 3, 16, 16), np.uint8), "ffv1", 10.0, tone, 16000))
    x = read_audio_track(str(path), 8000, 0.5)
    assert x.shape == (4000,) and abs(np.argmax(np.abs(np.fft.rfft(x))) * 2 - 440) <= 2
    assert read_audio_track(str(tmp_path / "a.mkv"), 8000, 2.0)[-4000:].max() == 0.0   # past its end: zeros
    silent = tmp_path / "b.mkv"
    silent.write_bytes(encode_clip(np.zeros((4, 3, 16, 16), np.uint8), "ffv1", 10.0))
    assert read_audio_track(str(silent), 8000, 0.4) is None


def test_the_sounding_item_sounds_its_class_louder_as_it_moves(sounding):
    for path in _clips(sounding):
        meta = json.load(open(path[:-4] + ".json"))
        cls = meta["sound"]["class"]
        assert meta["classes"][meta["sound"]["item"]] == cls
        x = read_audio_track(path, 16000, 0.8)
        spectrum = np.abs(np.fft.rfft(x))
        peak = np.argmax(spectrum) * 16000 / len(x)
        assert min(abs(peak / CLASS_F0[cls] - h) for h in range(1, 7)) < 0.05, (peak, CLASS_F0[cls])


def test_clips_with_sound_carry_it_through_ingest_and_the_loader(sounding, tmp_path):
    params = IngestParams(shard_size=4, val_fraction=0, clip_frames=8, audio_rate=8000)
    m = ingest(RunLocation(str(tmp_path / "run")), open_source(sounding, params=params), params, progress_bar=False)
    samples = list(open_split(str(tmp_path / "run"), "train"))
    assert len(samples) == 4 and all(s["audio"].shape == (1, 6400) for s in samples)   # 8 frames at 10 fps, 8 kHz
    batch = Collate(32)(samples)
    assert batch["audio"].shape == (4, 1, 6400) and batch["clip"].shape == (4, 8, 3, 32, 32)
    test = load_split(RunLocation(str(tmp_path / "run")), m, "test")
    assert test["audio"].shape == (2, 1, 6400) and all("sound" in i for i in test["info"])


def test_an_audio_file_beside_a_silent_video_is_its_sound(tmp_path):
    root = tmp_path / "videos" / "cls"
    root.mkdir(parents=True)
    (root / "a.mkv").write_bytes(encode_clip(np.zeros((10, 3, 16, 16), np.uint8), "ffv1", 10.0))
    sf.write(root / "a.wav", (0.2 * np.sin(2 * np.pi * 300 * np.arange(22050) / 22050)).astype(np.float32), 22050)
    (root / "b.mkv").write_bytes(encode_clip(np.zeros((10, 3, 16, 16), np.uint8), "ffv1", 10.0))
    params = IngestParams(shard_size=4, val_fraction=0, test_fraction=0, clip_frames=5)
    ingest(RunLocation(str(tmp_path / "run")), open_source(str(tmp_path / "videos"), params=params), params,
           progress_bar=False)
    got = {s["key"]: s.get("audio") for s in open_split(str(tmp_path / "run"), "train")}
    with_sound = [a for a in got.values() if a is not None]
    assert len(got) == 2 and len(with_sound) == 1 and with_sound[0].shape == (1, 8000)    # 0.5 s at 16 kHz
