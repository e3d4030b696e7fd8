"""PASE (Pascual et al. 2019): each worker's target against a plain reference (numpy, scipy, loops), the
info-max pairs (positives from the anchor's utterance, negatives from another), the losses against
per-frame / per-pair loops, workers alone and together, refusals, gradients, bf16, and learning on
tiny synthetic audio."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
import yaml

from ssl_models import backbones
from ssl_models.audio import LogMel
from ssl_models.objectives.pase import (PASE, WORKERS, dct_matrix, log_power_spectrum, prosody_features, standardise,
                                        waveform_target)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SR = 16000
L = 4000                      # 23 frames
T = 1 + (L - 400) // 160


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pase(seed: int = 0, dim: int = 16, **kw) -> PASE:
    torch.manual_seed(seed)
    kw = {"head_width": 16, "chunk_frames": 6, "lim_pairs": 3, **kw}
    return PASE(backbones.build("audio_conv", in_channels=1, dim=dim), **kw)


def _tones(b: int = 6, length: int = L, seed: int = 0) -> torch.Tensor:
    """Utterances (B, 1, L): two or three harmonics of a per-utterance pitch under a smooth envelope,
    some silence at the ends."""
    g = np.random.default_rng(seed)
    t = np.arange(length) / SR
    out = np.zeros((b, 1, length), np.float32)
    for i in range(b):
        f0 = g.uniform(90, 300)
        x = sum(g.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + g.uniform(0, 6.3)) for k in (1, 2, 3))
        start, stop = g.integers(0, length // 4), g.integers(3 * length // 4, length)
        env = np.zeros(length)
        env[start:stop] = np.hanning(stop - start)
        out[i, 0] = 0.4 * x * env / np.abs(x).max()
    return torch.from_numpy(out)


def _backbone_trained(obj) -> bool:
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    return bool(grads) and sum(float(x.abs().sum()) for x in grads) > 0


# --------------------------------------------------------------------------- interface

def test_class_is_documented_and_predictive():
    assert PASE.name == "pase" and PASE.contrastive is False and PASE.modality == "audio"
    assert re.search(r"\b2019\b", PASE.__doc__) and "Pascual" in PASE.__doc__ and "Shape" in PASE.__doc__
    assert "Shape:" in PASE.make_views.__doc__ and "Shape:" in PASE.forward.__doc__
    params = inspect.signature(PASE.__init__).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert tuple(params["workers"].default) == WORKERS


def test_config_names_only_real_parameters():
    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "spoken_digits_pase.yaml").read_text())
    assert cfg["objective"] == "pase" and cfg["backbone"] in backbones.BACKBONES
    params = inspect.signature(PASE.__init__).parameters
    assert set(cfg["objective_params"]) <= set(params)
    obj = PASE(backbones.build(cfg["backbone"], in_channels=1, **cfg["backbone_params"]), **cfg["objective_params"])
    assert set(obj.workers) == set(WORKERS)


def test_views_shapes_dtypes_and_seeded():
    obj = _pase()
    x = _tones(4)
    v = obj.make_views(x, generator=_gen(3))
    assert v["clean"].shape == v["noisy"].shape == (4, L) and v["clean"].dtype == v["noisy"].dtype == torch.float32
    for k in ("lim_anchor", "lim_positive", "lim_negative_utt", "lim_negative"):
        assert v[k].shape == (4, 3) and v[k].dtype == torch.long
    for k in ("gim_anchor", "gim_positive", "gim_negative_utt", "gim_negative"):
        assert v[k].shape == (4,) and v[k].dtype == torch.long
    again = obj.make_views(x, generator=_gen(3))
    assert all(torch.equal(v[k], again[k]) for k in v)
    other = obj.make_views(x, generator=_gen(4))
    assert not torch.equal(v["clean"], other["clean"])


def test_views_keep_targets_aligned_clean_is_gained_and_noisy_is_clean_plus_noise():
    """Gain hits both copies (one factor per utterance, no shift, no speed change); the noise only the
    encoder's copy, at the drawn SNR."""
    obj = _pase(gain_db=6.0, noise_p=1.0, snr_db=(20.0, 20.0))
    x = _tones(4)[:, 0]
    v = obj.make_views(x, generator=_gen(0))
    ratio = v["clean"] / torch.where(x.abs() > 1e-3, x, torch.nan)
    per_row = torch.nanmean(ratio, 1, keepdim=True)
    assert torch.allclose(torch.nan_to_num(ratio, nan=0.0), torch.where(ratio.isnan(), 0.0, per_row), atol=1e-4)
    assert ((per_row >= 10 ** (-6 / 20) - 1e-4) & (per_row <= 10 ** (6 / 20) + 1e-4)).all()
    noise = v["noisy"] - v["clean"]
    snr = 10 * torch.log10(v["clean"].square().mean(1) / noise.square().mean(1))
    assert torch.allclose(snr, torch.full_like(snr, 20.0), atol=0.5)
    quiet = _pase(noise_p=0.0).make_views(x, generator=_gen(0))
    assert torch.equal(quiet["clean"], quiet["noisy"])


