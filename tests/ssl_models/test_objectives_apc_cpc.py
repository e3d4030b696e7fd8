"""The predictive objectives on audio: APC (a causal GRU forecasts the log-mel frame n steps ahead, L1) and
CPC (a causal GRU context scores future conv frames against negatives, InfoNCE). Views and shapes, the loss
against loops over time steps, causality, the shift, the negatives, gradients, bf16, and learning on tiny
synthetic sounds (chirps)."""
from __future__ import annotations

import math
import re

import pytest
import torch

from ssl_models import backbones
from ssl_models.objectives.apc import APC
from ssl_models.objectives.cpc_audio import CPCAudio, sample_negatives

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SR = 16000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chirps(b: int = 8, length: int = 8000, seed: int = 1) -> torch.Tensor:
    """Per utterance: a tone sweeping from a random frequency at a random rate (up or down), and a
    steady second tone; (B, 1, L) in [-1, 1]. The log-mel frames move in time, predictably."""
    g = _gen(seed)
    t = torch.arange(length, dtype=torch.float64) / SR                              # seconds
    f0 = 300 + 2500 * torch.rand(b, 1, generator=g, dtype=torch.float64)
    rate = (torch.rand(b, 1, generator=g, dtype=torch.float64) * 2 - 1) * 4000       # Hz per second
    f1 = 200 + 3000 * torch.rand(b, 1, generator=g, dtype=torch.float64)
    sweep = torch.sin(2 * math.pi * (f0 * t + 0.5 * rate * t ** 2))
    steady = 0.5 * torch.sin(2 * math.pi * f1 * t)
    return (0.5 * (sweep + steady) / 1.5).float()[:, None]


def _backbone_trained(obj) -> bool:
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    return bool(grads) and sum(float(x.abs().sum()) for x in grads) > 0


def _apc(seed: int = 0, **kw) -> APC:
    torch.manual_seed(seed)
    return APC(backbones.build("audio_apc", in_channels=1, dim=32, layers=kw.pop("layers", 1)), **kw)


def _cpc(seed: int = 0, **kw) -> CPCAudio:
    torch.manual_seed(seed)
    kw = {"prediction_steps": 4, "negatives": 8, **kw}
    return CPCAudio(backbones.build("audio_cpc", in_channels=1, dim=32, context_dim=24), **kw)


def test_both_are_documented_audio_objectives():
    for cls, name, contrastive in [(APC, "apc", False), (CPCAudio, "cpc_audio", True)]:
        assert cls.name == name and cls.modality == "audio" and cls.contrastive is contrastive
        assert re.search(r"\b(19|20)\d\d\b", cls.__doc__) and "Shape" in cls.__doc__
        assert "Shape:" in cls.make_views.__doc__ and "Shape:" in cls.forward.__doc__


# --------------------------------------------------------------------------- APC

def test_apc_views_are_the_utterances_with_a_gain_and_reproducible():
    obj = _apc()
    x = _chirps(4)
    views = obj.make_views(x, generator=_gen(5))
    assert set(views) == {"waves"} and views["waves"].shape == (4, 8000) and views["waves"].dtype == torch.float32
    torch.testing.assert_close(views["waves"], obj.make_views(x, generator=_gen(5))["waves"])
    assert not torch.allclose(views["waves"], obj.make_views(x, generator=_gen(6))["waves"])
    ratio = views["waves"][:, 1:] / x[:, 0, 1:]                                # gain only: one factor per utterance
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert ratio[:, 0].min() >= 10 ** (-6 / 20) - 1e-6 and ratio[:, 0].max() <= 10 ** (6 / 20) + 1e-6
    plain = _apc(gain_db=0.0).make_views(x, generator=_gen(5))["waves"]
    torch.testing.assert_close(plain, x[:, 0])


@pytest.mark.parametrize("shift", [3, 1])
def test_apc_loss_is_the_l1_to_the_input_frame_shift_steps_later(shift):
    obj = _apc(shift=shift)
    waves = obj.make_views(_chirps(3, 4000), generator=_gen())["waves"]
    out = obj({"waves": waves})
    with torch.no_grad():
        x = obj.backbone.local(waves)                                           # (B, T, 80) log-mel
        h = obj.backbone.context(x)
    b, t, m = x.shape
    assert m == 80 and t == 1 + (4000 - 400) // 160
    total, copy, count = 0.0, 0.0, 0
    for i in range(b):
        for s in range(t - shift):                                              # forecast at s of frame s + n
            total += float((obj.head(h[i, s]) - x[i, s + shift]).abs().sum().detach())
            copy += float((x[i, s] - x[i, s + shift]).abs().sum())
            count += m
    assert abs(out["loss"].item() - total / count) < 1e-5
    assert abs(float(out["copy_l1"]) - copy / count) < 1e-5
    # the same weights with the other shift score another target
    other = APC(obj.backbone, shift=4 - shift)
    other.head.load_state_dict(obj.head.state_dict())
    assert abs(other({"waves": waves})["loss"].item() - out["loss"].item()) > 1e-3


