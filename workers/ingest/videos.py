"""Video sources: a folder of video files, and the generated ``moving-fashion-mnist``.

``VideoFolder`` reads the layout of an image folder with videos in it: one sub-folder per class
(optionally under ``train/``, ``val/``, ``test/``), or a flat folder of unlabelled videos. Each
video (``.mp4 .webm .avi .mkv .mov .m4v``) becomes one clip: its first ``clip_frames`` frames at
``clip_fps`` (the frame on screen at each ``k / fps``; ``workers/data/clips.py``), resized to
``clip_size`` when given, stored in the shard with ``clip_codec``. A video too short for the clip,
or one FFmpeg cannot decode, is rejected with the reason, as a bad image is.

Files beside a video ``NAME.EXT`` travel in its sample: ``NAME.VIEW.EXT`` (another camera of the
same moment, e.g. ``NAME.cam2.mkv``: the same frames are taken from it), ``NAME.masks.npz`` (per
frame masks, uint8 ``(T, H, W)`` per view, resampled like the frames) and ``NAME.json`` (labels
for evaluation, kept as they are in the sample's ``.json`` under ``info``).

Sound: a video's own sound track (its first audio stream), or else an audio file beside it
(``NAME.wav``, ``.flac``, ...), is kept for the clip's span (``clip_frames / clip_fps`` seconds),
mono, resampled to ``audio_rate``, as the sample's ``audio.flac`` (``workers/data/audio.py``).
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

import numpy as np

from workers.data.clips import ClipError, clip_members, read_audio_track, read_video
from workers.data.images import Encoded, RejectedImage
from workers.ingest.records import SPLIT_DIRS, FolderSource, Record, SourceError, list_files

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
MOVING_FASHION_MNIST = ("moving-fashion-mnist", "moving_fashion_mnist", "mfmnist")
MOVING_FASHION_MNIST_SOUND = ("moving-fashion-mnist-sound", "moving_fashion_mnist_sound", "mfmnist-sound")
DEFAULT_CLIPS = {"train": 2000, "test": 500}  # moving-fashion-mnist's size (see moving_fmnist.py)


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


def _stem(path: str) -> str:
    return path.rsplit(".", 1)[0]


def split_views(files: list[str]) -> dict[str, dict[str, str]]:
    """Main videos and their other views: ``{main: {view: path}}``. ``d/NAME.VIEW.EXT`` is a view of
    ``d/NAME.EXT2`` when that video exists; otherwise it is a video of its own (dots in names are fine)."""
    videos = [f for f in files if is_video(f)]
    stems = {_stem(f): f for f in videos}
    out: dict[str, dict[str, str]] = {}
    for f in videos:
        base = _stem(f)
        owner, _, view = base.rpartition(".")
        if "/" not in view and owner and owner in stems and stems[owner] != f:
            continue  # a view, attached below
        out[f] = {}
    for f in videos:
        owner, _, view = _stem(f).rpartition(".")
        if f not in out and owner in stems:
            out[stems[owner]][view] = f
    return out


class VideoFolder(FolderSource):
    """Videos in class sub-folders (or flat, unlabelled); see the module docstring."""

    kind = "videofolder"
    modality = "clip"

    def __init__(self, root: str, clip_frames: int = 16, clip_fps: float = 10.0, clip_size: Optional[int] = None,
                 clip_codec: str = "png", name: Optional[str] = None, audio_rate: int = 16000):
        super().__init__(root)
        self._name = name
        self.audio_rate = int(audio_rate)
        self.frames, self.fps, self.size, self.codec = clip_frames, clip_fps, clip_size, clip_codec
        self._views = split_views(list_files(root))
        files = sorted(self._views)
        if not files:
            raise SourceError(f"{root}: no video file ({', '.join(VIDEO_EXTS)}) in it")
        top = {f.split("/", 1)[0] for f in files if "/" in f}
        split_root = bool(top) and top <= set(SPLIT_DIRS)
        labelled = all(f.count("/") >= (2 if split_root else 1) for f in files)
        classes = sorted({f.split("/")[1 if split_root else 0] for f in files}) if labelled else []
        self.classes = classes or None
        self._splits: dict[str, list[Record]] = {}
        for f in files:
            parts = f.split("/")
            split = parts[0] if split_root else "train"
            label = classes.index(parts[1 if split_root else 0]) if labelled else None
            self._splits.setdefault(split, []).append(Record(f, label=label))

    def _clip(self, path: str, channels: int = 3) -> np.ndarray:
        frames = read_video(path, self.fps, self.size, channels, max_frames=self.frames)
        if len(frames) < self.frames:
            raise RejectedImage(f"shorter than a clip: {len(frames)} of {self.frames} frames at {self.fps:g} fps")
        return frames

    def encode(self, record: Record, image_format: str) -> Encoded:
        """The clip (and its other views, masks, labels) of one video; RejectedImage says why not."""
        path = os.path.join(self.root, record.path)
        stem = _stem(path)
        try:
            clip = self._clip(path)
            extras, meta = {}, {"frames": self.frames, "fps": self.fps, "views": ["main"]}
            for view, rel in sorted(self._views.get(record.path, {}).items()):
                extras |= clip_members(self._clip(os.path.join(self.root, rel)), self.codec, self.fps, view)
                meta["views"].append(view)
        except ClipError as e:
            raise RejectedImage(str(e).replace(path, os.path.basename(path))) from None
        if os.path.exists(stem + ".masks.npz"):
            extras["masks.npz"] = self._masks(stem + ".masks.npz", path, clip.shape)
            meta["masks"] = True
        if os.path.exists(stem + ".json"):
            with open(stem + ".json") as f:
                meta["info"] = json.load(f)
        sound = self._sound(path, stem)
        if sound is not None:
            from workers.data.audio import encode_flac

            extras["audio.flac"] = encode_flac(sound, self.audio_rate)
            meta["audio"] = {"sample_rate": self.audio_rate, "samples": len(sound)}
        members = clip_members(clip, self.codec, self.fps)
        first = next(iter(members))  # the sample's main member; the clip's other frames go with the extras
        return Encoded(first, members.pop(first), "RGB", tuple(clip.shape[:1]) + tuple(clip.shape[2:]),
                       members | extras, meta)

    def _sound(self, path: str, stem: str) -> Optional[np.ndarray]:
        """The clip's span of the video's sound track, or of an audio file beside it; None without either."""
        from workers.data.audio import AUDIO_EXTS, AudioError, fit_length, read, resample

        seconds = self.frames / self.fps
        try:
            track = read_audio_track(path, self.audio_rate, seconds)
        except ClipError as e:
            raise RejectedImage(str(e).replace(path, os.path.basename(path))) from None
        if track is not None:
            return track
        for ext in AUDIO_EXTS:
            if os.path.exists(stem + ext):
                try:
                    x, rate = read(stem + ext)
                except AudioError as e:
                    raise RejectedImage(f"{os.path.basename(stem + ext)}: {e}") from None
                return fit_length(resample(x[:int(round(seconds * rate))], rate, self.audio_rate),
                                  int(round(seconds * self.audio_rate)))
        return None

    def _masks(self, npz: str, video: str, shape: tuple) -> bytes:
        """The masks at the clip's frames: those of the video's frames on screen at each k / fps."""
        import av

        with av.open(video) as c:
            rate = float(c.streams.video[0].average_rate or self.fps)
        idx = np.floor(np.arange(self.frames) * rate / self.fps + 1e-6).astype(int)  # source frame on screen at k / fps
        out = {}
        with np.load(npz) as masks:
            for view, m in masks.items():
                if len(m) <= idx[-1]:
                    raise RejectedImage(f"{os.path.basename(npz)}: {view} has {len(m)} masks, the clip needs "
                                        f"{idx[-1] + 1}")
                m = m[idx]
                if self.size and m.shape[1:] != (self.size, self.size):
                    from PIL import Image

                    m = np.stack([np.asarray(Image.fromarray(x).resize((self.size, self.size), Image.NEAREST))
                                  for x in m])
                out["main" if view == "cam1" else view] = m
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        return buf.getvalue()

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(super().fingerprint().encode())
        mains = set(self._views)
        for f in list_files(self.root):  # sidecars (other views, masks, labels) change the samples too
            if f not in mains:
                st = os.stat(os.path.join(self.root, f))
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def moving_fashion_mnist(fashion, clips: dict[str, int], frames: int, size: int, fps: float, seed: int = 0,
                         cache: Optional[str] = None, sound: bool = False) -> str:
    """The generated videos' folder (made once per settings, under ``cache``: ``$GELATO_CACHE`` or
    ``~/.cache/gelato``), its items from ``fashion`` (a ``FashionMNIST`` source); see ``moving_fmnist``."""
    from workers.ingest.moving_fmnist import generate

    cache = cache or os.environ.get("GELATO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gelato")
    tag = "-".join(f"{k}{v}" for k, v in sorted(clips.items())) + f"-t{frames}-s{size}-f{fps:g}-seed{seed}"
    tag += "-sound" if sound else ""
    root = os.path.join(cache, "moving-fashion-mnist", tag)
    if not os.path.exists(os.path.join(root, "moving_fmnist.json")):
        from tqdm.auto import tqdm

        with tqdm(total=sum(clips.values()), desc="generate moving-fashion-mnist", unit="clip") as bar:
            generate(root, clips, fashion, frames=frames, size=size, fps=fps, seed=seed, progress=bar.update,
                     sound=sound)
    return root