# --------------------------------------------------------------------------- targets against plain references

def test_dct_matrix_is_scipys_orthonormal_dct_ii():
    x = np.random.default_rng(0).normal(size=(5, 40))
    d = dct_matrix(40, 20).double().numpy()
    assert d.shape == (40, 20)
    np.testing.assert_allclose(x @ d, scipy.fft.dct(x, type=2, norm="ortho", axis=-1)[:, :20], atol=1e-6)
    full = dct_matrix(40, 40).double()
    assert torch.allclose(full.T @ full, torch.eye(40, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError):
        dct_matrix(10, 11)


def test_log_power_spectrum_matches_numpy_frame_by_frame():
    x = _tones(2)[:, 0] + 0.01 * torch.randn(2, L, generator=_gen(1))
    got = log_power_spectrum(x)
    assert got.shape == (2, T, 257)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)            # periodic Hann
    xn = x.double().numpy()
    for b in range(2):
        for t in range(T):
            frame = np.zeros(512)
            frame[56:456] = xn[b, 160 * t:160 * t + 400] * hann              # centred in the 512-point FFT
            ref = np.log(np.abs(np.fft.rfft(frame)) ** 2 + 1e-6)
            np.testing.assert_allclose(got[b, t].numpy(), ref, atol=2e-3, rtol=1e-4)


def _standardise_np(y: np.ndarray) -> np.ndarray:
    flat = y.reshape(-1, y.shape[-1])
    return (y - flat.mean(0)) / np.maximum(flat.std(0), 1e-3)


def test_mfcc_and_log_power_targets_are_standardised_dct_of_logmel_and_log_power():
    obj = _pase(workers=["mfcc", "log_power"], n_mels=40, n_mfcc=20)
    x = _tones(3)[:, 0] + 1e-3 * torch.randn(3, L, generator=_gen(2))   # every bin above the log floor
    tg = obj.targets(x, T)
    assert set(tg) == {"mfcc", "log_power"}
    assert tg["mfcc"].shape == (3, T, 20) and tg["log_power"].shape == (3, T, 257)
    mel = LogMel(40)(x).double().numpy()                                      # the project's log-mel
    ref = _standardise_np(scipy.fft.dct(mel, type=2, norm="ortho", axis=-1)[..., :20])
    np.testing.assert_allclose(tg["mfcc"].numpy(), ref, atol=2e-3)
    flat = tg["mfcc"].reshape(-1, 20)
    assert torch.allclose(flat.mean(0), torch.zeros(20), atol=1e-4) and torch.allclose(flat.std(0, unbiased=False),
                                                                                     torch.ones(20), atol=1e-3)
    np.testing.assert_allclose(tg["log_power"].numpy(), _standardise_np(log_power_spectrum(x).double().numpy()),
                               atol=1e-4)


def test_waveform_target_is_the_middle_160_samples_of_each_window():
    x = torch.arange(2 * L, dtype=torch.float32).view(2, L)
    y = waveform_target(x, T)
    assert y.shape == (2, T, 160)
    for b in range(2):
        for t in range(T):
            assert torch.equal(y[b, t], x[b, 160 * t + 120:160 * t + 280])
    assert 160 * (T - 1) + 280 <= L


