"""Image sources that ingestion turns into shards.

A source lists its samples per split as :class:`Record` s (no pixels are read while listing) and
reads one record's encoded bytes on demand, so shard writers in parallel threads or processes
share nothing but the list. Four kinds:

* ``fashion-mnist``: the idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or a ``--data-root`` holding them (gzip'd or not, flat
  or under ``FashionMNIST/raw``), or torchvision's download; splits ``train`` and ``test``.
* ``imagefolder``: one sub-folder per class (``root/cat/x.jpg``); if the root holds ``train/``,
  ``val/``, ``test/`` folders each in that layout, those are the splits.
* ``flat``: a folder of images with no labels (pure SSL); every file below it is a sample.
* ``voc``: a PASCAL VOC 2007 root (``JPEGImages/``, ``Annotations/*.xml``,
  ``ImageSets/Main/{train,val,test}.txt``) with multi-label targets over the 20 classes.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np

from workers.data.images import Encoded
from workers.ingest.records import SPLIT_DIRS, Record, Source, SourceError, list_files

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


class FlatFolder(Source):
    """A folder of images with no labels (pure SSL): one split, ``train``."""

    kind = "flat"

    def __init__(self, root: str):
        super().__init__(root)
        self._records = [Record(p) for p in list_files(root)]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.abspath(self.root)) or self.kind

    def splits(self) -> dict[str, list[Record]]:
        return {"train": list(self._records)}


class ImageFolder(Source):
    """One sub-folder per class; optional ``train/``/``val/``/``test/`` split folders above them."""

    kind = "imagefolder"

    def __init__(self, root: str):
        super().__init__(root)
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        split_roots = {s: s for s in SPLIT_DIRS if s in subdirs}
        if not (split_roots and set(subdirs) <= set(SPLIT_DIRS)):
            split_roots = {"train": ""}
        classes = sorted({c for s in split_roots.values()
                          for c in os.listdir(os.path.join(root, s) if s else root)
                          if os.path.isdir(os.path.join(root, s, c)) and not c.startswith(".")})
        if not classes:
            raise SourceError(f"{root}: no class folders found (ImageFolder layout is root/<class>/<image>)")
        self.classes = classes
        index = {c: i for i, c in enumerate(classes)}
        self._splits: dict[str, list[Record]] = {}
        for split, sub in split_roots.items():
            base = os.path.join(root, sub) if sub else root
            recs = []
            for c in sorted(os.listdir(base)):
                if c in index and os.path.isdir(os.path.join(base, c)):
                    for p in list_files(os.path.join(base, c)):
                        rel = "/".join(x for x in (sub, c, p) if x)
                        recs.append(Record(rel, label=index[c]))
            self._splits[split] = recs

    @property
    def name(self) -> str:
        return os.path.basename(os.path.abspath(self.root)) or self.kind

    def splits(self) -> dict[str, list[Record]]:
        return {k: list(v) for k, v in self._splits.items()}


class VOC2007(Source):
    """PASCAL VOC 2007 classification: multi-label targets over the 20 classes.

    An image's label set holds every class with at least one non-difficult object; classes seen
    only as "difficult" are listed apart (VOC's evaluation ignores them for that class).
    """

    kind = "voc"
    classes = VOC_CLASSES
    multilabel = True

    def __init__(self, root: str):
        if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2007")):
            root = os.path.join(root, "VOC2007")
        super().__init__(root)
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            if not os.path.isdir(os.path.join(root, sub)):
                raise SourceError(f"{root}: not a VOC root, {sub}/ is missing")
        self._splits = {}
        for split in SPLIT_DIRS:
            ids_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
            if not os.path.exists(ids_file):
                continue
            with open(ids_file) as f:
                ids = [line.strip() for line in f if line.strip()]
            self._splits[split] = [self._record(i) for i in ids]
        if not self._splits:
            raise SourceError(f"{root}: ImageSets/Main has none of train.txt, val.txt, test.txt")

    def _record(self, image_id: str) -> Record:
        xml_path = os.path.join(self.root, "Annotations", f"{image_id}.xml")
        present, difficult = set(), set()
        try:
            tree = ET.parse(xml_path)
            for obj in tree.getroot().iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in VOC_CLASSES:
                    continue
                if (obj.findtext("difficult") or "0").strip() == "1":
                    difficult.add(VOC_CLASSES.index(name))
                else:
                    present.add(VOC_CLASSES.index(name))
        except (OSError, ET.ParseError):
            pass  # the sample is still ingested; its labels are empty and the json says so
        return Record(f"JPEGImages/{image_id}.jpg", labels=tuple(sorted(present)),
                      difficult=tuple(sorted(difficult - present)))

    def splits(self) -> dict[str, list[Record]]:
        return {k: list(v) for k, v in self._splits.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        for f in sorted(Path(self.root, "ImageSets", "Main").glob("*.txt"))[:3]:
            h.update(f.read_bytes())
        return h.hexdigest()


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise SourceError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated idx file ({arr.size} bytes for shape {dims})")
    return arr.reshape(dims)


def find_fashion_mnist(data_root: Optional[str] = None, download: bool = True) -> str:
    """The folder holding the Fashion-MNIST idx files: ``data_root``, the Debian package, or a download."""
    candidates = ([data_root, os.path.join(data_root, "FashionMNIST", "raw")] if data_root else []) + FASHION_MNIST_DIRS
    for d in candidates:
        if d and all(_idx_path(d, f) for pair in FASHION_MNIST_FILES.values() for f in pair):
            return d
    if data_root and not download:
        raise SourceError(f"{data_root}: Fashion-MNIST idx files not found")
    cache = data_root or os.path.join(os.path.expanduser("~"), ".cache", "gelato")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(cache, train=True, download=True)
        FashionMNIST(cache, train=False, download=True)
    except Exception as e:  # no network, no torchvision: say what to do
        raise SourceError(
            "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist"
            + (f" nor in {data_root}" if data_root else "")
            + f", and torchvision's download failed ({type(e).__name__}: {e}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist`, or pass --data-root DIR holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz") from None
    return os.path.join(cache, "FashionMNIST", "raw")


def _idx_path(d: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


class FashionMNIST(Source):
    """Fashion-MNIST (Xiao et al. 2017) read straight from its idx files: 60,000 train, 10,000 test."""

    kind = "fashion-mnist"
    classes = FASHION_MNIST_CLASSES

    def __init__(self, data_root: Optional[str] = None):
        super().__init__(find_fashion_mnist(data_root))
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        for split, (img, lab) in FASHION_MNIST_FILES.items():
            self._images[split] = _read_idx(_idx_path(self.root, img))
            self._labels[split] = _read_idx(_idx_path(self.root, lab))
            if len(self._images[split]) != len(self._labels[split]):
                raise SourceError(f"{self.root}: {split} has {len(self._images[split])} images "
                                  f"but {len(self._labels[split])} labels")

    def splits(self) -> dict[str, list[Record]]:
        return {s: [Record(f"{s}/{i:05d}", label=int(y), index=i) for i, y in enumerate(self._labels[s])]
                for s in FASHION_MNIST_FILES}

    def pixels(self, record: Record) -> np.ndarray:
        return self._images[record.path.split("/", 1)[0]][record.index]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's images (N, 28, 28) uint8 and labels (N,)."""
        return self._images[split], self._labels[split]

    def read(self, record: Record) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.pixels(record), mode="L").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def encode(self, record: Record, image_format: str) -> Encoded:
        # The pixels come from a checked idx array: encode them directly, no decode round trip.
        from PIL import Image

        img = Image.fromarray(self.pixels(record), mode="L")
        buf = io.BytesIO()
        if image_format in ("keep", "png"):
            img.save(buf, format="PNG", compress_level=1)
            return Encoded("png", buf.getvalue(), "L", img.size)
        if image_format == "jpeg":
            img.save(buf, format="JPEG", quality=95)
            return Encoded("jpg", buf.getvalue(), "L", img.size)
        img.convert("RGB").save(buf, format="WEBP", lossless=True)
        return Encoded("webp", buf.getvalue(), "L", img.size)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.kind.encode())
        for split in sorted(FASHION_MNIST_FILES):
            h.update(self._images[split].tobytes())
            h.update(self._labels[split].tobytes())
        return h.hexdigest()


