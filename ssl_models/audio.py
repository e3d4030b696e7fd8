"""Audio on tensors: the log-mel front end and batched waveform augmentation, on the batch's device.

A waveform batch is float (B, L) in [-1, 1] at one sample rate (16 kHz unless the ingest chose
another; ``SAMPLE_RATE``). Runs store utterances as (B, 1, L) (one channel, like a grey image);
:func:`waveforms` takes either.

Front end (:class:`LogMel`): a 25 ms Hann window every 10 ms (400 / 160 samples at 16 kHz), a
512-point FFT, power spectrum, ``n_mels`` triangular filters on the HTK mel scale
(``mel = 2595 · log10(1 + f / 700)``), ``log(x + 1e-6)``. No centre padding: frame ``t`` covers
samples ``[160 t, 160 t + 400)``, so it lines up with the conv encoder's frame ``t``
(``ssl_models/audio_encoder.py``, one frame per 160 samples too).

Augmentation (:func:`augment_waveforms`): gain, additive white noise at a drawn SNR, a time
shift and a speed change (resampling by linear interpolation, which moves pitch with it), each
drawn per utterance from the ``torch.Generator`` (``ssl_models.rng``'s convention) and applied
to the whole batch in a few tensor ops; every output keeps the input's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ssl_models.rng import coin, uniform

SAMPLE_RATE = 16000
HOP = 160      # 10 ms at 16 kHz: one frame of the log-mel and of the conv encoder
WINDOW = 400   # 25 ms


def waveforms(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, L) or (B, L) → float32 (B, L); int16 samples are scaled to [-1, 1]."""
    if x.ndim == 3:
        if x.shape[1] != 1:
            raise ValueError(f"audio batches are mono, (B, 1, L); got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 2:
        raise ValueError(f"expected a waveform batch (B, L) or (B, 1, L), got shape {tuple(x.shape)}")
    if x.dtype == torch.int16:
        return x.float() / 32768.0
    return x.float()


def hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0) if not torch.is_tensor(f) else 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int = 80, n_fft: int = 512, sample_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                   f_max: Optional[float] = None) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, peak 1 (no area normalisation).

    Shape: → (n_fft // 2 + 1, n_mels): ``power (…, F) @ fb`` gives the mel energies.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    lo, mid, hi = pts[:-2], pts[1:-1], pts[2:]                        # (n_mels,) each
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()     # (F, n_mels)


class LogMel(nn.Module):
    """Waveform → log-mel spectrogram (see the module docstring); no trainable parameters.

    Shape: x (B, L) float → (B, T, n_mels), T = 1 + (L − 400) // 160.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = 512, window: int = WINDOW,
                 hop: int = HOP):
        super().__init__()
        self.n_mels, self.n_fft, self.window, self.hop = n_mels, n_fft, window, hop
        self.register_buffer("fb", mel_filterbank(n_mels, n_fft, sample_rate), persistent=False)
        self.register_buffer("hann", torch.hann_window(window, periodic=True), persistent=False)

    def frames(self, length: int) -> int:
        return max(0, 1 + (length - self.window) // self.hop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = waveforms(x)
        if x.shape[1] < self.window:
            raise ValueError(f"audio of {x.shape[1]} samples is shorter than one {self.window}-sample window")
        pad = (self.n_fft - self.window) // 2  # torch centres the window in the FFT frame: frame t = [160 t, 160 t + 400)
        with torch.autocast(x.device.type, enabled=False):  # the FFT and the log stay in fp32
            spec = torch.stft(F.pad(x.float(), (pad, self.n_fft - self.window - pad)), self.n_fft, self.hop, self.window, self.hann, center=False,
                              return_complex=True)            # (B, F, T)
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), self.fb)  # (B, T, n_mels)
            return torch.log(mel + 1e-6)


def log_mel_stats(x: torch.Tensor, n_mels: int = 80, spans: int = 1) -> torch.Tensor:
    """The log-mel baseline's utterance vector: the mean and standard deviation of each band over each
    of ``spans`` equal spans of time (1: the whole utterance), concatenated in time order.

    Shape: x (B, 1, L) or (B, L) → (B, 2 · n_mels · spans).
    """
    m = _log_mel(n_mels, x.device)(x)                                    # (B, T, n_mels)
    chunks = torch.tensor_split(m, spans, dim=1)
    return torch.cat([s for c in chunks for s in (c.mean(1), c.std(1))], dim=1)


@lru_cache(maxsize=8)
def _log_mel(n_mels: int, device: torch.device) -> LogMel:
    """One front end per size and device: its filterbank is built once, not for every batch."""
    return LogMel(n_mels).to(device)


@dataclass(frozen=True)
class AudioAugment:
    """What :func:`augment_waveforms` draws per utterance (every op can be switched off with 0 / None).

    gain_db: gain uniform in ±gain_db dB; noise_p: probability of added white noise, at an SNR
    uniform in ``snr_db`` (dB, relative to the utterance's own power); shift: a circular-free time
    shift of up to ``shift`` × L samples either way (zeros come in); speed: a factor uniform in
    ``speed`` (1.1 plays 10 % faster and 10 % higher), applied with probability ``speed_p``.
    """

    gain_db: float = 6.0
    noise_p: float = 0.5
    snr_db: tuple[float, float] = (10.0, 30.0)
    shift: float = 0.1
    speed: tuple[float, float] = (0.9, 1.1)
    speed_p: float = 0.5


def augment_waveforms(x: torch.Tensor, cfg: AudioAugment = AudioAugment(),
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gain, speed, time shift, noise (in that order), per utterance, batched.

    Shape: x (B, L) or (B, 1, L) → float32 (B, L) on x's device.
    """
    x = waveforms(x)
    b, n = x.shape
    dev = x.device
    if cfg.speed_p > 0 and cfg.speed != (1.0, 1.0):
        rate = uniform(b, cfg.speed[0], cfg.speed[1], generator)
        rate = torch.where(coin(b, cfg.speed_p, generator), rate, torch.ones(b)).to(dev)
        x = resample_linear(x, rate)
    if cfg.shift > 0:
        s = torch.round(uniform(b, -cfg.shift, cfg.shift, generator) * n).long().to(dev)
        idx = torch.arange(n, device=dev)[None] - s[:, None]               # output t reads input t − s
        valid = (idx >= 0) & (idx < n)
        x = torch.gather(x, 1, idx.clamp(0, n - 1)) * valid
    if cfg.gain_db > 0:
        g = 10.0 ** (uniform(b, -cfg.gain_db, cfg.gain_db, generator) / 20.0)
        x = x * g.to(dev, x.dtype)[:, None]
    if cfg.noise_p > 0:
        snr = uniform(b, cfg.snr_db[0], cfg.snr_db[1], generator).to(dev)
        on = coin(b, cfg.noise_p, generator).to(dev)
        power = x.square().mean(1).clamp_min(1e-10)
        scale = torch.sqrt(power / 10.0 ** (snr / 10.0)) * on
        noise = torch.randn((b, n), generator=generator, device=generator.device if generator is not None else "cpu")
        x = x + noise.to(dev) * scale[:, None]
    return x


def resample_linear(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Play each utterance ``rate`` times as fast (linear interpolation), keeping the length: a faster
    one ends in zeros, a slower one is cut. Shape: x (B, L), rate (B,) → (B, L)."""
    b, n = x.shape
    pos = torch.arange(n, device=x.device, dtype=torch.float32)[None] * rate[:, None].float()
    lo = pos.floor().long()
    frac = (pos - lo).to(x.dtype)
    valid = (lo < n - 1).to(x.dtype)
    lo = lo.clamp(0, n - 2)
    a, c = torch.gather(x, 1, lo), torch.gather(x, 1, lo + 1)
    return (a + (c - a) * frac) * valid


__all__ = ["SAMPLE_RATE", "HOP", "WINDOW", "waveforms", "mel_filterbank", "LogMel", "log_mel_stats", "AudioAugment",
           "augment_waveforms", "resample_linear"]
