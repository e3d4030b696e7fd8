"""Video clips as every stage handles them: uint8 ``(T, C, H, W)`` frames, stored compressed.

Decoding and encoding go through PyAV (``av``), FFmpeg's maintained Python binding. Its wheels
bundle FFmpeg (with libx264, libvpx, FFV1, PNG), so nothing beyond ``pip`` is needed, and it
depends on no torch build, so it installs beside our pinned torch; torchcodec would need FFmpeg's
shared libraries from the system and a build matched to torch's version.

* :func:`read_video` — a video file (mp4, webm, avi, mkv ...) resampled to a fixed frame rate:
  at each time ``k / fps``, the frame on screen; clips are then cut from it.
* :func:`clip_members` / :func:`clip_from_members` — a clip to and from the members of a shard
  sample, in one of :data:`CLIP_CODECS`: ``png``, one PNG per frame (``KEY.000.png``, ``KEY.001.png``
  ...), the default; ``ffv1``, one lossless FFV1 video (``KEY.mkv``); ``h264``, one lossy H.264
  video (CRF 18, yuv444p; ``KEY.mp4``). Measured on Moving Fashion-MNIST (``bench/clip_storage.py``,
  16 × 64 × 64 RGB): PNG frames are 0.85x FFV1's bytes and decode 4.6x faster (the per-container
  cost of a video dominates such short clips); H.264 is 0.15x PNG's bytes at a mean error of 1 grey
  level, for large video sets. Through PyAV 18, H.264's bytes (and so its decoded frames) differ now
  and then between two encodings of one clip: not for anything that must repeat.
* :func:`encode_clip` / :func:`decode_clip` — one clip as one video file's bytes (FFV1 or H.264).

Every error names the file or the sample it came from.
"""
from __future__ import annotations

import io
import re
from fractions import Fraction
from typing import Optional

import numpy as np

# video codec name -> (container, pixel format for 1 channel, for 3 channels, encoder options)
VIDEO_CODECS = {
    "ffv1": ("matroska", "gray", "bgr0", {}),
    "h264": ("mp4", "yuv444p", "yuv444p", {"crf": "18", "preset": "veryfast"}),
}
EXTENSION = {"ffv1": "mkv", "h264": "mp4"}
CLIP_CODECS = ("png", *VIDEO_CODECS)
_FRAME = re.compile(r"^(?:(?P<view>[A-Za-z_][\w-]*)\.)?(?P<index>\d{3,})\.png$")  # [VIEW.]NNN.png


class ClipError(ValueError):
    """A video or a stored clip that cannot be decoded (the message names it)."""


def _frames_to_rgb_or_grey(frame, channels: int) -> np.ndarray:
    return frame.to_ndarray(format="gray" if channels == 1 else "rgb24")


def _tchw(frames: list[np.ndarray], channels: int) -> np.ndarray:
    """Decoded frames, (H, W) grey or (H, W, 3) RGB each, as one uint8 (T, C, H, W) clip."""
    arr = np.stack(frames)
    return arr[:, None] if channels == 1 else arr.transpose(0, 3, 1, 2)


def read_video(path: str, fps: float, size: Optional[int] = None, channels: int = 3,
               max_frames: Optional[int] = None) -> np.ndarray:
    """Frames of ``path`` at ``fps`` as uint8 ``(T, C, H, W)`` (resized to ``size``×``size`` when
    given). The k-th output frame is the one on screen at ``k / fps``: the last decoded frame whose
    time is not after it (frames are repeated or dropped, never blended), until the video's end.
    Raises :class:`ClipError` naming the file."""
    import av

    if fps <= 0 or channels not in (1, 3):
        raise ValueError(f"read_video: fps must be > 0 and channels 1 or 3, got {fps}, {channels}")
    out: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ClipError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            prev, prev_t, step = None, None, None
            full = lambda: max_frames is not None and len(out) >= max_frames  # noqa: E731
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                # every target time before this frame's belongs to the frame shown until now
                while prev is not None and not full() and len(out) / fps < frame.time - 1e-6:
                    out.append(prev)
                if full():
                    break
                img = frame.reformat(width=size, height=size) if size else frame
                step = frame.time - prev_t if prev_t is not None else step
                prev, prev_t = _frames_to_rgb_or_grey(img, channels), frame.time
            if prev is not None:
                # the last frame is shown as long as the one before it: the video ends at prev_t + step
                end = prev_t + (step if step else 1.0 / float(stream.average_rate or fps))
                while not full() and len(out) / fps < end - 1e-6:
                    out.append(prev)
    except ClipError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ClipError(f"{path}: cannot decode: {type(e).__name__}: {e}") from None
    if not out:
        raise ClipError(f"{path}: no decodable frame")
    return _tchw(out, channels)


