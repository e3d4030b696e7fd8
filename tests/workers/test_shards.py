"""Ingestion on local disk and on a real S3 API (moto_server): round trips, bad files, resume."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen import write_images
from workers.data.manifest import read_manifest
from workers.data.stream import open_split
from workers.ingest.shards import IngestError, IngestParams, ingest
from workers.ingest.sources import SourceError, open_source
from workers.storage import RunLocation, StorageError, check_writable


def _read_all(run, split, **kw):
    return {s["key"]: s for s in open_split(run, split, **kw)}


def _by_source(run, split):
    """{source path: (image (H, W, C) numpy, label)} read back through the shard stream."""
    out = {}
    loc = run if isinstance(run, RunLocation) else RunLocation(run)
    for s in open_split(loc, split):
        out[s["key"]] = (s["image"].permute(1, 2, 0).numpy(), s["label"])
    return out


def _sources_of(loc: RunLocation, manifest, split) -> dict:
    """{key: source path} from the .json members of a split's shards."""
    fs = loc.fs()
    keys = {}
    for sh in manifest["splits"][split]["shards"]:
        with fs.open(loc.join("shards", sh["name"]), "rb") as f:
            with tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        keys[m.name[:-5]] = json.loads(tf.extractfile(m).read())["source"]
    return keys


def test_local_round_trip_pixels_and_labels(tmp_path):
    files = write_images(tmp_path / "src", n_classes=3, per_class=7)
    run = RunLocation(str(tmp_path / "run"))
    m = ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=4, val_fraction=0.0, test_fraction=0),
               progress_bar=False)
    assert m["classes"] == ["class0", "class1", "class2"] and m["channels"] == 1
    assert m["splits"]["train"]["count"] == 21 and len(m["splits"]["train"]["shards"]) == 6
    got = _by_source(run.uri, "train")
    src_of = _sources_of(run, m, "train")
    assert len(got) == 21
    for key, (img, label) in got.items():
        arr, lab = files[src_of[key]]
        assert np.array_equal(img[:, :, 0], arr) and label == lab


