"""wav2vec 2.0: views, the span mask, the distractor sampler, the Gumbel product quantiser and the loss,
each against the `transformers` reference (a test-only dependency, imported inside the tests) and against
plain loops; the traps of METHODS (the number of spans, negatives from the other masked frames only,
the diversity loss's scale, log(0) in the Gumbel noise); gradients, bf16, and learning on tiny audio."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_models import backbones
from ssl_models.objectives.wav2vec2 import (GumbelQuantizer, Wav2Vec2, draw_negative_ranks, draw_span_starts,
                                            negatives_from_ranks, sample_negatives, span_mask)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = 32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf():
    from transformers.models.wav2vec2 import modeling_wav2vec2

    return modeling_wav2vec2


def _obj(seed: int = 0, **kw) -> Wav2Vec2:
    torch.manual_seed(seed)
    bb = backbones.build("audio_transformer", in_channels=1, dim=DIM, layers=1, heads=4)
    kw = {"groups": 2, "entries": 16, "code_dim": 16, "final_dim": 24, "num_negatives": 10, **kw}
    return Wav2Vec2(bb, **kw)


def _chirps(b: int = 8, n: int = 8000, seed: int = 1) -> torch.Tensor:
    """Linear chirps (random start and end frequency, 100-2000 Hz) plus a second partial: every frame of an
    utterance differs from its neighbours a little, so the masked ones are predictable from the context."""
    g = _gen(seed)
    t = torch.arange(n) / 16000.0
    f0, f1 = (100 + 1900 * torch.rand(2, b, 1, generator=g)).unbind(0)
    dur = n / 16000.0
    phase = 2 * math.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * dur))
    x = 0.5 * torch.sin(phase) + 0.2 * torch.sin(2 * phase + 1.0)
    return x[:, None].float()


def _backbone_trained(obj) -> bool:
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    return bool(grads) and sum(float(x.abs().sum()) for x in grads) > 0


def test_documented_and_refuses_backbones_without_a_transformer():
    assert Wav2Vec2.name == "wav2vec2" and Wav2Vec2.contrastive and Wav2Vec2.modality == "audio"
    assert re.search(r"\b2020\b", Wav2Vec2.__doc__) and "Baevski" in Wav2Vec2.__doc__ and "Shape" in Wav2Vec2.__doc__
    assert "Shape:" in Wav2Vec2.make_views.__doc__ and "Shape:" in Wav2Vec2.forward.__doc__
    for kind in ("audio_cpc", "audio_conv"):
        with pytest.raises(ValueError, match="transformer context"):
            Wav2Vec2(backbones.build(kind, in_channels=1, dim=DIM))
    with pytest.raises(ValueError, match="mask_prob"):
        _obj(mask_prob=0.0)
    with pytest.raises(ValueError, match="code_dim"):
        _obj(code_dim=15)


# --------------------------------------------------------------------------- views

def test_views_shapes_dtypes_and_seeded_reproducibility():
    obj = _obj()
    x = _chirps(6, 16000)
    v = obj.make_views(x, generator=_gen(3))
    assert v["wave"].shape == (6, 16000) and v["wave"].dtype == torch.float32 and torch.equal(v["wave"], x[:, 0])
    assert v["mask"].shape == (6, 98) and v["mask"].dtype == torch.bool                   # T = backbone.frames(L)
    assert v["negatives"].shape == (6, 98, 10) and v["negatives"].dtype == torch.long
    w = obj.make_views(x, generator=_gen(3))
    assert all(torch.equal(v[k], w[k]) for k in v)
    assert not torch.equal(v["mask"], obj.make_views(x, generator=_gen(4))["mask"])
    aug = _obj(augment=True)
    a, b = aug.make_views(x, generator=_gen(3)), aug.make_views(x, generator=_gen(3))
    assert torch.equal(a["wave"], b["wave"]) and not torch.equal(a["wave"], x[:, 0])
    # p = 0.65, l = 10, T = 98: int(6.37 + U) = 6 or 7 spans per utterance: 10 to 70 frames masked
    m = v["mask"].sum(1)
    assert bool((m >= 10).all() and (m <= 70).all())


# --------------------------------------------------------------------------- span mask vs transformers

@pytest.mark.parametrize("b,t,p,length,min_masks,lengths", [
    (6, 98, 0.65, 10, 2, None),          # the default: 6 or 7 spans
    (5, 98, 0.05, 10, 2, None),          # int(0.49 + U) < 2: min_masks decides
    (4, 23, 0.9, 10, 0, None),           # capped at T // l and T − l + 1
    (4, 60, 0.65, 10, 2, [60, 41, 25, 12]),  # right padding: spans stay in the valid frames
])
def test_span_mask_equals_transformers_compute_mask_indices_on_the_same_draws(monkeypatch, b, t, p, length,
                                                                              min_masks, lengths):
    """transformers draws ε with np.random.rand and the starts with np.random.choice; replaying our draws
    through those two calls must give our mask bit for bit, and the span counts it asks for must be ours."""
    hf = _hf()
    starts, counts, eps = draw_span_starts(b, t, p, length, min_masks, lengths, generator=_gen(7))
    ours = span_mask(b, t, p, length, min_masks, lengths, generator=_gen(7))
    row = iter(range(b))
    lens = lengths or [t] * b

    def fake_choice(a, size, replace=True):
        i = next(row)
        assert not replace and np.array_equal(a, np.arange(lens[i] - length + 1)) and size == counts[i]
        return starts[i, :size].numpy()

    monkeypatch.setattr(np.random, "rand", lambda *shape: np.array([eps]))
    monkeypatch.setattr(np.random, "choice", fake_choice)
    attn = None if lengths is None else (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ref = hf._compute_mask_indices((b, t), p, length, attention_mask=attn, min_masks=min_masks)
    assert torch.equal(ours, torch.from_numpy(ref))
    # the number of spans: int(p · n / l + ε) with one ε per batch, at least min_masks, capped
    assert counts == [min(max(int(p * n / length + eps), min_masks), t // length, max(n - length + 1, 0)) for n in lens]
    if lengths is not None:
        assert not bool((ours & (attn == 0)).any())                                 # no span in the padding


def test_span_mask_statistics_match_transformers():
    """Independent draws (one utterance each): the same distribution of the number of masked frames, and
    of where they are, as transformers' (2000 draws each; T = 98, p = 0.65, l = 10, min_masks = 2)."""
    hf = _hf()
    np.random.seed(0)
    n = 2000
    ref = np.stack([hf._compute_mask_indices((1, 98), 0.65, 10, min_masks=2)[0] for _ in range(n)])
    g = _gen(0)
    ours = torch.cat([span_mask(1, 98, 0.65, 10, 2, generator=g) for _ in range(n)]).numpy()
    rc, oc = ref.sum(1), ours.sum(1)
    assert abs(rc.mean() - oc.mean()) < 1.0 and abs(rc.std() - oc.std()) < 0.6      # ~49 ± 5.5 frames
    hist = lambda c: np.histogram(c, bins=np.arange(0, 100, 10))[0] / n               # noqa: E731
    assert np.abs(hist(rc) - hist(oc)).max() < 0.04
    assert np.abs(ref.mean(0) - ours.mean(0)).max() < 0.07                            # per-frame masking rate
    # the paper's p = 0.065 is the start probability: the code's 0.65 gives ~half the frames masked
    assert 0.45 < oc.mean() / 98 < 0.55