def test_apc_forecasts_are_causal():
    obj = _apc(shift=3, layers=2).eval()
    x = _chirps(2, 8000)[:, 0]
    cut = 3000                                                                  # samples ≥ cut change
    y = x.clone()
    y[:, cut:] = torch.rand(2, x.shape[1] - cut, generator=_gen()) * 2 - 1
    with torch.no_grad():
        fx, fy = (obj.forecast(obj.backbone.local(w)) for w in (x, y))         # (B, T, 80), output t → x_{t+3}
    first = (cut - 400) // 160 + 1                                              # frames 0 … first−1 end before cut
    torch.testing.assert_close(fx[:, :first], fy[:, :first], rtol=0, atol=0)
    assert (fx[:, first:] - fy[:, first:]).abs().amax(-1).min() > 0           # every later output sees the change
    # at the frame level: changing the target frame t + n changes no forecast at times < t + n
    frames = obj.backbone.local(x).detach()
    moved = frames.clone()
    moved[:, 20] += 1.0
    with torch.no_grad():
        a, b = obj.forecast(frames), obj.forecast(moved)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)            # forecast 17 (of frame 20) too
    assert not torch.allclose(a[:, 20], b[:, 20])


def test_apc_refuses_non_causal_or_learned_front_ends_and_bad_values():
    with pytest.raises(ValueError, match="causal context"):
        APC(backbones.build("audio_transformer", in_channels=1, dim=32, layers=1))
    with pytest.raises(ValueError, match="log-mel"):
        APC(backbones.build("audio_cpc", in_channels=1, dim=32))
    with pytest.raises(ValueError, match="shift"):
        _apc(shift=0)
    obj = _apc(shift=3)
    with pytest.raises(ValueError, match="too short"):
        obj({"waves": torch.zeros(2, 400 + 160 * 2)})                           # 3 frames