def encode_clip(clip: np.ndarray, codec: str = "ffv1", fps: float = 10.0, audio: Optional[np.ndarray] = None,
                audio_rate: int = 16000) -> bytes:
    """uint8 ``(T, C, H, W)`` (C = 1 or 3, H and W even for h264) → the bytes of a video; with ``audio``
    (float mono in [-1, 1] at ``audio_rate``) a sound track too, 16-bit PCM in the same container."""
    import av

    if codec not in VIDEO_CODECS:
        raise ValueError(f"video codec {codec!r}: choose one of {', '.join(VIDEO_CODECS)}")
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[1] not in (1, 3):
        raise ValueError(f"a clip is uint8 (T, C, H, W) with C 1 or 3, got {clip.dtype} {clip.shape}")
    fmt, pix1, pix3, options = VIDEO_CODECS[codec]
    t, c, h, w = clip.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options)
        stream.width, stream.height = w, h
        stream.pix_fmt = pix1 if c == 1 else pix3
        sound = None
        if audio is not None:  # every stream is declared before the first packet is written
            sound = container.add_stream("pcm_s16le", rate=audio_rate)
            sound.layout = "mono"
        for img in clip:
            pixels = np.ascontiguousarray(img[0] if c == 1 else img.transpose(1, 2, 0))
            frame = av.VideoFrame.from_ndarray(pixels, format="gray" if c == 1 else "rgb24")
            if stream.pix_fmt != frame.format.name:
                frame = frame.reformat(format=stream.pix_fmt)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            _mux_audio(container, sound, audio, audio_rate)
    return buf.getvalue()


def _mux_audio(container, stream, audio: np.ndarray, rate: int, chunk: int = 1024) -> None:
    import av

    pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).astype(np.int16)
    for start in range(0, len(pcm), chunk):
        frame = av.AudioFrame.from_ndarray(pcm[None, start:start + chunk], format="s16", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def read_audio_track(path: str, rate: int, seconds: float) -> Optional[np.ndarray]:
    """The first ``seconds`` of a video file's sound track, mono float32 at ``rate`` (FFmpeg's resampler),
    padded with zeros if shorter; None when the file has no audio stream. Raises :class:`ClipError`."""
    import av

    n = int(round(seconds * rate))
    out: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(audio=0):
                out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                if sum(len(o) for o in out) >= n:
                    break
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.error.FFmpegError, ValueError) as e:
        raise ClipError(f"{path}: cannot decode its sound track: {type(e).__name__}: {e}") from None
    x = np.concatenate(out) if out else np.zeros(0, np.float32)
    return np.pad(x[:n], (0, max(0, n - len(x)))).astype(np.float32)


def decode_clip(data: bytes, channels: int, name: str = "clip") -> np.ndarray:
    """The bytes of :func:`encode_clip` → uint8 ``(T, C, H, W)``; :class:`ClipError` names ``name``."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = [_frames_to_rgb_or_grey(f, channels) for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise ClipError(f"{name}: cannot decode the stored clip: {type(e).__name__}: {e}") from None
    if not frames:
        raise ClipError(f"{name}: the stored clip has no frame")
    return _tchw(frames, channels)


def clip_members(clip: np.ndarray, codec: str = "png", fps: float = 10.0, view: str = "") -> dict[str, bytes]:
    """A uint8 ``(T, C, H, W)`` clip as the members of a shard sample (extensions after the key):
    ``{"000.png": ..., "001.png": ...}`` or ``{"mkv": ...}``; a ``view`` prefixes them (``cam2.000.png``)."""
    pre = f"{view}." if view else ""
    if codec == "png":
        from PIL import Image

        out = {}
        for i, frame in enumerate(clip):
            buf = io.BytesIO()
            img = Image.fromarray(frame[0] if frame.shape[0] == 1 else frame.transpose(1, 2, 0))
            img.save(buf, format="PNG", compress_level=6)
            out[f"{pre}{i:03d}.png"] = buf.getvalue()
        return out
    return {f"{pre}{EXTENSION[codec]}": encode_clip(clip, codec, fps)}


def clip_views(sample: dict) -> list[str]:
    """The views a sample's members hold: "" (the main clip) and the names of the others."""
    views = set()
    for ext in sample:
        m = _FRAME.match(ext)
        if m:
            views.add(m.group("view") or "")
        elif ext in EXTENSION.values():
            views.add("")
        elif ext.count(".") == 1 and ext.split(".")[1] in EXTENSION.values():
            views.add(ext.split(".")[0])
    return sorted(views)


def clip_from_members(sample: dict, channels: int, view: str = "", name: str = "clip") -> np.ndarray:
    """The clip (uint8 ``(T, C, H, W)``) of ``view`` in a sample's members; :class:`ClipError` names ``name``."""
    pre = f"{view}." if view else ""
    for ext in EXTENSION.values():
        if pre + ext in sample:
            return decode_clip(sample[pre + ext], channels, f"{name}.{pre}{ext}")
    frames = sorted((int(m.group("index")), ext) for ext in sample if (m := _FRAME.match(ext))
                    and (m.group("view") or "") == view)
    if not frames:
        raise ClipError(f"{name}: no {view or 'main'} clip among its members")
    if [i for i, _ in frames] != list(range(len(frames))):
        raise ClipError(f"{name}: {view or 'main'} clip frames are not 000..{len(frames) - 1:03d}")
    from PIL import Image

    out = []
    for _, ext in frames:
        try:
            img = Image.open(io.BytesIO(sample[ext])).convert("L" if channels == 1 else "RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged PNG
            raise ClipError(f"{name}.{ext}: cannot decode the stored frame: {type(e).__name__}: {e}") from None
        out.append(np.asarray(img))
    return _tchw(out, channels)