# --------------------------------------------------------------------------- distractors vs transformers

def _mask_with_padding() -> torch.Tensor:
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 3:15] = True
    mask[0, 20:26] = True
    mask[1, 0:10] = True                                      # frames 30..39 of utterance 1 are padding
    mask[2, 25:40] = True
    return mask


def test_negatives_equal_transformers_sample_negative_indices_on_the_same_draws(monkeypatch):
    hf = _hf()
    mask = _mask_with_padding()
    ranks = draw_negative_ranks(mask, 7, _gen(2))
    ours = sample_negatives(mask, 7, _gen(2))
    assert torch.equal(ours, negatives_from_ranks(mask, ranks))
    row = iter(range(3))

    def fake_randint(low, high, size):
        i = next(row)
        assert low == 0 and high == int(mask[i].sum()) - 1 and size == (int(mask[i].sum()), 7)
        return ranks[i][mask[i]].numpy().astype(np.int64)

    monkeypatch.setattr(np.random, "randint", fake_randint)
    ref = torch.from_numpy(hf._sample_negative_indices((3, 40), 7, mask.numpy())).long()   # flat b·T + t
    flat = ours + 40 * torch.arange(3)[:, None, None]
    assert torch.equal(flat[mask], ref[mask])


def test_negatives_come_uniformly_from_the_other_masked_frames_of_the_same_utterance():
    mask = _mask_with_padding()
    neg = sample_negatives(mask, 50, _gen(0))
    for b in range(3):
        frames = mask[b].nonzero()[:, 0]
        for t in frames.tolist():
            drawn = neg[b, t]
            assert bool(mask[b, drawn].all()), "a distractor from an unmasked (or padding) frame"
            assert not bool((drawn == t).any()), "the positive itself drawn as a distractor"
    # uniform over the M − 1 others: counts from many draws, against transformers' sampler
    hf = _hf()
    k, m = 4000, int(mask[0].sum())
    ours = sample_negatives(mask, k, _gen(1))[0, 3]                                   # masked frame 3 of utterance 0
    np.random.seed(1)
    ref = hf._sample_negative_indices((3, 40), k, mask.numpy())[0, 3]
    p_ours = torch.bincount(ours, minlength=40).float() / k
    p_ref = torch.from_numpy(np.bincount(ref, minlength=40)).float() / k
    expect = torch.zeros(40)
    expect[mask[0]] = 1.0 / (m - 1)
    expect[3] = 0.0
    assert (p_ours - expect).abs().max() < 0.02 and (p_ref - expect).abs().max() < 0.02
    with pytest.raises(ValueError, match="at least 2 masked frames"):
        sample_negatives(torch.zeros(2, 10, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True), 3)


