"""Audio in the shards: decoded, checked, resampled and stored as FLAC, one utterance per sample.

Decoding is ``soundfile`` (libsndfile 1.2, bundled in its wheel: WAV, FLAC, OGG/Vorbis, Opus and MP3,
with no torch build to match; torchaudio pins another torch and moved its I/O to TorchCodec).
Resampling is ``scipy.signal.resample_poly`` (a polyphase windowed-sinc filter: exact for the
rational ratios of audio rates, e.g. 22050 → 16000 Hz = 320 / 441). The shards hold 16-bit FLAC
(lossless for 16-bit sources), mono, at the rate chosen at ingest.

A file is rejected with a reason, never a crash: unreadable (what libsndfile says), empty, or
silent (RMS below ``SILENCE_DBFS`` after resampling).
"""
from __future__ import annotations

import io
from math import gcd
from typing import Optional

import numpy as np

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
SILENCE_DBFS = -60.0   # an utterance quieter than this (RMS, dB full scale) is rejected as silent


class AudioError(ValueError):
    """An audio file that cannot become a sample; the message says why."""


def is_audio(path: str) -> bool:
    return path.lower().endswith(AUDIO_EXTS)


def info(path: str) -> tuple[int, int]:
    """(frames, sample rate) from the file's header, without decoding it."""
    import soundfile as sf

    try:
        i = sf.info(path)
    except Exception as e:  # noqa: BLE001 - libsndfile's RuntimeError/LibsndfileError: the reason is the message
        raise AudioError(f"unreadable audio: {e}") from None
    return int(i.frames), int(i.samplerate)


def read(path_or_bytes, start: int = 0, stop: Optional[int] = None) -> tuple[np.ndarray, int]:
    """Samples ``[start, stop)`` (at the file's own rate) as float32 mono (N,), and the file's rate."""
    import soundfile as sf

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    try:
        x, rate = sf.read(src, start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise AudioError(f"unreadable audio: {e}") from None
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0], int(rate)


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling of float mono audio from ``rate`` to ``target`` Hz."""
    if rate == target:
        return x
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def dbfs(x: np.ndarray) -> float:
    """RMS level in dB full scale (−inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def check(x: np.ndarray, rate: int) -> None:
    """Reject empty and silent audio."""
    if len(x) == 0:
        raise AudioError("empty audio (0 samples)")
    level = dbfs(x)
    if level < SILENCE_DBFS:
        raise AudioError(f"silent: RMS {level:.0f} dBFS over {len(x) / rate:.2f} s (threshold {SILENCE_DBFS:.0f} dBFS)")


def encode_flac(x: np.ndarray, rate: int) -> bytes:
    """float mono (N,) in [-1, 1] → 16-bit FLAC bytes (clipped to full scale)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Centre an utterance in ``n`` samples: zeros on both sides if shorter, the middle ``n`` if longer."""
    if len(x) == n:
        return x
    if len(x) > n:
        s = (len(x) - n) // 2
        return x[s:s + n]
    out = np.zeros(n, dtype=np.float32)
    s = (n - len(x)) // 2
    out[s:s + len(x)] = x
    return out


def segments(frames: int, rate: int, seconds: float) -> list[tuple[int, int]]:
    """Where a file of ``frames`` samples at ``rate`` is cut into ``seconds``-long segments:
    ``[(start, stop), ...]`` at the file's rate. A file up to 1.5 segments long is one segment (the
    loader centres or crops it); a longer one is cut into whole segments, and a remainder of at
    least half a segment is kept as the last one (padded by the loader)."""
    seg = max(1, int(round(seconds * rate)))
    if frames <= 1.5 * seg:
        return [(0, frames)]
    out = [(s, s + seg) for s in range(0, frames - seg + 1, seg)]
    if frames - out[-1][1] >= seg // 2:
        out.append((out[-1][1], frames))
    return out
