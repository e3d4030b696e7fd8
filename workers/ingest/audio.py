"""Audio sources: a folder of audio files, and the generated ``spoken-digits``.

``AudioFolder`` reads the layouts of an image folder with audio in it: one sub-folder per class
(optionally under ``train/``, ``val/``, ``test/``), or a flat folder of unlabelled files, or any
layout with a ``labels.csv`` at the root (columns ``path,label``: the path relative to the root;
the classes are the sorted labels). Files (``workers/data/audio.py``'s ``AUDIO_EXTS``) are decoded
with soundfile, mixed to mono, resampled to ``audio_rate`` and stored as 16-bit FLAC. A file longer
than 1.5 × ``audio_seconds`` is cut into segments of ``audio_seconds`` (each a sample, its offset in
the sample's ``.json``); shorter ones are one sample each (the loader centres them in
``audio_seconds``). A sidecar ``NAME.json`` (labels for evaluation only, e.g. the speaker) is kept
in the sample's ``.json`` under ``info``. Unreadable, empty and silent files are rejected with the
reason.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

from workers.data.audio import AudioError, check, encode_flac, info, is_audio, read, resample, segments
from workers.data.images import Encoded, RejectedImage
from workers.ingest.records import SPLIT_DIRS, FolderSource, Record, SourceError, list_files

SPOKEN_DIGITS = ("spoken-digits", "spoken_digits")
LABELS_CSV = "labels.csv"


class AudioFolder(FolderSource):
    """Audio files in class sub-folders, flat, or labelled by ``labels.csv``; see the module docstring."""

    kind = "audiofolder"
    modality = "audio"

    def __init__(self, root: str, audio_rate: int = 16000, audio_seconds: float = 1.0, name: Optional[str] = None):
        super().__init__(root)
        self._name = name
        self.rate, self.seconds = int(audio_rate), float(audio_seconds)
        files = [f for f in list_files(root) if is_audio(f)]
        if not files:
            raise SourceError(f"{root}: no audio file (.wav .flac .ogg .mp3 ...) in it")
        labels = self._csv_labels(root, files)
        top = {f.split("/", 1)[0] for f in files if "/" in f}
        split_root = bool(top) and top <= set(SPLIT_DIRS)
        if labels is None:
            labelled = all(f.count("/") >= (2 if split_root else 1) for f in files)
            labels = {f: f.split("/")[1 if split_root else 0] for f in files} if labelled else {}
        classes = sorted(set(labels.values()))
        self.classes = classes or None
        self._bounds: dict[tuple[str, int], tuple[int, int]] = {}
        self._splits: dict[str, list[Record]] = {}
        self.unreadable: list[dict] = []
        for f in files:
            split = f.split("/", 1)[0] if split_root else "train"
            label = classes.index(labels[f]) if f in labels else None
            try:
                frames, rate = info(os.path.join(root, f))
                cuts = segments(frames, rate, self.seconds)
            except AudioError:
                cuts = [(0, -1)]  # listed anyway: encode() rejects it with the reason, as for a bad image
            for i, (a, b) in enumerate(cuts):
                self._bounds[(f, i)] = (a, b)
                self._splits.setdefault(split, []).append(Record(f, label=label, index=i))

    @staticmethod
    def _csv_labels(root: str, files: list[str]) -> Optional[dict[str, str]]:
        path = os.path.join(root, LABELS_CSV)
        if not os.path.exists(path):
            return None
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise SourceError(f"{path}: needs a header with the columns path,label")
        labels = {r["path"].strip().replace(os.sep, "/"): r["label"].strip() for r in rows}
        unknown = sorted(set(labels) - set(files))
        if unknown:
            raise SourceError(f"{path}: {len(unknown)} path(s) are not audio files under {root} (first: {unknown[0]})")
        return labels

    def encode(self, record: Record, image_format: str) -> Encoded:
        """One segment as FLAC at the ingest's rate; RejectedImage says why not."""
        path = os.path.join(self.root, record.path)
        start, stop = self._bounds[(record.path, record.index)]
        try:
            if stop < 0:
                info(path)  # raises with libsndfile's reason
            x, rate = read(path, start, stop)
            x = resample(x, rate, self.rate)
            check(x, self.rate)
        except AudioError as e:
            raise RejectedImage(str(e).replace(path, record.path)) from None
        meta = {"sample_rate": self.rate, "offset": round(start / rate, 6), "duration": round(len(x) / self.rate, 6),
                "segment": record.index}
        stem = path.rsplit(".", 1)[0]
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                meta["info"] = json.load(f)
        return Encoded("flac", encode_flac(x, self.rate), "mono", (len(x),), {}, meta)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(super().fingerprint().encode())
        h.update(f"{self.rate}\0{self.seconds}".encode())
        for f in list_files(self.root):  # sidecars and labels.csv change the samples too
            if not is_audio(f):
                st = os.stat(os.path.join(self.root, f))
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def spoken_digits(cache: Optional[str] = None, **settings) -> str:
    """The generated utterances' folder (made once per settings under ``cache``: ``$GELATO_CACHE`` or
    ``~/.cache/gelato``); see ``workers/ingest/spoken_digits.py``."""
    from workers.ingest.spoken_digits import DEFAULTS, generate

    s = DEFAULTS | settings
    cache = cache or os.environ.get("GELATO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gelato")
    tag = f"v{s['voices']}-r{s['repeats']}-w{len(s['words'])}-seed{s['seed']}-gen2"  # gen2: coloured noise at 0-20 dB
    root = os.path.join(cache, "spoken-digits", tag)
    if not os.path.exists(os.path.join(root, "spoken_digits.json")):
        generate(root, **s)
    return root
