"""Damaged shards: named with their checksums and the repair command, skipped on request, repaired in place.

Real shards written by ``gelato ingest``'s code, damaged on disk as bit rot or a torn copy would
(bytes overwritten in a header or inside an image), read back through the real stream.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

from evalrun import ingest_folder
from imagegen import write_images
from workers.data import integrity
from workers.data.integrity import CorruptShard
from workers.data.stream import open_split
from workers.data.tarformat import TarFormatError, add_member, header_checksum_ok, iter_members, ustar_header
from workers.ingest.shards import sha256_of
from workers.storage import RunLocation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def run(tmp_path):
    write_images(tmp_path / "src", n_classes=3, per_class=20, size=12)
    ingest_folder(str(tmp_path / "src"), str(tmp_path / "run"), val_fraction=0.0, shard_size=10)
    return str(tmp_path / "run")


def _manifest(run):
    with open(os.path.join(run, "manifest.json")) as f:
        return json.load(f)


def _member_offsets(path):
    """{member name: (header offset, data offset, size)} of a tar on disk."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def _overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _shard(run, name="train-000002.tar"):
    return os.path.join(run, "shards", name)


# ----------------------------------------------------------------------------- the tar reader

def test_tar_reader_checks_every_header_checksum():
    import io

    buf = io.BytesIO()
    add_member(buf, "a.png", b"x" * 700)
    add_member(buf, "a.cls", b"1")
    buf.write(b"\0" * 1024)
    good = buf.getvalue()
    assert header_checksum_ok(ustar_header("a.png", 700))
    assert [n for n, _ in iter_members(io.BytesIO(good), "u")] == ["a.png", "a.cls"]
    # one byte of the second header's name changed: the old reader yielded a wrong name silently
    bad = bytearray(good)
    second = 512 + 1024
    bad[second + 2] ^= 0x01
    with pytest.raises(TarFormatError, match="fails its checksum .*after member 'a.png'"):
        list(iter_members(io.BytesIO(bytes(bad)), "u"))
    # a header whose size field was hit
    bad = bytearray(good)
    bad[124:136] = b"00000099999\0"
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(bad)), "u"))
    # older writers summed signed bytes: accepted, as GNU tar does
    h = bytearray(ustar_header("\xe9t\xe9.png", 3))
    h[148:156] = b"        "
    signed = sum(b - 256 if b > 127 else b for b in h)
    h[148:156] = b"%06o\0 " % signed
    assert header_checksum_ok(bytes(h))


# ----------------------------------------------------------------------------- named damage

