"""PASE: one speech encoder, several small workers that each solve a self-supervised task on its frames."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ssl_models.audio import HOP, SAMPLE_RATE, WINDOW, AudioAugment, LogMel, augment_waveforms, waveforms
from ssl_models.objectives.base import AudioObjective
from ssl_models.rng import coin, rand, randint

REGRESSION_WORKERS = ("waveform", "log_power", "mfcc", "prosody")
BINARY_WORKERS = ("local_info_max", "global_info_max")
WORKERS = REGRESSION_WORKERS + BINARY_WORKERS

N_FFT = 512
WAVE_OFFSET = (WINDOW - HOP) // 2   # the waveform target of frame t: samples [160 t + 120, 160 t + 280), the
                                    # middle of the frame's 400-sample window
F0_RANGE = (70.0, 400.0)            # Hz: the pitch lags searched, sr / 400 … sr / 70 samples
VOICING_THRESHOLD = 0.6             # normalised autocorrelation peak above which a frame counts as periodic
SILENCE_RATIO = 1e-3                # a frame more than 30 dB below the utterance's loudest frame is silent
ENERGY_FLOOR = 1e-8                 # mean square below which a frame is silent whatever the utterance


# --------------------------------------------------------------------------- targets (from the clean waveform)

def frame_signal(x: torch.Tensor, window: int = WINDOW, hop: int = HOP) -> torch.Tensor:
    """The analysis frames, frame t = samples [hop·t, hop·t + window) (no padding, as ``LogMel``).

    Shape: x (B, L) → (B, T, window), T = 1 + (L − window) // hop.
    """
    return x.unfold(1, window, hop)


def power_spectrum(x: torch.Tensor, n_fft: int = N_FFT) -> torch.Tensor:
    """|STFT|² with ``LogMel``'s framing: a periodic Hann window of 400 samples centred in a 512-point
    FFT, one frame per 160 samples, no centre padding. Shape: x (B, L) → (B, T, n_fft // 2 + 1), fp32."""
    pad = (n_fft - WINDOW) // 2
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        hann = torch.hann_window(WINDOW, periodic=True, device=x.device)
        spec = torch.stft(F.pad(x, (pad, n_fft - WINDOW - pad)), n_fft, HOP, WINDOW, hann, center=False,
                          return_complex=True)                                    # (B, F, T)
        return (spec.real.square() + spec.imag.square()).transpose(1, 2)


def log_power_spectrum(x: torch.Tensor, n_fft: int = N_FFT) -> torch.Tensor:
    """log(|STFT|² + 1e-6). Shape: x (B, L) → (B, T, n_fft // 2 + 1)."""
    return torch.log(power_spectrum(x, n_fft) + 1e-6)


def dct_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Orthonormal DCT-II as a matrix: ``y = x @ D`` gives the first ``n_out`` coefficients,
    y_k = s_k Σ_m x_m cos(π k (m + ½) / M), s_0 = √(1/M), s_k = √(2/M) (scipy's ``dct(norm="ortho")``).

    Shape: → (n_in, n_out) float32.
    """
    if not 1 <= n_out <= n_in:
        raise ValueError(f"a DCT of {n_in} inputs has 1 … {n_in} coefficients, asked for {n_out}")
    m = torch.arange(n_in, dtype=torch.float64)[:, None]
    k = torch.arange(n_out, dtype=torch.float64)[None]
    d = torch.cos(math.pi * k * (m + 0.5) / n_in) * math.sqrt(2.0 / n_in)
    d[:, 0] = math.sqrt(1.0 / n_in)
    return d.float()


def zero_crossing_rate(frames: torch.Tensor) -> torch.Tensor:
    """Share of the window's consecutive sample pairs whose product is negative (a zero sample
    crosses nothing). Shape: (B, T, N) → (B, T)."""
    return ((frames[..., 1:] * frames[..., :-1]) < 0).float().mean(-1)


def normalised_autocorrelation(frames: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
    """r(k) = Σ_{n<N−k} f_n f_{n+k} / √(Σ_{n<N−k} f_n² · Σ_{n≥k} f_n²) of each mean-removed frame f,
    in [−1, 1] (1 for a sine whose period is k); 0 for a silent frame. Lags ≥ 1.

    Shape: frames (B, T, N), lags (K,) long → (B, T, K).
    """
    n = frames.shape[-1]
    f = frames - frames.mean(-1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()                                          # no circular wrap-around
    spec = torch.fft.rfft(f, n=size)
    ac = torch.fft.irfft(spec.real.square() + spec.imag.square(), n=size)[..., :n]  # Σ_n f_n f_{n+k}
    cs = torch.cumsum(f.square(), -1)                                              # cs[i] = Σ_{n≤i} f_n²
    head = cs[..., n - 1 - lags]                                                   # Σ_{n<N−k} f_n²
    tail = cs[..., -1:] - cs[..., lags - 1]                                        # Σ_{n≥k} f_n²
    return ac[..., lags] / torch.sqrt(head * tail + 1e-12)


def prosody_features(x: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Four prosodic features per frame (frame t = samples [160 t, 160 t + 400)):

    0. log energy, log(mean(x²) + 1e-8);
    1. zero-crossing rate (:func:`zero_crossing_rate`);
    2. voiced (0/1): the frame's normalised autocorrelation (:func:`normalised_autocorrelation`) peaks
       at ≥ 0.6 for a lag in [sr/400, sr/70] (70 – 400 Hz) and the frame is not silent (its energy is
       within 30 dB of the utterance's loudest frame and above 1e-8);
    3. log F0, interpolated: log(sr / lag) in voiced frames, with lag the smallest local maximum of r
       that reaches 0.9 of the peak (which keeps a sine at 300 Hz from reading as 150 or 100 Hz);
       linearly interpolated across unvoiced frames, held flat before the first and after the last
       voiced frame (PASE's "interpolated logarithm of the fundamental frequency"); log of the range's
       geometric middle in an utterance with no voiced frame.

    Shape: x (B, L) → (B, T, 4) fp32.
    """
    with torch.autocast(x.device.type, enabled=False):
        frames = frame_signal(x.float())                                           # (B, T, N)
        energy = frames.square().mean(-1)                                          # (B, T)
        log_energy = torch.log(energy + ENERGY_FLOOR)
        zcr = zero_crossing_rate(frames)
        lo, hi = int(math.ceil(sample_rate / F0_RANGE[1])), int(math.floor(sample_rate / F0_RANGE[0]))
        lags = torch.arange(lo - 1, hi + 2, device=x.device)                       # one lag either side for peaks
        r = normalised_autocorrelation(frames, lags)                               # (B, T, K + 2)
        inner = r[..., 1:-1]                                                       # lags lo … hi
        peak = inner.amax(-1)                                                      # (B, T)
        local_max = (inner >= r[..., :-2]) & (inner >= r[..., 2:]) & (inner >= 0.9 * peak[..., None])
        first = torch.where(local_max.any(-1), local_max.int().argmax(-1), inner.argmax(-1))
        log_f0 = math.log(sample_rate) - torch.log((first + lo).float())
        loud = (energy >= SILENCE_RATIO * energy.amax(1, keepdim=True)) & (energy > ENERGY_FLOOR)
        voiced = (peak >= VOICING_THRESHOLD) & loud
        log_f0 = interpolate_unvoiced(log_f0, voiced, math.log(sample_rate / math.sqrt(lo * hi)))
        return torch.stack([log_energy, zcr, voiced.float(), log_f0], -1)


def interpolate_unvoiced(values: torch.Tensor, voiced: torch.Tensor, default: float) -> torch.Tensor:
    """Per row: keep ``values`` where ``voiced``, interpolate linearly between voiced frames, hold the
    first / last voiced value outside them (numpy's ``interp``); ``default`` in a row without voiced
    frames. Shape: values (B, T), voiced (B, T) bool → (B, T)."""
    b, t = values.shape
    pos = torch.arange(t, device=values.device).expand(b, t)
    prev = torch.cummax(torch.where(voiced, pos, -1), 1).values                   # last voiced ≤ t, −1 if none
    nxt = torch.cummin(torch.where(voiced, pos, t).flip(1), 1).values.flip(1)     # first voiced ≥ t, T if none
    v_prev = values.gather(1, prev.clamp(min=0))
    v_next = values.gather(1, nxt.clamp(max=t - 1))
    span = (nxt - prev).clamp(min=1).to(values.dtype)
    between = v_prev + (v_next - v_prev) * (pos - prev).to(values.dtype) / span
    out = torch.where((prev >= 0) & (nxt < t), torch.where(nxt == prev, values, between),
                      torch.where(prev >= 0, v_prev, torch.where(nxt < t, v_next, torch.full_like(values, default))))
    return out


def waveform_target(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The 160 samples in the middle of each frame's window, [160 t + 120, 160 t + 280): consecutive,
    non-overlapping, and inside the conv frame's receptive field [160 t, 160 t + 465).

    Shape: x (B, L) → (B, T, 160).
    """
    seg = x[:, WAVE_OFFSET:WAVE_OFFSET + frames * HOP]
    if seg.shape[1] != frames * HOP:
        raise ValueError(f"{x.shape[1]} samples hold no {frames} frames")
    return seg.reshape(x.shape[0], frames, HOP)


def standardise(y: torch.Tensor, min_std: float = 1e-3) -> torch.Tensor:
    """Each feature to zero mean and unit variance over the batch's frames; the scale is floored at
    ``min_std`` (a constant feature → 0; a spectral bin at the log floor, which varies by rounding
    only, is not blown up into unit-variance noise). Shape: (B, T, F) → (B, T, F)."""
    mean = y.mean((0, 1), keepdim=True)
    std = y.std((0, 1), keepdim=True, unbiased=False)
    return (y - mean) / std.clamp_min(min_std)


def _mlp(d_in: int, width: int, d_out: int) -> nn.Sequential:
    """A worker: one hidden layer with PReLU (PASE's regression and binary workers).
    Shape: (…, d_in) → (…, d_out)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.PReLU(), nn.Linear(width, d_out))


# --------------------------------------------------------------------------- the objective

class PASE(AudioObjective):
    """PASE, a problem-agnostic speech encoder trained by several workers (Pascual, Ravanelli, Serrà,
    Bonafonte & Bengio 2019, "Learning Problem-agnostic Speech Representations from Multiple
    Self-supervised Tasks"; the distorted input of PASE+, Ravanelli et al. 2020).

    One encoder f gives frames h = f(x̃) (B, T, D), one per 160 samples (``backbone.encode``; the paper's
    encoder is SincNet then convolutions with 10 ms frames; ours is ``audio_conv``'s strided conv stack
    by default). Small workers, each on h, each with its own loss:

    * regression workers, w_k an MLP (one hidden layer of ``head_width``, PReLU) applied per frame:
      - ``waveform``: the 160 clean samples in the middle of frame t's 25 ms window, L1:
        L = mean |w(h_t) − x[160 t + 120 : 160 t + 280]| (the paper decodes with transposed convolutions;
        here a linear decoder, 160 samples per frame);
      - ``log_power``: the 257-bin log power spectrum (512-point FFT, 400-sample Hann, hop 160), MSE;
      - ``mfcc``: ``n_mfcc`` MFCCs, the orthonormal DCT-II of ``LogMel(n_mels)``, MSE;
      - ``prosody``: log energy, zero-crossing rate, voiced flag, interpolated log F0
        (:func:`prosody_features`), MSE;
      the spectral and prosodic targets standardised per feature over the batch's frames (the paper uses
      the training set's statistics; the batch's estimate them without a pass over the data);
    * binary workers, a discriminator d([u; v]) (MLP on the concatenated pair → a logit), binary
      cross-entropy with one negative per positive: L = −½ mean[log σ(d(a, p)) + log(1 − σ(d(a, n)))]:
      - ``local_info_max`` (LIM): a = h_{b,t}, p = h_{b,t'} (another frame of the same utterance),
        n = h_{b',t''} (a frame of another utterance b' ≠ b of the batch); ``lim_pairs`` anchors per
        utterance, all drawn among its non-silent frames (within 30 dB of its loudest frame: the
        spoken-digit clips are half silence, and silence from two utterances would look alike);
      - ``global_info_max`` (GIM): a, p the means of h over two non-overlapping chunks of
        ``chunk_frames`` frames of utterance b, n the mean over a chunk of another utterance b'.

    L = Σ_k λ_k L_k over the chosen ``workers`` (λ_k = ``weights[k]``, default 1); each L_k is logged
    as ``loss_<worker>``, with ``lim_accuracy`` / ``gim_accuracy`` for the discriminators. Sequence
    predictive coding (PASE+) is not implemented.

    Distortions (PASE+): the targets come from the clean waveform, the encoder sees a distorted one.
    ``make_views`` draws a gain (±``gain_db``) and applies it to both (a data augmentation: a level
    the encoder cannot see would be noise in the energy targets), then adds white noise at an SNR in
    ``snr_db`` with probability ``noise_p`` to the encoder's copy only. No time shift and no speed
    change: both would move the input against its frame-aligned targets.

    CPU defaults differ from the paper: head width 128 (256), GIM chunks of 32 frames (0.32 s; the
    paper's chunks are longer, the clips here are 1 s), encoder width from the backbone.

    Shapes: utterances (B, 1, L) → views {"clean", "noisy": (B, L); LIM indices (B, P); GIM indices
    (B,)}; h (B, T, D), T = 1 + (L − 400) // 160; targets (B, T, F) with F = 160, 257, n_mfcc, 4.
    """

    name = "pase"
    contrastive = False

    def __init__(self, backbone: nn.Module, image_size: int = 28, in_channels: Optional[int] = None,
                 workers: Union[Sequence[str], str] = WORKERS, weights: Optional[dict[str, float]] = None,
                 head_width: int = 128, n_mels: int = 40, n_mfcc: int = 20, lim_pairs: int = 4,
                 chunk_frames: int = 32, gain_db: float = 6.0, noise_p: float = 0.5,
                 snr_db: tuple[float, float] = (10.0, 30.0)):
        super().__init__(backbone, image_size, in_channels)
        names = [workers] if isinstance(workers, str) else list(workers)
        if not names:
            raise ValueError(f"pase needs at least one worker; choose among {list(WORKERS)}")
        unknown = [w for w in names if w not in WORKERS]
        if unknown:
            raise ValueError(f"pase: unknown worker(s) {unknown}; choose among {list(WORKERS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"pase: a worker is named twice in {names}")
        weights = dict(weights or {})
        bad = {k: v for k, v in weights.items() if k not in WORKERS or not float(v) >= 0}
        if bad:
            raise ValueError(f"pase: weights must name workers among {list(WORKERS)} and be >= 0; got {bad}")
        if head_width < 1 or lim_pairs < 1 or chunk_frames < 1 or not 1 <= n_mfcc <= n_mels:
            raise ValueError(f"pase: head_width, lim_pairs, chunk_frames >= 1 and 1 <= n_mfcc <= n_mels; got "
                             f"{head_width}, {lim_pairs}, {chunk_frames}, {n_mfcc}, {n_mels}")
        if gain_db < 0 or not 0 <= noise_p <= 1 or len(snr_db) != 2 or snr_db[0] > snr_db[1]:
            raise ValueError(f"pase: gain_db >= 0, noise_p in [0, 1], snr_db (low, high); got {gain_db}, "
                             f"{noise_p}, {snr_db}")
        self.workers = tuple(names)
        self.weights = {w: float(weights.get(w, 1.0)) for w in self.workers}
        self.lim_pairs, self.chunk_frames = int(lim_pairs), int(chunk_frames)
        self.gain = AudioAugment(gain_db=float(gain_db), noise_p=0.0, shift=0.0, speed_p=0.0)
        self.noise = AudioAugment(gain_db=0.0, noise_p=float(noise_p), snr_db=tuple(map(float, snr_db)), shift=0.0,
                                  speed_p=0.0)
        self.logmel = LogMel(n_mels)
        self.register_buffer("dct", dct_matrix(n_mels, n_mfcc), persistent=False)
        d = backbone.feature_dim
        out = {"waveform": HOP, "log_power": N_FFT // 2 + 1, "mfcc": n_mfcc, "prosody": 4}
        self.heads = nn.ModuleDict({w: _mlp(d, head_width, out[w]) for w in self.workers if w in out})
        self.discriminators = nn.ModuleDict({w: _mlp(2 * d, head_width, 1) for w in self.workers
                                             if w in BINARY_WORKERS})

    # ------------------------------------------------------------------ views

    def _frames(self, length: int) -> int:
        frames = getattr(self.backbone, "frames", None)
        return frames(length) if frames is not None else max(0, 1 + (length - WINDOW) // HOP)

    @staticmethod
    def _other_utterance(shape, b: int, generator, device) -> torch.Tensor:
        """For row i, an utterance index ≠ i, uniform among the others. Shape: (B, …)."""
        rows = torch.arange(b, device=device).view(-1, *([1] * (len(shape) - 1)))
        return (rows + randint(1, b, shape, generator, device)) % b

    def lim_indices(self, clean: torch.Tensor, generator=None) -> dict[str, torch.Tensor]:
        """Anchor and positive frames of each utterance (distinct where it has two non-silent frames),
        the negative's utterance (never the anchor's) and frame; every frame non-silent.

        Shape: clean (B, L) → {"lim_anchor", "lim_positive", "lim_negative_utt", "lim_negative": (B, P)} long.
        """
        b, dev, p = clean.shape[0], clean.device, self.lim_pairs
        energy = frame_signal(clean.float()).square().mean(-1)                       # (B, T)
        active = energy >= SILENCE_RATIO * energy.amax(1, keepdim=True)              # ≥ 1 per row (its loudest)
        count = torch.cumsum(active.long(), 1)                                       # (B, T)
        n = count[:, -1:]                                                            # (B, 1) active frames

        def rank(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:                # uniform in 0 … m − 1
            return torch.minimum((u * m).long(), (m - 1).clamp(min=0))

        def frame_of(counts: torch.Tensor, r: torch.Tensor) -> torch.Tensor:       # the active frame of rank r:
            return torch.searchsorted(counts, r, right=True)                         # the first with count > r

        ua, up, un = (rand((b, p), generator, dev) for _ in range(3))
        ra = rank(ua, n)                                                             # (B, P) rank among active
        rp = rank(up, n - 1)
        rp = torch.where(n > 1, rp + (rp >= ra).long(), ra)                          # skip the anchor's rank
        anchor, positive = frame_of(count, ra), frame_of(count, rp)
        neg_utt = self._other_utterance((b, p), b, generator, dev)
        negative = frame_of(count[neg_utt], rank(un, n[neg_utt, 0])[..., None])[..., 0]  # counts (B, P, T)
        return {"lim_anchor": anchor, "lim_positive": positive, "lim_negative_utt": neg_utt, "lim_negative": negative}

    def gim_indices(self, b: int, t: int, generator=None, device=None) -> dict[str, torch.Tensor]:
        """Start frames of two non-overlapping chunks of each utterance (anchor, positive, in random
        order) and of a chunk of another utterance (negative).

        Shape: → {"gim_anchor", "gim_positive", "gim_negative_utt", "gim_negative": (B,)} long.
        """
        c = self.chunk_frames
        if t < 2 * c:
            raise ValueError(f"pase: global_info_max needs two chunks of chunk_frames={c} frames per utterance; "
                             f"utterances of {t} frames hold {t // 2} at most")
        u, v = randint(0, t - 2 * c + 1, (b,), generator, device), randint(0, t - 2 * c + 1, (b,), generator, device)
        first, second = torch.minimum(u, v), torch.maximum(u, v) + c
        swap = coin(b, 0.5, generator, device)
        neg_utt = self._other_utterance((b,), b, generator, device)
        negative = randint(0, t - c + 1, (b,), generator, device)
        return {"gim_anchor": torch.where(swap, second, first), "gim_positive": torch.where(swap, first, second),
                "gim_negative_utt": neg_utt, "gim_negative": negative}

    def make_views(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Clean and distorted copies, and the binary workers' frame indices.

        Shape: images (B, 1, L) or (B, L) float in [-1, 1] → {"clean", "noisy": (B, L) float32;
        "lim_*": (B, lim_pairs) long; "gim_*": (B,) long} on the images' device.
        """
        x = waveforms(images)
        b, length = x.shape
        t = self._frames(length)
        if t < 1:
            raise ValueError(f"pase: utterances of {length} samples are shorter than one {WINDOW}-sample frame")
        if b < 2 and any(w in BINARY_WORKERS for w in self.workers):
            raise ValueError("pase: the info-max workers take negatives from another utterance; batch size >= 2")
        clean = augment_waveforms(x, self.gain, generator)
        noisy = augment_waveforms(clean, self.noise, generator)
        views = {"clean": clean, "noisy": noisy}
        if "local_info_max" in self.workers:
            views.update(self.lim_indices(clean, generator))
        if "global_info_max" in self.workers:
            views.update(self.gim_indices(b, t, generator, x.device))
        return views

    # ------------------------------------------------------------------ targets and losses

    @torch.no_grad()
    def targets(self, clean: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """The regression workers' targets, fp32: waveform raw, the others standardised.

        Shape: clean (B, L) → {worker: (B, T, F)}.
        """
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(clean.device.type, enabled=False):
            clean = clean.float()
            if "waveform" in self.workers:
                out["waveform"] = waveform_target(clean, frames)
            if "log_power" in self.workers or "mfcc" in self.workers:
                power = power_spectrum(clean)[:, :frames]
                if "log_power" in self.workers:
                    out["log_power"] = standardise(torch.log(power + 1e-6))
                if "mfcc" in self.workers:
                    log_mel = torch.log(torch.matmul(power, self.logmel.fb) + 1e-6)   # = self.logmel(clean)
                    out["mfcc"] = standardise(torch.matmul(log_mel, self.dct))
            if "prosody" in self.workers:
                out["prosody"] = standardise(prosody_features(clean)[:, :frames])
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The frames the workers read. Shape: (B, L) → (B, T, D)."""
        enc = getattr(self.backbone, "encode", None)
        return enc(x) if enc is not None else self.backbone.context(self.backbone.local(x))

    @staticmethod
    def _binary(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE over as many positives as negatives, and the share of pairs on the right side of 0."""
        pos, neg = logit_pos.float().reshape(-1), logit_neg.float().reshape(-1)
        loss = 0.5 * (F.softplus(-pos).mean() + F.softplus(neg).mean())         # −log σ(s), −log(1 − σ(s))
        acc = 0.5 * ((pos > 0).float().mean() + (neg < 0).float().mean())
        return loss, acc.detach()

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Shape: views["noisy"], views["clean"] (B, L) (+ the indices of :meth:`make_views`) →
        {"loss": (), "loss_<worker>": () per worker, "lim_accuracy", "gim_accuracy": () where on}."""
        h = self.encode(views["noisy"])                                               # (B, T, D)
        b, t, _ = h.shape
        targets = self.targets(views["clean"], t)
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, Any] = {}
        for w, head in self.heads.items():
            pred = head(h)
            with torch.autocast(h.device.type, enabled=False):
                err = pred.float() - targets[w]
                losses[w] = err.abs().mean() if w == "waveform" else err.square().mean()
        if "local_info_max" in self.workers:
            rows = torch.arange(b, device=h.device)[:, None]
            a = h[rows, views["lim_anchor"]]                                         # (B, P, D)
            p = h[rows, views["lim_positive"]]
            n = h[views["lim_negative_utt"], views["lim_negative"]]
            d = self.discriminators["local_info_max"]
            losses["local_info_max"], logs["lim_accuracy"] = self._binary(d(torch.cat([a, p], -1)),
                                                                          d(torch.cat([a, n], -1)))
        if "global_info_max" in self.workers:
            span = torch.arange(self.chunk_frames, device=h.device)
            rows = torch.arange(b, device=h.device)[:, None]

            def chunk(utt: torch.Tensor, start: torch.Tensor) -> torch.Tensor:     # (B, D) mean over a chunk
                return h[utt, start[:, None] + span].mean(1)

            a = chunk(rows, views["gim_anchor"])
            p = chunk(rows, views["gim_positive"])
            n = chunk(views["gim_negative_utt"][:, None], views["gim_negative"])
            d = self.discriminators["global_info_max"]
            losses["global_info_max"], logs["gim_accuracy"] = self._binary(d(torch.cat([a, p], -1)),
                                                                           d(torch.cat([a, n], -1)))
        total = sum(self.weights[w] * losses[w] for w in self.workers)
        out: dict[str, Any] = {"loss": total}
        out.update({f"loss_{w}": losses[w].detach() for w in self.workers})
        out.update(logs)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, workers={list(self.workers)}, weights={self.weights}"


__all__ = ["PASE", "WORKERS", "REGRESSION_WORKERS", "BINARY_WORKERS", "dct_matrix", "power_spectrum",
           "log_power_spectrum", "prosody_features", "interpolate_unvoiced", "normalised_autocorrelation",
           "zero_crossing_rate", "waveform_target", "standardise", "frame_signal"]