def open_source(source: str, data_root: Optional[str] = None, kind: str = "auto", params=None) -> Source:
    """Resolve the ``SOURCE`` argument of ``gelato ingest`` to a :class:`Source` (``params``, an
    ``IngestParams``, carries the clip settings of a video source)."""
    if source in ("fashion-mnist", "fashion_mnist", "fmnist") or kind == "fashion-mnist":
        return FashionMNIST(data_root)
    from workers.ingest import videos

    clip = {} if params is None else {"clip_frames": params.clip_frames, "clip_fps": params.clip_fps,
                                      "clip_size": params.clip_size, "clip_codec": params.clip_codec}
    from workers.ingest import audio

    sound = {} if params is None else {"audio_rate": params.audio_rate, "audio_seconds": params.audio_seconds}
    if source in audio.SPOKEN_DIGITS or kind == "spoken-digits":
        return audio.AudioFolder(audio.spoken_digits(), **sound, name="spoken-digits")
    sounding = source in videos.MOVING_FASHION_MNIST_SOUND or kind == "moving-fashion-mnist-sound"
    if source in videos.MOVING_FASHION_MNIST or kind == "moving-fashion-mnist" or sounding:
        root = videos.moving_fashion_mnist(FashionMNIST(data_root), videos.DEFAULT_CLIPS,
                                           frames=clip.get("clip_frames", 16), size=clip.get("clip_size") or 64,
                                           fps=clip.get("clip_fps", 10.0), sound=sounding)
        return videos.VideoFolder(root, **clip, name="moving-fashion-mnist" + "-sound" * sounding,
                                  audio_rate=sound.get("audio_rate", 16000))
    if not os.path.exists(source):
        raise SourceError(f"source path {source!r} does not exist")
    if not os.path.isdir(source):
        raise SourceError(f"source {source!r} is a file; give a folder of images or videos, a VOC root or 'fashion-mnist'")
    if kind == "auto":
        entries = [e for e in os.listdir(source) if not e.startswith(".")]
        if {"JPEGImages", "Annotations"} <= set(entries) or "VOC2007" in entries:
            kind = "voc"
        elif any(videos.is_video(f) for f in list_files(source)[:1000]):
            kind = "videofolder"
        elif any(audio.is_audio(f) for f in list_files(source)[:1000]):
            kind = "audiofolder"
        elif entries and all(os.path.isdir(os.path.join(source, e)) for e in entries):
            kind = "imagefolder"
        else:
            kind = "flat"
    if kind == "videofolder":
        return videos.VideoFolder(source, **clip, audio_rate=sound.get("audio_rate", 16000))
    if kind == "audiofolder":
        return audio.AudioFolder(source, **sound)
    kinds = {"voc": VOC2007, "imagefolder": ImageFolder, "flat": FlatFolder}
    if kind not in kinds:
        raise SourceError(f"unknown source kind {kind!r}; choose auto, fashion-mnist, moving-fashion-mnist, "
                          f"spoken-digits, videofolder, audiofolder, {', '.join(kinds)}")
    return kinds[kind](source)