def test_mixed_formats_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    good = {
        "a/rgb.jpg": (Image.fromarray(rgb), "JPEG"),
        "a/gray.png": (Image.fromarray(gray, "L"), "PNG"),
        "a/la.png": (Image.fromarray(gray, "L").convert("LA"), "PNG"),
        "a/pal.png": (Image.fromarray(rgb).convert("P"), "PNG"),
        "a/rgb.png": (Image.fromarray(rgb), "PNG"),
        "b/rgba.png": (Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "b/deep.png": (Image.fromarray((gray.astype(np.uint16) * 257)), "PNG"),
        "b/pic.bmp": (Image.fromarray(rgb), "BMP"),
        "b/pic.webp": (Image.fromarray(rgb), "WEBP"),
        "b/pic.tif": (Image.fromarray(rgb), "TIFF"),
    }
    for rel, (img, fmt) in good.items():
        img.save(root / rel, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.jpg").write_text("not an image at all\n")
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    (root / "b" / "cut.jpg").write_bytes(jpg.getvalue()[:300])

    for fmt in ("keep", "png"):
        run = RunLocation(str(tmp_path / f"run-{fmt}"))
        m = ingest(run, open_source(str(root)), IngestParams(shard_size=5, image_format=fmt, val_fraction=0.0, test_fraction=0),
                   progress_bar=False)
        assert m["splits"]["train"]["count"] == 10
        rejected = {r["path"]: r["reason"] for r in m["rejected"]}
        assert set(rejected) == {"a/empty.png", "b/notes.jpg", "b/cut.jpg"}
        assert "empty" in rejected["a/empty.png"] and "not an image" in rejected["b/notes.jpg"]
        assert "truncated" in rejected["b/cut.jpg"] or "corrupt" in rejected["b/cut.jpg"]
        assert m["modes"] == {"I;16": 1, "L": 1, "LA": 1, "P": 1, "RGB": 5, "RGBA": 1} or \
            set(m["modes"]) >= {"L", "LA", "P", "RGB", "RGBA"}
        assert m["channels"] == 3
        src_of = _sources_of(run, m, "train")
        got = _by_source(run.uri, "train")
        for key, (img, label) in got.items():
            rel = src_of[key]
            assert label == (0 if rel.startswith("a/") else 1)
            ref_img, fmt_ = good[rel]
            if fmt_ == "JPEG":
                ref = np.asarray(Image.open(root / rel).convert("RGB"))
            elif rel == "b/deep.png":
                ref = np.repeat(gray[:, :, None], 3, axis=2)  # 16-bit scaled back to the 8-bit values
            else:
                ref = np.asarray(ref_img.convert("RGB"))
            assert img.shape == (9, 11, 3), rel
            assert np.array_equal(img, ref), rel


def test_flat_folder_unlabelled_with_val_split(tmp_path):
    write_images(tmp_path / "flat", n_classes=1, per_class=20, flat=True)
    run = str(tmp_path / "run")
    m = ingest(RunLocation(run), open_source(str(tmp_path / "flat")), IngestParams(shard_size=3, val_fraction=0.25, seed=1),
               progress_bar=False)
    assert m["classes"] is None and m["splits"]["train"]["count"] == 15 and m["splits"]["val"]["count"] == 5
    assert all(s["label"] == -1 for s in open_split(run, "val"))
    # the seeded val split is reproducible and changes with the seed
    m2 = ingest(RunLocation(str(tmp_path / "run2")), open_source(str(tmp_path / "flat")),
                IngestParams(shard_size=3, val_fraction=0.25, seed=1), progress_bar=False)
    m3 = ingest(RunLocation(str(tmp_path / "run3")), open_source(str(tmp_path / "flat")),
                IngestParams(shard_size=3, val_fraction=0.25, seed=2), progress_bar=False)
    v = lambda r, m: sorted(_sources_of(RunLocation(r), m, "val").values())  # noqa: E731
    assert v(run, m) == v(str(tmp_path / "run2"), m2) != v(str(tmp_path / "run3"), m3)


def test_voc_multilabel(tmp_path):
    root = tmp_path / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    objs = {"000001": [("dog", 0), ("person", 0)], "000002": [("car", 0), ("cat", 1)], "000003": [("bird", 0)],
            "000004": [("sofa", 0)]}
    for i, objects in objs.items():
        Image.fromarray(np.full((8, 8, 3), int(i) * 40, np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
        (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{xml}</annotation>")
    (root / "ImageSets/Main/train.txt").write_text("000001\n000002\n")
    (root / "ImageSets/Main/val.txt").write_text("000004\n")
    (root / "ImageSets/Main/test.txt").write_text("000003\n")
    run = str(tmp_path / "run")
    m = ingest(RunLocation(run), open_source(str(tmp_path)), IngestParams(shard_size=10), progress_bar=False)
    assert m["multilabel"] and len(m["classes"]) == 20
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    train = {s["key"]: s["labels"] for s in open_split(run, "train")}
    c = m["classes"]
    assert train["train_00000000"].nonzero().flatten().tolist() == sorted([c.index("dog"), c.index("person")])
    assert train["train_00000001"].nonzero().flatten().tolist() == [c.index("car")]  # difficult cat left out
    with pytest.raises(IngestError, match="own val split"):
        ingest(RunLocation(str(tmp_path / "r2")), open_source(str(tmp_path)), IngestParams(val_fraction=0.2),
               progress_bar=False)


def test_nothing_valid_fails_clearly(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("nope")
    (tmp_path / "junk" / "b.png").write_bytes(b"")
    with pytest.raises(IngestError, match="no valid sample.*all 2 files were rejected"):
        ingest(RunLocation(str(tmp_path / "run")), open_source(str(tmp_path / "junk")), IngestParams(val_fraction=0),
               progress_bar=False)


def test_missing_source_and_refusing_to_clobber(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    write_images(tmp_path / "src", per_class=3)
    run = RunLocation(str(tmp_path / "run"))
    flat = dict(val_fraction=0, test_fraction=0)
    ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=2, **flat), progress_bar=False)
    with pytest.raises(IngestError, match="--overwrite"):
        ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=3, **flat), progress_bar=False)
    m = ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=3, **flat), overwrite=True,
               progress_bar=False)
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(os.listdir(run.join("shards"))) == ["train-000000.tar", "train-000001.tar"]


def test_reader_splits_ranks_and_workers_disjointly(tmp_path):
    write_images(tmp_path / "src", n_classes=2, per_class=12)
    run = str(tmp_path / "run")
    ingest(RunLocation(run), open_source(str(tmp_path / "src")), IngestParams(shard_size=3, val_fraction=0),
           progress_bar=False)  # 8 shards
    everything = set(_read_all(run, "train"))
    parts = [set(_read_all(run, "train", rank=r, world_size=2, shuffle=True, seed=5)) for r in range(2)]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == everything
    loader = torch.utils.data.DataLoader(open_split(run, "train", rank=1, world_size=2, num_workers=2, shuffle=True, seed=5),
                                         num_workers=2, batch_size=None)
    assert {s["key"] for s in loader} == parts[1]
    # shuffling is seeded: same seed and epoch -> same order, another epoch -> another order
    order = lambda **kw: [s["key"] for s in open_split(run, "train", shuffle=True, **kw)]  # noqa: E731
    assert order(seed=1, epoch=0) == order(seed=1, epoch=0) != order(seed=1, epoch=1)
    with pytest.raises(ValueError, match="8 shards but 3 ranks × 3 loader workers need at least 9"):
        open_split(run, "train", world_size=3, num_workers=3)


# ----------------------------------------------------------------------------- crash and resume

RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from workers.ingest.shards import ingest, IngestParams
    from workers.ingest.sources import open_source
    from workers.storage import RunLocation
    ingest(RunLocation(sys.argv[2]), open_source(sys.argv[1]), IngestParams(shard_size=40, val_fraction=0.1, seed=3),
           threads=2, progress_bar=False)
""")


@pytest.mark.slow  # starts a separate Python process
def test_sigkill_mid_ingest_then_rerun_resumes_to_identical_manifest(tmp_path):
    write_images(tmp_path / "src", n_classes=4, per_class=600, size=16)  # 2400 images, 60 shards
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "src"), crashed], env=env)
    state_dir = os.path.join(crashed, ".ingest")
    # Published shards: their state files (a hidden name is a state file still being written).
    states = lambda: [f for f in os.listdir(state_dir) if not f.startswith(".")] if os.path.isdir(state_dir) else []  # noqa: E731
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(states()) >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    published = len(states())
    assert 5 <= published < 60, f"kill landed at {published} shards: not mid-way"
    assert not os.path.exists(os.path.join(crashed, "manifest.json"))
    # Readers never see a half shard: every *.tar visible is a complete, valid tar.
    for fn in os.listdir(os.path.join(crashed, "shards")):
        if fn.endswith(".tar"):
            with tarfile.open(os.path.join(crashed, "shards", fn)) as tf:
                assert len(tf.getmembers()) == 3 * 40 or fn.startswith("val")
    before = {fn: os.stat(os.path.join(crashed, "shards", fn)).st_mtime_ns
              for fn in os.listdir(os.path.join(crashed, "shards")) if fn.endswith(".tar")}

    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "src"), crashed], env=env, check=True)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "src"), clean], env=env, check=True)
    with open(os.path.join(crashed, "manifest.json")) as a, open(os.path.join(clean, "manifest.json")) as b:
        assert json.load(a) == json.load(b)
    after = os.listdir(os.path.join(crashed, "shards")) + os.listdir(state_dir)
    assert not [f for f in after if "tmp" in f], "temporary files left behind"
    kept = [fn for fn, t in before.items() if os.stat(os.path.join(crashed, "shards", fn)).st_mtime_ns == t]
    assert len(kept) >= 5, "published shards were rewritten instead of kept"


def test_resume_rewrites_a_corrupted_published_shard(tmp_path):
    write_images(tmp_path / "src", per_class=5)
    run = RunLocation(str(tmp_path / "run"))
    m1 = ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=4, val_fraction=0), progress_bar=False)
    os.remove(run.join("manifest.json"))  # as if killed before the manifest
    with open(run.join("shards", "train-000001.tar"), "r+b") as f:
        f.seek(600)
        f.write(b"garbage")
    m2 = ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=4, val_fraction=0), progress_bar=False)
    assert m1 == m2


# ----------------------------------------------------------------------------- S3 (moto_server)

def test_s3_round_trip(tmp_path, s3_bucket):
    files = write_images(tmp_path / "src", n_classes=2, per_class=5, mode="RGB")
    uri = f"s3://{s3_bucket}/runs/demo"
    run = RunLocation(uri)
    check_writable(run)
    m = ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=3, val_fraction=0.2), progress_bar=False)
    fs = run.fs()
    listed = sorted(os.path.basename(p) for p in fs.ls(f"{s3_bucket}/runs/demo/shards"))
    names = [s["name"] for sp in m["splits"].values() for s in sp["shards"]]
    assert listed == sorted(names), "every shard in the manifest really exists on S3"
    for sp in m["splits"].values():
        for s in sp["shards"]:
            assert fs.size(f"{s3_bucket}/runs/demo/shards/{s['name']}") == s["bytes"]
    assert read_manifest(run) == m
    seen = 0
    for split in ("train", "val", "test"):  # test: held out of the class folders (test_fraction 0.1)
        src_of = _sources_of(run, m, split)
        for key, (img, label) in _by_source(run, split).items():
            arr, lab = files[src_of[key]]
            assert np.array_equal(img, arr) and label == lab
            seen += 1
    assert seen == 10
    # rerun: nothing to do, same manifest
    assert ingest(run, open_source(str(tmp_path / "src")), IngestParams(shard_size=3, val_fraction=0.2),
                  progress_bar=False) == m


def test_s3_missing_bucket_fails_before_work(s3_endpoint, s3_bucket):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        check_writable(RunLocation("s3://no-such-bucket/x"))


def test_s3_wrong_credentials_fail_without_printing_the_secret(s3_endpoint_with_auth):
    opts = {"endpoint_url": s3_endpoint_with_auth, "key": "AKIAWRONGKEY", "secret": "super-secret-value"}
    with pytest.raises(StorageError) as e:
        check_writable(RunLocation("s3://some-bucket/run", opts))
    msg = str(e.value)
    assert "some-bucket" in msg and s3_endpoint_with_auth in msg
    assert "denied" in msg or "InvalidAccessKeyId" in msg or "credentials" in msg.lower()
    assert "super-secret-value" not in msg


def test_test_split_held_out_of_a_labelled_folder_seeded_disjoint_and_old_runs_still_reused(tmp_path):
    write_images(tmp_path / "src", n_classes=2, per_class=20)
    src = open_source(str(tmp_path / "src"))

    from workers.ingest.shards import plan_ingest

    def held(seed):
        plan = plan_ingest(src, IngestParams(shard_size=8, seed=seed))
        return {sp: {r.path for s in plan.shards if s.split == sp for r in s.records} for sp in ("train", "val", "test")}

    a, again, other = held(0), held(0), held(1)
    assert {k: len(v) for k, v in a.items()} == {"train": 32, "val": 4, "test": 4} and a == again
    assert not (a["test"] & a["train"]) and not (a["test"] & a["val"]) and a["test"] != other["test"]
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        IngestParams(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(IngestError, match="own test split; use --test-fraction 0"):
        write_images(tmp_path / "split" / "train", per_class=3)
        write_images(tmp_path / "split" / "test", per_class=2)
        plan_ingest(open_source(str(tmp_path / "split")), IngestParams(test_fraction=0.2))
    # a run ingested before test_fraction existed (its manifest without it) is the same ingest when
    # nothing is held out: reused, not refused as "other parameters"
    run = RunLocation(str(tmp_path / "run"))
    m = ingest(run, src, IngestParams(shard_size=8, test_fraction=0), progress_bar=False)
    old = dict(m, params={k: v for k, v in m["params"].items() if k != "test_fraction"})
    with open(run.join("manifest.json"), "w") as f:
        json.dump(old, f)
    assert ingest(run, src, IngestParams(shard_size=8, test_fraction=0), progress_bar=False) == old