def test_damaged_image_bytes_are_named_with_both_checksums_and_the_repair_command(run):
    m = _manifest(run)
    entry = integrity.shard_entries(m)["train-000002.tar"]
    name, (_, data_off, size) = next((n, o) for n, o in _member_offsets(_shard(run)).items() if n.endswith(".png"))
    # 2 KB of garbage in the middle of the shard, within one image's bytes (no header touched)
    _overwrite(_shard(run), data_off + size // 2, b"\x55" * min(64, size // 3))
    with pytest.raises(CorruptShard) as e:
        list(open_split(run, "train"))
    msg = str(e.value)
    assert "train-000002.tar is damaged" in msg
    assert f"expected {entry['sha256']}" in msg
    actual = sha256_of(RunLocation(run).fs(), _shard(run))
    assert f"actual {actual}" in msg and actual != entry["sha256"]
    assert "--repair train-000002.tar" in msg
    rec = integrity.damaged(RunLocation(run))
    assert [r["shard"] for r in rec] == ["train-000002.tar"] and rec[0]["on_corrupt"] == "fail"


def test_a_damaged_header_is_named_at_once(run):
    offsets = _member_offsets(_shard(run))
    hdr = sorted(o[0] for o in offsets.values())[4]  # the fifth member's header
    _overwrite(_shard(run), hdr + 10, b"\xff\xfe")
    with pytest.raises(CorruptShard, match="train-000002.tar is damaged: a tar header fails its checksum"):
        list(open_split(run, "train"))


def test_skip_leaves_out_exactly_the_damaged_shard_and_records_it(run):
    m = _manifest(run)
    whole = {s["key"] for s in open_split(run, "train")}
    hdr = sorted(o[0] for o in _member_offsets(_shard(run)).values())[7]
    _overwrite(_shard(run), hdr, b"\0garbage")
    with pytest.warns(UserWarning, match="skipping shard .*train-000002.tar"):
        kept = {s["key"] for s in open_split(run, "train", on_corrupt="skip")}
    lost = whole - kept
    assert kept < whole and len(lost) == next(s["count"] for s in m["splits"]["train"]["shards"]
                                              if s["name"] == "train-000002.tar")
    assert all(k.startswith("train_000000") and 20 <= int(k[-2:]) < 30 for k in lost)  # its samples, none other
    assert [r["on_corrupt"] for r in integrity.damaged(RunLocation(run))] == ["skip"]


def test_a_truncated_shard_fails_its_checksum(run):
    with open(_shard(run), "r+b") as f:
        f.truncate(os.path.getsize(_shard(run)) - 1024)  # only the end-of-archive blocks: parses fine
    with pytest.raises(CorruptShard, match="do not match the manifest's checksum"):
        list(open_split(run, "train"))


# ----------------------------------------------------------------------------- repair

def _gelato(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "gelato.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


@pytest.mark.slow  # gelato ingest in a subprocess (Prefect)
def test_the_repair_command_in_the_error_rewrites_only_the_damaged_shard(run):
    before = {n: os.path.getmtime(_shard(run, n)) for n in os.listdir(os.path.join(run, "shards"))}
    good = open(_shard(run), "rb").read()
    _overwrite(_shard(run), 3000, b"\x00" * 2048)
    with pytest.raises(CorruptShard) as e:
        list(open_split(run, "train"))
    cmd = shlex.split(str(e.value).split("with: ", 1)[1])
    assert cmd[:2] == ["gelato", "ingest"]
    r = _gelato(*cmd[1:], "--no-progress")
    assert r.returncode == 0, r.stderr
    assert open(_shard(run), "rb").read() == good  # shards are deterministic: the same bytes again
    after = {n: os.path.getmtime(_shard(run, n)) for n in before}
    assert [n for n in before if after[n] != before[n]] == ["train-000002.tar"]
    assert integrity.damaged(RunLocation(run)) == []
    assert len(list(open_split(run, "train"))) == _manifest(run)["splits"]["train"]["count"]


@pytest.mark.slow  # gelato ingest in a subprocess (Prefect)
def test_repair_of_a_shard_that_does_not_exist_is_refused(run, tmp_path):
    r = _gelato("ingest", str(tmp_path / "src"), "--out", run, "--shard-size", "10", "--val-fraction", "0",
                "--repair", "train-000099.tar")
    assert r.returncode == 2 and "no shard named train-000099.tar" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# ----------------------------------------------------------------------------- pre-flight

@pytest.mark.slow  # starts a separate Python process
def test_pretrain_preflight_names_a_missing_shard_in_about_a_second(run):
    os.remove(_shard(run, "train-000001.tar"))
    t0 = time.perf_counter()
    r = _gelato("pretrain", "--run", run, "steps=2")
    dt = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    assert "1 shard(s) missing (train-000001.tar)" in r.stderr and "--repair train-000001.tar" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "Ray" not in r.stdout + r.stderr  # nothing started
    assert dt < 15, dt  # the interpreter and imports; the check itself is one listing


@pytest.mark.slow  # starts a separate Python process
def test_evaluate_preflight_names_a_resized_shard(run):
    _overwrite(_shard(run), os.path.getsize(_shard(run)), b"\0" * 512)  # appended: a torn copy
    r = _gelato("evaluate", "--run", run)
    assert r.returncode == 2
    assert "1 shard(s) of the wrong size (train-000002.tar" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("what", ["file", "empty"])
def test_ingest_preflight_refuses_a_file_or_an_empty_folder_before_prefect(tmp_path, what):
    src = tmp_path / "src"
    if what == "file":
        src.write_bytes(b"not a folder")
    else:
        src.mkdir()
        (src / ".hidden").write_text("x")
    r = _gelato("ingest", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert ("is a file" if what == "file" else "is empty") in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "Flow run" not in r.stdout + r.stderr


@pytest.mark.slow  # starts a separate Python process
def test_pretrain_and_evaluate_preflight_refuse_wrong_s3_credentials_in_one_line(tmp_path, s3_endpoint_with_auth):
    import yaml

    cfg = tmp_path / "s3.yaml"
    cfg.write_text(yaml.safe_dump({"storage_options": {"key": "AKIAWRONGKEY", "secret": "super-secret-value",
                                                       "client_kwargs": {"endpoint_url": s3_endpoint_with_auth}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for args in (["pretrain", "--run", "s3://some-bucket/run", "--config", str(cfg)],
                 ["evaluate", "--run", "s3://some-bucket/run", "--config", str(cfg)]):
        r = subprocess.run([sys.executable, "-m", "gelato.cli", *args], capture_output=True, text=True, timeout=120,
                           env=dict(env, PYTHONPATH=REPO), cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 2, out[-2000:]
        assert "some-bucket" in r.stderr and s3_endpoint_with_auth in r.stderr
        assert "super-secret-value" not in out and "Traceback" not in out and "Ray" not in out
