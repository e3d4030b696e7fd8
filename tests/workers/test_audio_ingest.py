"""Audio as a modality: real audio files (written with soundfile, and spoken by espeak-ng) ingested
into FLAC shards, resampled, cut into segments, the bad ones rejected with a reason, and read back
as fixed-length utterances through the same stream as images; locally and on S3 (moto_server)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from workers.data.audio import SILENCE_DBFS, dbfs, fit_length, resample, segments
from workers.data.loader import Collate, load_split
from workers.data.stream import open_split
from workers.ingest.audio import AudioFolder
from workers.ingest.shards import IngestParams, ingest
from workers.ingest.sources import open_source
from workers.ingest.spoken_digits import generate, voices
from workers.storage import RunLocation

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (make test installs it as root on Debian)")


def _tone(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of tones in several formats (WAV, FLAC, OGG, MP3) and rates, a long file, and three bad files."""
    root = tmp_path_factory.mktemp("audio") / "tones"
    for cls, f0 in (("low", 220.0), ("high", 880.0)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            sf.write(root / cls / f"a{i}.wav", _tone(f0 * (1 + 0.05 * i), 0.8, 22050), 22050)
        stereo = np.stack([_tone(f0, 0.9, 44100), _tone(f0, 0.9, 44100, 0.1)], 1)
        sf.write(root / cls / "stereo.flac", stereo, 44100)
        sf.write(root / cls / "b.ogg", _tone(f0, 0.7, 16000), 16000, format="OGG", subtype="VORBIS")
        sf.write(root / cls / "c.mp3", _tone(f0, 0.6, 22050), 22050, format="MP3")
    sf.write(root / "low" / "long.wav", _tone(300.0, 3.6, 16000), 16000)         # 3 segments + 0.6 s kept
    (root / "low" / "long.json").write_text(json.dumps({"speaker": "s1"}))
    (root / "high" / "empty.wav").write_bytes(b"")
    (root / "high" / "garbage.mp3").write_bytes(b"ID3" + b"\x00\x13" * 200)
    sf.write(root / "high" / "silent.wav", np.zeros(8000, np.float32), 16000)
    return str(root)


def _ingest(src, run, **kw) -> dict:
    params = IngestParams(shard_size=4, val_fraction=0, test_fraction=0, **kw)
    return ingest(RunLocation(str(run)), open_source(src, params=params), params, progress_bar=False)


def test_segments_cut_long_files_and_keep_a_long_enough_rest():
    assert segments(12000, 16000, 1.0) == [(0, 12000)]                 # up to 1.5 segments: one sample
    assert segments(3 * 16000 + 9000, 16000, 1.0)[-1] == (48000, 57000)  # a rest of >= half a segment is kept
    assert segments(3 * 16000 + 7000, 16000, 1.0) == [(0, 16000), (16000, 32000), (32000, 48000)]
    x = np.arange(10, dtype=np.float32)
    assert np.array_equal(fit_length(x, 14), np.r_[0, 0, x, 0, 0]) and np.array_equal(fit_length(x, 4), x[3:7])


def test_resampling_keeps_a_tone_and_its_level():
    x = _tone(440.0, 1.0, 22050)
    y = resample(x, 22050, 16000)
    assert len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1                         # 1 Hz bins at 1 s
    assert abs(dbfs(y) - dbfs(x)) < 0.1


def test_an_audio_folder_becomes_flac_shards_with_reasons_for_the_rejected(folder, tmp_path):
    m = _ingest(folder, tmp_path / "run")
    assert m["modality"] == "audio" and m["channels"] == 1 and m["source"]["kind"] == "audiofolder"
    assert m["audio"] == {"sample_rate": 16000, "seconds": 1.0, "samples": 16000, "codec": "flac"}
    assert m["classes"] == ["high", "low"]
    reasons = {r["path"]: r["reason"] for r in m["rejected"]}
    assert set(reasons) == {"high/empty.wav", "high/garbage.mp3", "high/silent.wav"}
    assert "unreadable" in reasons["high/garbage.mp3"] and "silent" in reasons["high/silent.wav"]
    assert str(SILENCE_DBFS)[:3] in reasons["high/silent.wav"]
    assert m["count"] == 2 * 6 + 4                                    # 6 files per class, and the long one in 4 segments
    samples = sorted(open_split(str(tmp_path / "run"), "train"), key=lambda s: s["key"])
    assert all(s["image"].shape == (1, 16000) and s["image"].dtype.is_floating_point for s in samples)
    # what the shards hold: FLAC at 16 kHz, with the source, offset and labels in the .json
    import tarfile

    shard = os.path.join(tmp_path, "run", "shards", m["splits"]["train"]["shards"][0]["name"])
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        flac = tar.extractfile(next(n for n in names if n.endswith(".flac"))).read()
        metas = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    import io

    assert sf.info(io.BytesIO(flac)).samplerate == 16000 and sf.info(io.BytesIO(flac)).channels == 1
    every = [json.loads(x) for x in _all_json(tmp_path / "run")]
    offsets = sorted(e["offset"] for e in every if e["source"] == "low/long.wav")
    assert offsets == [0.0, 1.0, 2.0, 3.0]
    assert all(e["info"] == {"speaker": "s1"} for e in every if e["source"] == "low/long.wav")
    assert {e["sample_rate"] for e in metas} == {16000}


def _all_json(run) -> list[bytes]:
    import tarfile

    out = []
    for name in sorted(os.listdir(os.path.join(run, "shards"))):
        with tarfile.open(os.path.join(run, "shards", name)) as tar:
            out += [tar.extractfile(n).read() for n in tar.getnames() if n.endswith(".json")]
    return out


def test_the_loader_centres_each_utterance_and_batches_them(folder, tmp_path):
    _ingest(folder, tmp_path / "run", audio_rate=8000, audio_seconds=0.5)
    m = json.load(open(tmp_path / "run" / "manifest.json"))
    data = load_split(RunLocation(str(tmp_path / "run")), m, "train")
    assert data["image"].shape == (m["count"], 1, 4000)
    # a 0.35 s tone at 8 kHz would sit centred in 0.5 s; the 0.7-0.9 s ones are cut to their middle
    assert float(data["image"].abs().amax()) > 0.05
    batch = Collate(28)([{"key": "a", "image": data["image"][0], "label": 0},
                         {"key": "b", "image": data["image"][1], "label": 1}])
    assert batch["image"].shape == (2, 1, 4000)


def test_labels_csv_names_the_classes_and_unknown_paths_fail(folder, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        sf.write(root / f"x{i}.wav", _tone(200 + 100 * i, 0.5, 16000), 16000)
    (root / "labels.csv").write_text("path,label\n" + "".join(f"x{i}.wav,{'ab'[i % 2]}\n" for i in range(4)))
    src = AudioFolder(str(root))
    assert src.classes == ["a", "b"] and [r.label for r in src.splits()["train"]] == [0, 1, 0, 1]
    (root / "labels.csv").write_text("path,label\nnope.wav,a\n")
    from workers.ingest.records import SourceError

    with pytest.raises(SourceError, match="nope.wav"):
        AudioFolder(str(root))


def test_a_rerun_reuses_the_published_shards_and_rewrites_a_lost_one(folder, tmp_path):
    run = tmp_path / "run"
    first = _ingest(folder, run)
    names = [s["name"] for s in first["splits"]["train"]["shards"]]
    os.remove(run / "manifest.json")                                  # as if killed before the manifest
    os.remove(run / "shards" / names[1])                              # and before one shard was published
    kept = os.stat(run / "shards" / names[0]).st_mtime_ns
    again = _ingest(folder, run)
    assert again["splits"] == first["splits"] and os.stat(run / "shards" / names[0]).st_mtime_ns == kept


def test_an_audio_ingest_round_trips_through_s3(folder, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/audio"
    m = _ingest(folder, uri)
    samples = list(open_split(uri, "train"))
    assert len(samples) == m["count"] and all(s["image"].shape == (1, 16000) for s in samples)


@needs_espeak
def test_spoken_digits_are_generated_by_espeak_with_voices_and_ingested(tmp_path, monkeypatch):
    root = generate(str(tmp_path / "sd"), voices=3, repeats=3, test_repeats=1, words=("one", "two", "stop"),
                    progress=False)
    meta = json.load(open(os.path.join(root, "spoken_digits.json")))
    assert meta["count"] == 27 and meta["synthetic"] == "espeak-ng"
    src = AudioFolder(root)
    assert src.classes == ["one", "stop", "two"] and {k: len(v) for k, v in src.splits().items()} == {"test": 9,
                                                                                                       "train": 18}
    x, rate = sf.read(os.path.join(root, "train", "one", os.listdir(os.path.join(root, "train", "one"))[0]))
    assert rate == 22050 and dbfs(x) > -40                            # espeak-ng's rate: the ingest resamples
    longest = max(sf.info(os.path.join(d, f)).duration for d, _, fs in os.walk(root) for f in fs if f.endswith(".flac"))
    assert longest <= 1.4                                             # one utterance, one sample
    m = ingest(RunLocation(str(tmp_path / "run")), src, IngestParams(shard_size=8, val_fraction=0), progress_bar=False)
    assert m["count"] == 27 and not m["rejected"]
    test = load_split(RunLocation(str(tmp_path / "run")), m, "test")
    assert sorted({i["voice"] for i in test["info"]}) == sorted(voices(3))   # every voice in test, labelled
    # the same seed gives the same utterances; voices differ from one another
    again = generate(str(tmp_path / "sd2"), voices=3, repeats=3, test_repeats=1, words=("one", "two", "stop"),
                     progress=False)
    for sub in ("train/one", "test/two"):
        for f in sorted(os.listdir(os.path.join(root, sub))):
            if f.endswith(".flac"):
                assert np.array_equal(sf.read(os.path.join(root, sub, f))[0], sf.read(os.path.join(again, sub, f))[0])
