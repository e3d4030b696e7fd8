"""The audio front end, augmentation and backbones: the log-mel against `transformers`' audio_utils
(a trusted numpy implementation, test-only), augmentation's effects one by one, and what each
backbone's halves may see (the GRU context is causal, the channel norm never mixes frames)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_models import backbones
from ssl_models.audio import (AudioAugment, LogMel, augment_waveforms, log_mel_stats, mel_filterbank,
                              resample_linear, waveforms)
from ssl_models.audio_encoder import AudioEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OFF = AudioAugment(gain_db=0, noise_p=0, shift=0, speed_p=0)


def _tone(freq=440.0, n=16000, rate=16000, b=1) -> torch.Tensor:
    t = torch.arange(n) / rate
    return (0.3 * torch.sin(2 * torch.pi * freq * t)).repeat(b, 1)


def test_the_mel_filterbank_matches_transformers_htk_filters():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(257, 80, 0.0, 8000.0, 16000, norm=None, mel_scale="htk")
    assert np.allclose(mel_filterbank(80, 512, 16000).numpy(), ref, atol=1e-6)


def test_log_mel_matches_transformers_spectrogram_frame_for_frame():
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    x = torch.randn(16000) * 0.1
    ours = LogMel(80)(x[None])[0].numpy()                                    # (T, 80)
    # frame t = samples [160 t, 160 t + 400) under a periodic Hann, in a 512-point FFT: the window sits
    # at 56..456 of each 512-sample frame of the signal padded by 56 on both sides
    win = np.zeros(512)
    win[56:456] = window_function(400, "hann", periodic=True)
    ref = spectrogram(np.pad(x.numpy(), (56, 56)), win, 512, 160, 512, power=2.0, center=False,
                      mel_filters=mel_filter_bank(257, 80, 0.0, 8000.0, 16000, mel_scale="htk"), mel_floor=1e-30)
    ref = np.log(ref.T + 1e-6)                                               # (T, 80)
    assert ours.shape == ref.shape == (98, 80)
    assert np.allclose(ours, ref, atol=2e-3)


def test_a_tone_lights_its_own_mel_band():
    m = LogMel(40)(_tone(1000.0))[0]                                        # (T, 40)
    band = int(m.mean(0).argmax())
    centres = torch.linspace(0, 2595 * np.log10(1 + 8000 / 700), 42)[1:-1]
    hz = 700 * (10 ** (centres / 2595) - 1)
    assert abs(float(hz[band]) - 1000) < 120
    assert log_mel_stats(_tone(1000.0, b=3)).shape == (3, 160)


def test_augmentation_ops_each_do_what_they_say():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = _tone(b=8)
    assert torch.equal(augment_waveforms(x[:, None], OFF, g()), x)                        # all off: identity
    gained = augment_waveforms(x, AudioAugment(gain_db=6, noise_p=0, shift=0, speed_p=0), g())
    ratio = gained.abs().amax(1) / x.abs().amax(1)
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()) and ratio.std() > 0.05              # per utterance, ±6 dB
    noisy = augment_waveforms(x, AudioAugment(gain_db=0, noise_p=1.0, snr_db=(10, 10), shift=0, speed_p=0), g())
    snr = 10 * torch.log10(x.square().mean(1) / (noisy - x).square().mean(1))
    assert torch.allclose(snr, torch.full((8,), 10.0), atol=0.5)
    shifted = augment_waveforms(x, AudioAugment(gain_db=0, noise_p=0, shift=0.1, speed_p=0), g())
    lag = [int(np.argmax(np.correlate(s.numpy()[2000:6000], x[0].numpy()[1900:6100], "valid"))) - 100 for s in shifted]
    assert max(abs(v) for v in lag) > 0 and all(abs(v) <= 1600 for v in lag)
    assert torch.equal(augment_waveforms(x, AudioAugment(), g()), augment_waveforms(x, AudioAugment(), g()))


def test_speed_change_moves_the_pitch():
    x = _tone(500.0)
    y = resample_linear(x, torch.tensor([1.2]))
    peak = int(np.argmax(np.abs(np.fft.rfft(y[0, :12000].numpy()))) * 16000 / 12000)
    assert abs(peak - 600) < 5 and float(y[0, -2000:].abs().max()) == 0.0   # faster: ends in zeros


@pytest.mark.parametrize("name", ["audio_conv", "audio_cpc", "audio_transformer", "audio_apc"])
def test_each_audio_backbone_gives_frames_and_an_utterance_vector(name):
    m = backbones.build(name, in_channels=1, **({"dim": 32} if name != "audio_apc" else {"dim": 32, "layers": 1}))
    x = torch.randn(2, 1, 16000) * 0.1
    z, c, v = m.local(x), m.encode(x), m(x)
    assert z.shape[:2] == (2, 98) and c.shape == (2, 98, m.feature_dim) and v.shape == (2, m.feature_dim)
    assert torch.allclose(v, c.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="mono"):
        backbones.build(name, in_channels=3)


def test_the_gru_context_is_causal_and_the_conv_frames_are_local():
    torch.manual_seed(0)
    m = AudioEncoder(frontend="conv", context="gru", dim=16, layers=1).eval()
    x = torch.randn(1, 16000) * 0.1
    y = x.clone()
    y[:, 8000:] += torch.randn(1, 8000)                                     # change the second half only
    with torch.no_grad():
        a, b = m.encode(x), m.encode(y)
        za, zb = m.local(x), m.local(y)
    first_touched = (8000 - 465) // 160                                     # receptive field 465 samples
    assert torch.allclose(a[:, :first_touched], b[:, :first_touched], atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert torch.allclose(za[:, :first_touched], zb[:, :first_touched], atol=1e-6)  # no norm over time
    t = AudioEncoder(frontend="conv", context="transformer", dim=16, layers=1, heads=2).eval()
    with torch.no_grad():
        assert not torch.allclose(t.encode(x)[:, 0], t.encode(y)[:, 0])   # the transformer sees both ways


def test_waveforms_take_int16_and_refuse_stereo():
    assert torch.allclose(waveforms(torch.tensor([[16384, -32768]], dtype=torch.int16)), torch.tensor([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="mono"):
        waveforms(torch.zeros(2, 2, 100))


def test_spans_of_time_pool_the_frames_and_the_log_mel_alike():
    from workers.evaluate.features import pooled_feature_maps

    x = torch.randn(2, 16000) * 0.1
    m = LogMel(80)(x)                                                       # (2, 98, 80)
    three = log_mel_stats(x, 80, 3)
    first = m[:, :33]                                                       # tensor_split: 33, 33, 32 frames
    assert three.shape == (2, 480) and torch.allclose(three[:, :80], first.mean(1), atol=1e-5)
    assert torch.allclose(three[:, 80:160], first.std(1), atol=1e-5) and torch.equal(log_mel_stats(x, 80, 1),
                                                                                     log_mel_stats(x))
    net = backbones.build("audio_cpc", in_channels=1, dim=16, context_dim=16).eval()
    with torch.no_grad():
        assert torch.allclose(pooled_feature_maps(net, x, 1, 1), net(x), atol=1e-6)
        both = pooled_feature_maps(net, x, 3, 2)
        ctx = net.encode(x)
    # channel-major: (channel, span); adaptive pooling's first span of 98 frames in 3 is frames 0-32
    assert both.shape == (2, 2 * 16 * 3)
    assert torch.allclose(both[:, 48:].view(2, 16, 3)[:, :, 0], ctx[:, :33].mean(1), atol=1e-5)