def _prosody_reference(x: np.ndarray) -> np.ndarray:
    """Frame by frame in float64: energy, zero crossings, normalised autocorrelation over the lags of
    70 – 400 Hz, the smallest local maximum within 0.9 of the peak, np.interp across unvoiced frames."""
    lo, hi = 40, 228
    b, n = x.shape
    t = 1 + (n - 400) // 160
    out = np.zeros((b, t, 4))
    for i in range(b):
        energy, f0, voiced_peak = np.zeros(t), np.zeros(t), np.zeros(t)
        for k in range(t):
            fr = x[i, 160 * k:160 * k + 400]
            energy[k] = np.mean(fr ** 2)
            out[i, k, 0] = np.log(energy[k] + 1e-8)
            out[i, k, 1] = np.mean([fr[j] * fr[j + 1] < 0 for j in range(399)])
            f = fr - fr.mean()
            r = {lag: np.dot(f[:400 - lag], f[lag:]) / np.sqrt(np.dot(f[:400 - lag], f[:400 - lag])
                                                                 * np.dot(f[lag:], f[lag:]) + 1e-12)
                 for lag in range(lo - 1, hi + 2)}
            peak = max(r[lag] for lag in range(lo, hi + 1))
            cands = [lag for lag in range(lo, hi + 1)
                     if r[lag] >= r[lag - 1] and r[lag] >= r[lag + 1] and r[lag] >= 0.9 * peak]
            lag = cands[0] if cands else max(range(lo, hi + 1), key=lambda q: r[q])
            voiced_peak[k], f0[k] = peak, np.log(SR / lag)
        voiced = (voiced_peak >= 0.6) & (energy >= 1e-3 * energy.max()) & (energy > 1e-8)
        out[i, :, 2] = voiced
        idx = np.nonzero(voiced)[0]
        out[i, :, 3] = np.interp(np.arange(t), idx, f0[idx]) if len(idx) else np.log(SR / np.sqrt(lo * hi))
    return out


def test_prosody_features_match_a_frame_loop_and_read_known_signals():
    n = 8000
    t = np.arange(n) / SR
    g = np.random.default_rng(0)
    mixed = np.zeros(n)                                                       # silence, 100 Hz, noise, 200 Hz
    mixed[1600:3600] = 0.5 * np.sin(2 * np.pi * 100 * t[1600:3600])
    mixed[3600:5200] = 0.2 * g.normal(size=1600)
    mixed[5200:7600] = 0.3 * np.sin(2 * np.pi * 200 * t[5200:7600]) + 0.1 * np.sin(2 * np.pi * 400 * t[5200:7600])
    x = np.stack([mixed, 0.5 * np.sin(2 * np.pi * 300 * t), 0.1 * g.normal(size=n), np.zeros(n)]).astype(np.float32)
    got = prosody_features(torch.from_numpy(x))
    assert got.shape == (4, 1 + (n - 400) // 160, 4)
    ref = _prosody_reference(x.astype(np.float64))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)
    # what the features mean: a 300 Hz sine is voiced at 300 Hz (not an octave below), crosses zero
    # 600 times a second, energy 0.125; white noise is unvoiced; silence too
    sine = got[1]
    assert sine[:, 2].all() and torch.allclose(sine[:, 3].exp(), torch.full((sine.shape[0],), 300.0), rtol=0.02)
    assert torch.allclose(sine[:, 1] * SR, torch.full((sine.shape[0],), 600.0), rtol=0.08)   # 14 or 15 in 399 pairs
    assert torch.allclose(sine[:, 0].exp(), torch.full((sine.shape[0],), 0.125), rtol=0.02)
    assert not got[2, :, 2].any() and not got[3, :, 2].any()
    # the mixed utterance: F0 100 Hz then 200 Hz, interpolated across the noise, held at the ends
    f0 = got[0, :, 3].exp()
    assert abs(float(f0[0]) - 100) < 2 and abs(float(f0[-1]) - 200) < 4
    noise_frames = slice(24, 30)
    assert not got[0, noise_frames, 2].any() and (f0[noise_frames] > 100).all() and (f0[noise_frames] < 200).all()


def test_standardise_per_feature_over_the_batch_frames():
    y = torch.randn(3, 5, 4, generator=_gen(0)) * torch.tensor([1.0, 2.0, 3.0, 0.0]) + 7
    np.testing.assert_allclose(standardise(y).numpy(), _standardise_np(y.double().numpy()), atol=1e-5)
    assert torch.equal(standardise(y)[..., 3], torch.zeros(3, 5))            # a constant feature → 0


