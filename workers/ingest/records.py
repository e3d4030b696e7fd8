"""What every ingest source is made of: :class:`Record` (one sample to ingest, no pixels),
:class:`Source` (lists records per split, encodes one on demand), :class:`FolderSource` (a folder
listed once into splits) and :class:`SourceError`. The image sources are in ``sources.py``, the
video ones in ``videos.py``, the audio ones in ``audio.py``."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

from workers.data.images import Encoded, encode

SPLIT_DIRS = ("train", "val", "test")


class SourceError(ValueError):
    """The source cannot be read at all (missing path, unknown layout, broken index file)."""


@dataclass(frozen=True)
class Record:
    """One sample to ingest: where it comes from and its label(s); no pixels."""

    path: str                               # path under the source root, or "train/00042" for arrays
    label: Optional[int] = None             # single-label class index
    labels: Optional[tuple[int, ...]] = None  # multi-label class indices (VOC)
    difficult: Optional[tuple[int, ...]] = None  # VOC classes present only as "difficult" objects
    index: int = -1                         # row in an in-memory array source


class Source:
    """Base class: ``splits()`` lists records, ``read(record)`` returns the encoded image bytes."""

    kind = "source"
    classes: Optional[list[str]] = None
    multilabel = False

    def __init__(self, root: str):
        self.root = root

    @property
    def name(self) -> str:
        return self.kind

    def splits(self) -> dict[str, list[Record]]:
        raise NotImplementedError

    def read(self, record: Record) -> bytes:
        with open(os.path.join(self.root, record.path), "rb") as f:
            return f.read()

    def encode(self, record: Record, image_format: str) -> Encoded:
        """Validated, shard-ready bytes of one record (raises RejectedImage for a bad file)."""
        return encode(self.read(record), image_format)

    def fingerprint(self) -> str:
        """Changes when any file is added, removed, resized or touched (cheap: no content read)."""
        h = hashlib.sha256(self.kind.encode())
        for split, records in sorted(self.splits().items()):
            h.update(split.encode())
            for r in records:
                st = os.stat(os.path.join(self.root, r.path))
                h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\0{r.label}\0{r.labels}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": os.path.abspath(self.root)}


class FolderSource(Source):
    """A folder whose records a subclass lists per split into ``self._splits`` at construction, shown
    under ``name`` (default: the folder's name); ``modality`` ("clip", "audio") goes in the manifest."""

    modality = "image"
    _name: Optional[str] = None
    _splits: dict[str, list[Record]]

    @property
    def name(self) -> str:
        return self._name or os.path.basename(os.path.abspath(self.root)) or self.kind

    def splits(self) -> dict[str, list[Record]]:
        return {k: list(v) for k, v in self._splits.items()}

    def describe(self) -> dict:
        return super().describe() | ({"modality": self.modality} if self.modality != "image" else {})


def list_files(root: str) -> list[str]:
    """Every regular, non-hidden file below ``root``, as sorted relative POSIX paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
    return sorted(out)