# --------------------------------------------------------------------------- quantiser vs transformers

def _hf_quantizer(q: GumbelQuantizer, in_dim: int):
    from transformers import Wav2Vec2Config

    cfg = Wav2Vec2Config(conv_dim=(in_dim,), conv_stride=(5,), conv_kernel=(10,), num_codevector_groups=q.groups,
                         num_codevectors_per_group=q.entries, codevector_dim=q.codevectors.shape[-1] * q.groups)
    ref = _hf().Wav2Vec2GumbelVectorQuantizer(cfg)
    ref.load_state_dict(q.state_dict())                                               # same names, same shapes
    return ref


@pytest.mark.parametrize("train", [False, True])
def test_quantizer_equals_transformers_gumbel_vector_quantizer(train):
    """Same weights, same input, same mask: the codevectors and the perplexity. Eval: the argmax path.
    Train: the same torch seed gives the same Exp(1) draws (our noise is drawn like F.gumbel_softmax's),
    so the Gumbel samples, the straight-through gradients and the softmax perplexity all match."""
    torch.manual_seed(0)
    q = GumbelQuantizer(DIM, 2, 16, 16)
    ref = _hf_quantizer(q, DIM)
    q.train(train), ref.train(train)
    ref.temperature = 1.3
    x = torch.randn(3, 20, DIM)
    mask = torch.rand(3, 20, generator=_gen(5)) < 0.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(11)
    out = q(x1, 1.3, mask)
    torch.manual_seed(11)
    codes, ppl = ref(x2, mask_time_indices=mask)
    torch.testing.assert_close(out["codes"], codes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["perplexity"], ppl, rtol=1e-6, atol=1e-6)
    if train:
        w = torch.randn_like(codes)
        (out["codes"] * w).sum().backward()
        (codes * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
        # the perplexity is that of the softmax over the masked rows, not of the Gumbel samples
        soft = q.weight_proj(x[mask]).view(-1, 2, 16).softmax(-1).mean(0)
        torch.testing.assert_close(out["perplexity"], torch.exp(-(soft * soft.log()).sum(-1)).sum())
    else:
        torch.testing.assert_close(out["perplexity"], out["code_perplexity"])


def test_gumbel_noise_survives_an_exponential_draw_of_zero(monkeypatch):
    """exponential_ can return 0: F.gumbel_softmax then gives NaN; ours clamps and stays finite."""
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    logits = torch.randn(4, 8)
    assert torch.isnan(F.gumbel_softmax(logits, tau=1.0, hard=True)).any()            # the trap is real
    obj = _obj().train()
    out = obj(obj.make_views(_chirps(2), generator=_gen()))
    assert torch.isfinite(out["loss"])


# --------------------------------------------------------------------------- the loss

def test_loss_matches_transformers_wav2vec2_for_pretraining():
    """transformers' own forward (steps 1-8 of ``Wav2Vec2ForPreTraining.forward``: projections, the
    quantiser, distractor gathering, cosine logits / 0.1, −inf for distractors equal to the positive,
    cross-entropy summed over the masked frames, diversity × number of masked frames) on our tensors:
    its ``wav2vec2`` submodule is replaced by a stub returning our context c and our quantiser input, and
    the quantiser and both projections get our weights. Training mode, same seed → same Gumbel draws.
    Compared: its contrastive_loss, diversity_loss and loss divided by the number of masked frames N
    against our mean contrastive loss, our diversity loss and our loss minus the feature penalty; its
    perplexity and projected targets against ours."""
    from transformers import Wav2Vec2Config

    obj = _obj(num_negatives=6).train()
    views = obj.make_views(_chirps(4), generator=_gen(2))
    mask, neg = views["mask"], views["negatives"]
    cfg = Wav2Vec2Config(hidden_size=DIM, num_hidden_layers=1, num_attention_heads=4, intermediate_size=DIM,
                         conv_dim=(DIM,), conv_stride=(5,), conv_kernel=(10,), num_codevector_groups=2,
                         num_codevectors_per_group=16, codevector_dim=16, proj_codevector_dim=24, num_negatives=6,
                         contrastive_logits_temperature=0.1, diversity_loss_weight=0.1, feat_quantizer_dropout=0.0)
    hf = _hf().Wav2Vec2ForPreTraining(cfg).train()
    hf.quantizer.load_state_dict(obj.quantizer.state_dict())
    hf.project_q.load_state_dict(obj.project_q.state_dict())
    hf.project_hid.load_state_dict(obj.final_proj.state_dict())
    hf.quantizer.temperature = obj.temperature()
    hf.dropout_features = nn.Identity()

    torch.manual_seed(5)
    out = obj(views)
    torch.manual_seed(5)
    f = obj.features(views["wave"], mask)

    class Stub(nn.Module):
        def forward(self, input_values, attention_mask=None, mask_time_indices=None, **kw):
            return SimpleNamespace(last_hidden_state=f["context"].detach(), extract_features=f["quantizer_input"].detach(),
                                   hidden_states=None, attentions=None)

    hf.wav2vec2 = Stub()
    torch.manual_seed(5)
    ref = hf(views["wave"], mask_time_indices=mask.long(),
             sampled_negative_indices=neg + mask.shape[1] * torch.arange(4)[:, None, None])
    n = int(mask.sum())
    torch.testing.assert_close(ref.codevector_perplexity, out["prob_perplexity"])
    torch.testing.assert_close(ref.projected_quantized_states[mask], obj.project_q(f["codes"])[mask])
    torch.testing.assert_close(ref.contrastive_loss / n, out["contrastive_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.diversity_loss / n, out["diversity_loss"], rtol=1e-6, atol=1e-7)
    assert obj.lam == 0.0                                                              # default: no feature penalty
    torch.testing.assert_close(ref.loss / n, out["loss"].detach(), rtol=1e-5, atol=1e-6)
    # the trap: a mean contrastive loss with the diversity term scaled by N (or a sum with it unscaled)
    wrong = out["contrastive_loss"] + 0.1 * out["diversity_loss"] * n
    assert abs(float(wrong - ref.loss.detach() / n)) > 0.1


def test_loss_matches_a_frame_by_frame_reference():
    obj = _obj(num_negatives=5, feature_penalty=10.0).train()         # the base recipe's λ, to test the term
    views = obj.make_views(_chirps(3), generator=_gen(4))
    mask, neg = views["mask"], views["negatives"]
    torch.manual_seed(9)
    out = obj(views)
    torch.manual_seed(9)
    with torch.no_grad():
        f = obj.features(views["wave"], mask)
        c, q = obj.final_proj(f["context"]), obj.project_q(f["codes"])
        terms = []
        for b in range(3):
            for t in range(mask.shape[1]):
                if not mask[b, t]:
                    continue
                logits = [F.cosine_similarity(c[b, t], q[b, t], dim=0) / 0.1]
                for k in range(5):
                    s = int(neg[b, t, k])
                    same = torch.equal(q[b, s], q[b, t])
                    logits.append(torch.tensor(float("-inf")) if same else F.cosine_similarity(c[b, t], q[b, s], dim=0) / 0.1)
                logits = torch.stack(logits)
                terms.append(torch.logsumexp(logits, 0) - logits[0])
        contrastive = torch.stack(terms).mean()
        # diversity: the softmax (no Gumbel noise) of the quantiser's logits, averaged over masked frames only
        ppl = 0.0
        logits = obj.quantizer.weight_proj(f["quantizer_input"]).view(3, -1, 2, 16)
        for g in range(2):
            probs = [logits[b, t, g].softmax(0) for b in range(3) for t in range(mask.shape[1]) if mask[b, t]]
            avg = torch.stack(probs).mean(0)
            ppl += math.exp(-float((avg * avg.log()).sum()))
        diversity = (32 - ppl) / 32
        z = obj.backbone.local(views["wave"])
        penalty = float(z.pow(2).mean())
    expect = contrastive + 0.1 * diversity + 10.0 * penalty
    torch.testing.assert_close(out["loss"].detach(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["prob_perplexity"], torch.tensor(ppl), rtol=1e-5, atol=1e-5)


def test_distractors_identical_to_the_positive_get_minus_infinity():
    obj = _obj(num_negatives=4).eval()
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 2:8] = True
    codes = torch.randn(1, 12, 16)
    codes[0, 3] = codes[0, 2]                                   # frames 2 and 3 share a code
    neg = torch.zeros(1, 12, 4, dtype=torch.long)
    neg[0, 2:8] = torch.tensor([[3, 4, 5, 3], [2, 2, 4, 5], [5, 6, 7, 2], [4, 6, 7, 2], [7, 4, 5, 5], [6, 6, 4, 5]])
    logits = obj.contrastive_logits(torch.randn(1, 12, DIM), codes, mask, neg)    # rows: masked frames 2..7
    assert logits.shape == (6, 5) and bool(torch.isfinite(logits[:, 0]).all())
    assert torch.isinf(logits[0, 1]) and torch.isinf(logits[0, 4]) and bool(torch.isfinite(logits[0, 2:4]).all())
    assert bool(torch.isinf(logits[1, 1:3]).all()) and bool(torch.isfinite(logits[1, 3:]).all())
    assert bool(torch.isfinite(logits[2:]).all())


def test_temperature_anneals_from_the_step_buffer():
    obj = _obj()
    assert obj.temperature() == 2.0
    obj.set_progress(100_000, 400_000)
    assert obj.temperature() == pytest.approx(2.0 * 0.999995 ** 100_000)
    obj.set_progress(400_000, 400_000)
    assert obj.temperature() == 0.5
    fast = _obj(temperature_decay=0.99, min_temperature=0.3)
    fast.set_progress(50, 100)
    assert fast.temperature() == pytest.approx(2.0 * 0.99 ** 50)
    assert obj(obj.make_views(_chirps(2), generator=_gen()))["temperature"] == 0.5


# --------------------------------------------------------------------------- gradients, precision, learning

def test_gradients_reach_the_backbone_scaled_by_feature_grad_mult():
    """The conv frames get g × the gradient they would get unscaled; the transformer gets all of it."""
    views = _obj().make_views(_chirps(2), generator=_gen())
    grads = {}
    for g in (1.0, 0.1):
        obj = _obj(seed=3, feature_grad_mult=g).train()
        torch.manual_seed(0)
        obj(views)["loss"].backward()
        assert _backbone_trained(obj)
        grads[g] = {k: p.grad.clone() for k, p in obj.backbone.named_parameters()}
        assert obj.mask_emb.grad is not None and obj.quantizer.codevectors.grad is not None
    conv = [k for k in grads[1.0] if k.startswith("front.")]
    ctx = [k for k in grads[1.0] if k.startswith(("ctx.", "pos.", "ctx_norm."))]
    assert conv and ctx
    for k in conv:
        torch.testing.assert_close(grads[0.1][k], 0.1 * grads[1.0][k], rtol=1e-4, atol=1e-7)
    for k in ctx:
        torch.testing.assert_close(grads[0.1][k], grads[1.0][k])


def test_bf16_autocast_gives_a_finite_loss_and_gradients():
    obj = _obj().train()
    views = obj.make_views(_chirps(4), generator=_gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(views)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert _backbone_trained(obj)
    assert all(torch.isfinite(p.grad).all() for p in obj.parameters() if p.grad is not None)


def test_pretext_loss_falls_on_tiny_chirps_without_codebook_collapse():
    obj = _obj(seed=0, num_negatives=10).train()
    opt = torch.optim.AdamW(obj.parameters(), lr=2e-3)
    x = _chirps(8, 8000)
    g = _gen(0)
    log = []
    for step in range(60):
        obj.set_progress(step, 60)
        out = obj(obj.make_views(x, generator=g))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        log.append({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out.items()})
    first = lambda k: sum(r[k] for r in log[:5]) / 5                                 # noqa: E731
    last = lambda k: sum(r[k] for r in log[-5:]) / 5                                 # noqa: E731
    assert last("contrastive_loss") < first("contrastive_loss") - 0.2, (first("contrastive_loss"), last("contrastive_loss"))
    assert last("loss") < first("loss")
    assert last("accuracy") > first("accuracy") + 0.05
    assert last("prob_perplexity") > 16 and last("code_perplexity") > 12              # of G·V = 32; collapse is ~2