# --------------------------------------------------------------------------- the info-max pairs

def test_lim_pairs_positive_same_utterance_other_frame_negative_other_utterance_speech_only():
    """Utterance i sounds only in samples [960 i, 960 i + 480), which frames 6 i − 2 … 6 i + 2 overlap
    (disjoint sets for different i): every drawn frame must lie there for the utterance it is read
    from, so a positive read from another utterance, or a negative from the anchor's, fails."""
    b = 4
    x = torch.zeros(b, L)
    for i in range(b):
        x[i, 960 * i:960 * i + 480] = 0.3 * torch.sin(torch.arange(480) * 0.3)
    obj = _pase(workers=["local_info_max"], lim_pairs=6, gain_db=0.0, noise_p=0.0)
    seen_neg = set()
    for seed in range(20):
        v = obj.make_views(x, generator=_gen(seed))
        a, p, nu, n = v["lim_anchor"], v["lim_positive"], v["lim_negative_utt"], v["lim_negative"]
        rows = torch.arange(b)[:, None].expand_as(a)
        assert ((a >= 6 * rows - 2) & (a <= 6 * rows + 2)).all()            # the sounding frames
        assert ((p >= 6 * rows - 2) & (p <= 6 * rows + 2)).all()
        assert (p != a).all()
        assert (nu != rows).all() and ((nu >= 0) & (nu < b)).all()
        assert ((n >= 6 * nu - 2) & (n <= 6 * nu + 2)).all()
        seen_neg |= set(nu[0].tolist())
    assert seen_neg == {1, 2, 3}                                               # every other utterance serves


def test_gim_chunks_two_disjoint_of_the_anchor_one_of_another_utterance():
    obj = _pase(workers=["global_info_max"], chunk_frames=6)
    orders = set()
    for seed in range(20):
        v = obj.make_views(_tones(5), generator=_gen(seed))
        a, p, nu, n = v["gim_anchor"], v["gim_positive"], v["gim_negative_utt"], v["gim_negative"]
        assert ((a >= 0) & (a <= T - 6) & (p >= 0) & (p <= T - 6) & (n >= 0) & (n <= T - 6)).all()
        assert ((a - p).abs() >= 6).all()                                      # no shared frame
        assert (nu != torch.arange(5)).all()
        orders |= set((a < p).tolist())
    assert orders == {True, False}


# --------------------------------------------------------------------------- losses against loops

def _bce_loop(d, pairs_pos, pairs_neg) -> float:
    total = 0.0
    for u, v in pairs_pos:
        s = float(d(torch.cat([u, v])))
        total += -math.log(1 / (1 + math.exp(-s)))
    for u, v in pairs_neg:
        s = float(d(torch.cat([u, v])))
        total += -math.log(1 - 1 / (1 + math.exp(-s)))
    return total / (len(pairs_pos) + len(pairs_neg))


def test_losses_match_per_frame_and_per_pair_loops_and_the_total_is_the_weighted_sum():
    weights = {"waveform": 2.0, "log_power": 0.5, "mfcc": 1.0, "prosody": 0.25, "local_info_max": 1.5,
               "global_info_max": 0.75}
    obj = _pase(weights=weights, noise_p=1.0)
    v = obj.make_views(_tones(4), generator=_gen(0))
    out = obj(v)
    with torch.no_grad():
        h = obj.encode(v["noisy"])                                             # the encoder sees the noisy copy
        tg = obj.targets(v["clean"], T)                                        # the targets come from the clean one
        b, t, _ = h.shape
        ref = {}
        for w in ("waveform", "log_power", "mfcc", "prosody"):
            acc, count = 0.0, 0
            for i in range(b):
                for k in range(t):
                    err = obj.heads[w](h[i, k]) - tg[w][i, k]
                    acc += float(err.abs().sum() if w == "waveform" else err.square().sum())
                    count += err.numel()
            ref[w] = acc / count
        pos, neg = [], []
        for i in range(b):
            for j in range(obj.lim_pairs):
                anchor = h[i, v["lim_anchor"][i, j]]
                pos.append((anchor, h[i, v["lim_positive"][i, j]]))
                neg.append((anchor, h[v["lim_negative_utt"][i, j], v["lim_negative"][i, j]]))
        ref["local_info_max"] = _bce_loop(obj.discriminators["local_info_max"], pos, neg)

        def chunk(utt, start):
            return sum(h[utt, start + k] for k in range(obj.chunk_frames)) / obj.chunk_frames

        pos = [(chunk(i, v["gim_anchor"][i]), chunk(i, v["gim_positive"][i])) for i in range(b)]
        neg = [(chunk(i, v["gim_anchor"][i]), chunk(v["gim_negative_utt"][i], v["gim_negative"][i])) for i in range(b)]
        ref["global_info_max"] = _bce_loop(obj.discriminators["global_info_max"], pos, neg)
    for w in WORKERS:
        assert abs(float(out[f"loss_{w}"]) - ref[w]) < 1e-5 * max(1.0, ref[w]), w
    total = float(out["loss"].detach())
    assert abs(total - sum(weights[w] * ref[w] for w in WORKERS)) < 1e-5 * total
    assert abs(total - sum(weights[w] * float(out[f"loss_{w}"]) for w in WORKERS)) < 1e-5
    assert 0 <= float(out["lim_accuracy"]) <= 1 and 0 <= float(out["gim_accuracy"]) <= 1


