"""``gelato embed``: a run's split or a folder of images through the run's backbone, as a Parquet
dataset read back with pyarrow; resumed part by part; on a real S3 API (moto_server)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from evalrun import ingest_folder, pretrain_by_hand
from imagegen import write_images, write_separable
from workers.data.loader import load_split
from workers.data.manifest import read_manifest
from workers.embed.embedding import EmbedError, embed
from workers.model import load_for_features
from workers.storage import RunLocation, filesystem


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    write_separable(root / "src", n_classes=3, per_class=8, size=8, splits=("train", "test"))
    run = str(root / "run")
    pretrain_by_hand(run, ingest_folder(str(root / "src"), run), steps=2)
    return run


def _features(run: str, images: torch.Tensor) -> torch.Tensor:
    backbone, preprocess, _ = load_for_features(os.path.join(run, "checkpoints/final/backbone.pt"))
    with torch.no_grad():
        return backbone(preprocess(images))


def test_a_split_embeds_as_evaluation_sees_it_and_resumes_part_by_part(run, tmp_path):
    out = str(tmp_path / "emb")
    meta = embed(run, "test", out, part_rows=7, batch_size=5)
    assert meta["complete"] and meta["count"] == 24 and meta["parts"] == 4 == meta["parts_written"]
    table = pq.read_table(out)
    split = load_split(RunLocation(run), read_manifest(RunLocation(run)), "test")
    assert table.column("key").to_pylist() == split["key"]
    assert table.column("label").to_pylist() == split["label"].tolist()
    vectors = torch.from_numpy(np.stack(table.column("vector").to_numpy(zero_copy_only=False)))
    assert vectors.shape == (24, meta["feature_dim"])
    assert torch.allclose(vectors, _features(run, split["image"]), atol=1e-5)
    # interrupted after part 2: the rerun writes only what is missing, and the dataset is the same
    os.remove(os.path.join(out, "part-00002.parquet"))
    again = embed(run, "test", out, part_rows=7, batch_size=5)
    assert again["parts_written"] == 1 and pq.read_table(out).equals(table)
    # other inputs at the same place: refused, unless asked to replace them
    with pytest.raises(EmbedError, match="other inputs.*--overwrite"):
        embed(run, "train", out, part_rows=7)
    assert embed(run, "train", out, part_rows=7, overwrite=True)["count"] == pq.read_table(out).num_rows
    with open(os.path.join(out, "_embed.json")) as f:
        assert json.load(f)["data"] == "train"


def test_a_folder_of_images_any_size_keys_relative_no_labels(run, tmp_path):
    write_images(tmp_path / "imgs", n_classes=2, per_class=3, size=8)
    Image.fromarray(np.full((20, 12), 7, np.uint8), "L").save(tmp_path / "imgs" / "odd.png")  # resized, cropped
    out = str(tmp_path / "emb")
    meta = embed(run, str(tmp_path / "imgs"), out)
    table = pq.read_table(out)
    keys = table.column("key").to_pylist()
    assert meta["count"] == 7 and keys == sorted(keys) and "odd.png" in keys and "class0/" in keys[0]
    assert table.column("label").null_count == 7
    img = torch.from_numpy(np.asarray(Image.open(tmp_path / "imgs" / keys[0]).convert("L")))[None, None]
    got = torch.from_numpy(np.asarray(table.column("vector")[0].values.to_numpy()))
    assert torch.allclose(got, _features(run, img)[0], atol=1e-5)


def test_bad_inputs_are_named(run, tmp_path):
    with pytest.raises(EmbedError, match="no split 'tset'"):
        embed(run, "tset", str(tmp_path / "e"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    with pytest.raises(EmbedError, match="a.png: cannot be decoded"):
        embed(run, str(tmp_path / "broken"), str(tmp_path / "e2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedError, match="no image files"):
        embed(run, str(tmp_path / "empty"), str(tmp_path / "e3"))
    with pytest.raises(EmbedError, match="gelato pretrain"):
        embed(run, "test", str(tmp_path / "e4"), checkpoint=str(tmp_path / "none.pt"))


def test_embeddings_to_s3_read_back_with_pyarrow(run, s3_bucket, monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri = f"s3://{s3_bucket}/emb"
    meta = embed(run, "test", uri, part_rows=10)
    fs = filesystem(uri)
    assert sorted(os.path.basename(p) for p in fs.ls(f"{s3_bucket}/emb")) == [
        "_embed.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(f"{s3_bucket}/emb", filesystem=fs)
    assert table.num_rows == meta["count"] == 24 and meta["parts_written"] == 3
    assert embed(run, "test", uri, part_rows=10)["parts_written"] == 0  # a rerun: nothing to do


def test_readme_embed_commands_run_as_written(run, tmp_path, s3_bucket, s3_endpoint, monkeypatch, capsys):
    """The README's `gelato embed` lines, with runs/demo, ~/my_photos and the bucket replaced."""
    import re

    from gelato.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    write_images(tmp_path / "photos", n_classes=2, per_class=2, size=8)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    lines = re.findall(r"^gelato (embed .*)$", readme[readme.index("## Embeddings: `gelato embed`"):], re.M)
    assert len(lines) == 2
    for line in lines:
        line = line.replace("runs/demo/", f"{tmp_path}/").replace("runs/demo", run)
        line = line.replace("~/my_photos", str(tmp_path / "photos")).replace("s3://my-bucket", f"s3://{s3_bucket}")
        assert main(line.split() + ["--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "24 vectors" in said and "4 vectors" in said
    assert pq.read_table(str(tmp_path / "embeddings" / "test")).num_rows == 24
    fs = filesystem(f"s3://{s3_bucket}")
    assert pq.read_table(f"{s3_bucket}/embeddings/photos", filesystem=fs).num_rows == 4