def test_apc_trains_the_backbone_and_runs_under_bf16():
    obj = _apc(layers=2)
    views = obj.make_views(_chirps(2, 4000), generator=_gen())
    obj(views)["loss"].backward()
    assert _backbone_trained(obj)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in obj.backbone.ctx.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_apc_learns_to_forecast_chirps():
    obj = _apc(seed=1, gain_db=3.0)
    clips, g = _chirps(8, 8000), _gen(3)
    with torch.no_grad():
        x = obj.backbone.local(clips[:, 0])                                     # (B, T, 80)
    # the best constant forecast (per band), which ignores the past: the median frame
    no_past = float((x - x.flatten(0, 1).median(0).values).abs().mean())
    opt = torch.optim.Adam(obj.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = obj(obj.make_views(clips, generator=g))
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first and last < 0.5 * no_past, (losses, no_past)


# --------------------------------------------------------------------------- CPC (audio)

def test_cpc_views_and_negatives_are_reproducible():
    obj = _cpc()
    x = _chirps(4)
    views = obj.make_views(x, generator=_gen(5))
    t = 1 + (8000 - 400) // 160
    assert set(views) == {"waves", "negatives"}
    assert views["waves"].shape == (4, 8000) and views["waves"].dtype == torch.float32
    assert views["negatives"].shape == (4, t, 8) and views["negatives"].dtype == torch.long
    again = obj.make_views(x, generator=_gen(5))
    for k in views:
        torch.testing.assert_close(views[k], again[k])
    other = obj.make_views(x, generator=_gen(6))
    assert not torch.equal(views["negatives"], other["negatives"])
    assert not torch.allclose(views["waves"], other["waves"])


def test_cpc_negatives_come_from_the_whole_batch_but_never_from_the_predicted_window():
    b, t, steps, n = 3, 20, 5, 400
    neg = sample_negatives(b, t, steps, n, _gen())
    assert neg.shape == (b, t, n) and int(neg.min()) >= 0 and int(neg.max()) < b * t
    utt, frame = neg // t, neg % t
    me = torch.arange(b).view(b, 1, 1)
    now = torch.arange(t).view(1, t, 1)
    same = utt == me
    forbidden = same & (frame > now) & (frame <= now + steps)                   # z_{t+1} … z_{t+K} of this utterance
    assert not forbidden.any()
    # every other frame of the batch is drawn, about uniformly, for a context in the middle
    counts = torch.bincount(neg[1, 8], minlength=b * t)
    allowed = torch.ones(b * t, dtype=torch.bool)
    allowed[1 * t + 9:1 * t + 14] = False
    assert (counts[~allowed] == 0).all() and (counts[allowed] > 0).all()
    assert (same.float().mean() - (t - steps) / (b * t - steps)).abs() < 0.05   # own utterance: its share
    # near the end fewer future frames exist: only those are excluded, the next utterance's first frames are not
    last = neg[0, t - 2]                                                        # window = frame t−1 only
    assert not (last == t - 1).any() and (last == t).any()


def test_cpc_loss_matches_a_loop_over_contexts_steps_and_negatives():
    obj = _cpc(prediction_steps=3, negatives=5)
    views = obj.make_views(_chirps(2, 4000), generator=_gen())
    out = obj(views)
    with torch.no_grad():
        z = obj.backbone.local(views["waves"])                                  # (B, T, D)
        c = obj.backbone.context(z)                                             # (B, T, C)
    b, t, _ = z.shape
    flat, neg = z.reshape(b * t, -1), views["negatives"]
    losses, accs = [], []
    for k in range(1, 4):
        W = obj.predictors[k - 1].weight.detach()                               # (D, C)
        nll, hits, count = 0.0, 0, 0
        for i in range(b):
            for s in range(t - k):
                pred = W @ c[i, s]
                assert (i * t + s + k) not in neg[i, s].tolist()                # the positive is not a negative
                scores = [float(z[i, s + k] @ pred)] + [float(flat[j] @ pred) for j in neg[i, s].tolist()]
                nll += -(scores[0] - math.log(sum(math.exp(v) for v in scores)))
                hits += int(scores[0] > max(scores[1:]))
                count += 1
        losses.append(nll / count)
        accs.append(hits / count)
    assert abs(out["loss"].item() - sum(losses) / 3) < 1e-5
    assert abs(float(out["accuracy"]) - sum(accs) / 3) < 1e-6
    assert abs(float(out["accuracy_k1"]) - accs[0]) < 1e-6 and abs(float(out["accuracy_kK"]) - accs[-1]) < 1e-6


def test_cpc_context_is_causal_and_the_backbone_trains():
    obj = _cpc().eval()
    x = _chirps(2, 8000)[:, 0]
    cut = 3000
    y = x.clone()
    y[:, cut:] = 0.0
    with torch.no_grad():
        cx, cy = (obj.backbone.context(obj.backbone.local(w)) for w in (x, y))
    # conv frame t reads samples [160 t, 160 t + 465): frames with 160 t + 465 <= cut are untouched
    first = (cut - 465) // 160 + 1
    torch.testing.assert_close(cx[:, :first], cy[:, :first], rtol=0, atol=0)
    assert not torch.allclose(cx[:, first + 1], cy[:, first + 1])
    obj.train()
    views = obj.make_views(_chirps(2, 4000), generator=_gen())
    obj(views)["loss"].backward()
    assert _backbone_trained(obj)
    assert float(obj.backbone.front.net[0].weight.grad.abs().sum()) > 0         # down to the first conv
    assert all(p.grad is not None for p in obj.predictors.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_cpc_refuses_non_causal_contexts_and_bad_values():
    for name in ("audio_transformer", "audio_conv"):
        with pytest.raises(ValueError, match="causal context"):
            CPCAudio(backbones.build(name, in_channels=1, dim=32))
    with pytest.raises(ValueError, match="prediction_steps"):
        _cpc(prediction_steps=0)
    with pytest.raises(ValueError, match="too short"):
        _cpc(prediction_steps=12).make_views(torch.zeros(2, 1, 400 + 160 * 10))


def test_cpc_learns_to_pick_the_future_frame_of_chirps():
    obj = _cpc(seed=1, prediction_steps=4, negatives=16)
    clips, g = _chirps(8, 8000), _gen(3)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses, accs = [], []
    for _ in range(60):
        out = obj(obj.make_views(clips, generator=g))
        losses.append(out["loss"].item())
        accs.append(float(out["accuracy"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert abs(first - math.log(17)) < 0.3                                      # chance: 1 positive among 17
    assert last < 0.5 * first, losses
    assert sum(accs[-5:]) / 5 > 0.5, accs                                       # chance: 1/17