@pytest.mark.parametrize("workers", [["waveform"], ["mfcc"], ["prosody"], ["log_power"], ["local_info_max"],
                                     ["global_info_max"], ["mfcc", "local_info_max"], list(WORKERS)])
def test_workers_alone_and_together_train_the_backbone(workers):
    obj = _pase(workers=workers)
    v = obj.make_views(_tones(4), generator=_gen(0))
    assert ("lim_anchor" in v) == ("local_info_max" in workers)
    assert ("gim_anchor" in v) == ("global_info_max" in workers)
    out = obj(v)
    assert {k for k in out if k.startswith("loss_")} == {f"loss_{w}" for w in workers}
    assert set(obj.heads) | set(obj.discriminators) == set(workers)
    assert torch.isfinite(out["loss"])
    assert abs(float(out["loss"].detach()) - sum(float(out[f"loss_{w}"]) for w in workers)) < 1e-5
    out["loss"].backward()
    assert _backbone_trained(obj)


def test_refuses_bad_workers_weights_and_batches():
    for bad in ([], ["waveform", "phase"], ["mfcc", "mfcc"]):
        with pytest.raises(ValueError):
            _pase(workers=bad)
    with pytest.raises(ValueError):
        _pase(weights={"spectrum": 1.0})
    with pytest.raises(ValueError):
        _pase(weights={"mfcc": -1.0})
    with pytest.raises(ValueError, match="batch size"):
        _pase().make_views(_tones(1), generator=_gen())
    _pase(workers=["mfcc"]).make_views(_tones(1), generator=_gen())           # no negatives needed
    with pytest.raises(ValueError, match="chunk"):
        _pase(chunk_frames=12).make_views(_tones(2), generator=_gen())
    with pytest.raises(ValueError):
        PASE(torch.nn.Linear(4, 4))                                            # not an audio backbone


def test_bf16_autocast_forward_is_finite_with_fp32_targets():
    obj = _pase()
    v = obj.make_views(_tones(4), generator=_gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(v)
        tg = obj.targets(v["clean"], T)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert all(y.dtype == torch.float32 for y in tg.values())
    out["loss"].backward()
    assert _backbone_trained(obj)


def test_the_losses_fall_on_tiny_synthetic_audio():
    torch.manual_seed(0)
    obj = _pase(dim=32, head_width=32, noise_p=0.5)
    data = _tones(16, seed=1)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    g = _gen(0)
    hist = []
    for _ in range(60):
        idx = torch.randperm(16, generator=g)[:8]
        out = obj(obj.make_views(data[idx], generator=g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
    first = {k: np.mean([h[k] for h in hist[:5]]) for k in hist[0]}
    last = {k: np.mean([h[k] for h in hist[-5:]]) for k in hist[0]}
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    for w, ratio in [("mfcc", 0.5), ("prosody", 0.5), ("log_power", 0.8), ("waveform", 0.8),
                     ("local_info_max", 0.9), ("global_info_max", 0.9)]:
        assert last[f"loss_{w}"] < ratio * first[f"loss_{w}"], (w, first, last)
    assert last["lim_accuracy"] > 0.7 and last["gim_accuracy"] > 0.65, last
