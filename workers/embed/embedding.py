"""``gelato embed``: one vector per image, from a run's backbone, as a Parquet dataset.

``embed(run, data, out)``:

* ``data`` is a split of the run (``train``, ``val``, ``test``: read from its shards, checksums
  verified, labels kept) or a folder or S3 prefix of image files (every file with an image
  extension below it, in sorted order; the key is the path relative to it, the label null);
* the backbone is the run's ``checkpoints/final/backbone.pt`` (or ``checkpoint``), fed exactly as
  evaluation feeds it (``Objective.preprocess``: /255, resized to the run's ``image_size``,
  normalised with its training mean and std), in float32;
* ``out`` (a local folder or ``s3://``) receives ``part-NNNNN.parquet`` files of ``part_rows`` rows
  each, columns ``key`` (string), ``label`` (int64, null when unknown) and ``vector``
  (fixed-size list of float32), and ``_embed.json`` describing them. ``pyarrow.parquet.read_table(out)``
  (or pandas, DuckDB, Spark) reads the whole dataset.

Each part is written atomically as it is finished; a rerun of the same command skips the parts that
exist, so an interrupted embedding resumes. ``_embed.json`` is written first with what the parts
depend on (the checkpoint's sha256, the data and its item count, ``part_rows``): a rerun with other
inputs is refused unless ``overwrite``. ``complete`` turns true with the last part.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
from typing import Callable, Iterator, Optional

import torch

from workers.data.images import IMAGE_EXTS, decode_bytes
from workers.data.loader import fit_size
from workers.data.manifest import read_manifest
from workers.model import BACKBONE_FILE, load_for_features, read_backbone
from workers.storage import RunLocation, filesystem

META = "_embed.json"


class EmbedError(ValueError):
    """The embedding cannot start or go on (the message names the file, split or setting)."""


def _images_under(uri: str, storage_options: Optional[dict]) -> list[str]:
    fs = filesystem(uri, storage_options)
    root = uri.split("://", 1)[1] if uri.startswith("s3://") else uri
    if not fs.isdir(root):
        raise EmbedError(f"--data {uri}: neither a split of the run nor a folder of images")
    found = sorted(p for p in fs.find(root) if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
    if not found:
        raise EmbedError(f"--data {uri}: no image files ({', '.join(sorted(IMAGE_EXTS))}) below it")
    return found


class _Items:
    """What to embed: ``len``, and ``batches(start, stop, size)`` of (keys, labels, uint8 images)."""

    def __init__(self, run: RunLocation, data: str, channels: int, size: int, storage_options: Optional[dict]):
        self.run, self.data, self.channels, self.size = run, data, channels, size
        manifest = read_manifest(run)
        if manifest is None:
            raise EmbedError(f"{run.uri}: no manifest.json; give a run made by `gelato ingest`")
        self.split = data if data in manifest["splits"] else None
        if self.split is None and "/" not in data and "://" not in data and not data.startswith("."):
            raise EmbedError(f"--data {data}: the run has no split {data!r} (it has "
                             f"{', '.join(manifest['splits'])}); give a split or a folder of images")
        self.manifest = manifest
        if self.split is not None:
            self.count = int(manifest["splits"][self.split]["count"])
            self.files = None
            self._stream, self._pos = None, 0  # one pass over the split's shards, part after part
        else:
            self.files = _images_under(data, storage_options)
            self.count = len(self.files)
            self.fs = filesystem(data, storage_options)
            self.root = (data.split("://", 1)[1] if data.startswith("s3://") else data).rstrip("/")

    def batches(self, start: int, stop: int, size: int) -> Iterator[tuple[list[str], list, torch.Tensor]]:
        if self.files is None:
            from workers.data.stream import open_split

            if self._stream is None or start < self._pos:
                self._stream, self._pos = iter(open_split(self.run, self.split, manifest=self.manifest)), 0
            keys, labels, images = [], [], []
            while self._pos < stop:
                s = next(self._stream, None)
                if s is None:
                    raise EmbedError(f"{self.run.uri}: split {self.split} ended after {self._pos} samples; its "
                                     f"manifest says {self.count}")
                self._pos += 1
                if self._pos <= start:  # the parts already written: passed over once, in the same pass
                    continue
                keys.append(s["key"])
                labels.append(int(s["label"]) if int(s["label"]) >= 0 else None)
                images.append(fit_size(s["image"], self.size))
                if len(keys) == size:
                    yield keys, labels, torch.stack(images)
                    keys, labels, images = [], [], []
            if keys:
                yield keys, labels, torch.stack(images)
            return
        for b in range(start, stop, size):
            paths = self.files[b:min(stop, b + size)]
            images = []
            for p in paths:
                try:
                    with self.fs.open(p, "rb") as f:
                        arr = decode_bytes(f.read(), self.channels)
                except Exception as e:  # noqa: BLE001 - any decoder error names the file
                    raise EmbedError(f"{p}: cannot be decoded as an image: {type(e).__name__}: {e}") from None
                images.append(fit_size(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), self.size))
            yield [posixpath.relpath(p, self.root) for p in paths], [None] * len(paths), torch.stack(images)


def _part_bytes(keys: list[str], labels: list, vectors: torch.Tensor) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    table = pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).numpy(), pa.float32()),
                                                                  dim)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def embed(run: str, data: str, out: str, storage_options: Optional[dict] = None, checkpoint: Optional[str] = None,
          batch_size: int = 256, part_rows: int = 4096, overwrite: bool = False,
          progress: Optional[Callable[[int], None]] = None, total: Optional[Callable[[int], None]] = None) -> dict:
    """Embed ``data`` with the run's backbone into the Parquet dataset ``out`` (see the module);
    returns ``_embed.json``'s content with ``parts_written`` (those this call wrote)."""
    loc = RunLocation(run, storage_options or {})
    ckpt = checkpoint or loc.join(BACKBONE_FILE)
    try:
        data_bytes = read_backbone(ckpt, storage_options)
    except FileNotFoundError as e:
        raise EmbedError(f"{e}, or give --checkpoint") from None
    sha = hashlib.sha256(data_bytes).hexdigest()
    backbone, preprocess, payload = load_for_features(ckpt, storage_options, data=data_bytes)
    items = _Items(loc, data, int(payload.get("image_channels", payload["in_channels"])), int(payload["image_size"]),
                   storage_options)
    dest = RunLocation(out, storage_options or {})
    fs = dest.fs()
    meta = {"checkpoint": ckpt, "checkpoint_sha256": sha, "run": loc.uri, "data": data, "count": items.count,
            "part_rows": part_rows, "feature_dim": int(payload["feature_dim"]), "image_size": int(payload["image_size"]),
            "columns": {"key": "string", "label": "int64 (null: unknown)", "vector": f"float32[{payload['feature_dim']}]"}}
    try:
        with fs.open(dest.join(META), "r") as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    same = old is not None and {k: old.get(k) for k in meta} == meta
    if old is not None and not same and not overwrite:
        raise EmbedError(f"{dest.join(META)}: embeddings of other inputs are there ({old.get('data')}, checkpoint "
                         f"{str(old.get('checkpoint_sha256'))[:12]}); choose another --out or pass --overwrite")
    if old is not None and not same:
        fs.rm(dest.uri, recursive=True)
    dest.write_atomic(META, json.dumps(meta | {"complete": False}, indent=1))
    n_parts = max(1, math.ceil(items.count / part_rows))
    if total:
        total(items.count)
    written = 0
    for i in range(n_parts):
        start, stop = i * part_rows, min(items.count, (i + 1) * part_rows)
        name = f"part-{i:05d}.parquet"
        if fs.exists(dest.join(name)):
            if progress:
                progress(stop - start)
            continue
        keys, labels, vectors = [], [], []
        with torch.no_grad():
            for k, y, x in items.batches(start, stop, batch_size):
                vectors.append(backbone(preprocess(x)).float())
                keys += k
                labels += y
                if progress:
                    progress(len(k))
        dest.write_atomic(name, _part_bytes(keys, labels, torch.cat(vectors)))
        written += 1
    meta |= {"complete": True, "parts": n_parts}
    dest.write_atomic(META, json.dumps(meta, indent=1))
    return meta | {"parts_written": written}
