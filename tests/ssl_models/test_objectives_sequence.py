"""The objectives that model a sequence: the composite LSTM (frames of a clip) and image GPT (pixels
of an image). Views and shapes, gradients into the backbone, the loss against a step-by-step
reference, causality (what each output may see), and that the pretext loss falls on tiny data."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from ssl_models import backbones
from ssl_models.augment import normalize_input
from ssl_models.gpt import ImageGPT, grid_palette, rgb332_palette
from ssl_models.objectives import OBJECTIVES, build
from ssl_models.objectives.composite_lstm import CompositeLSTM
from ssl_models.objectives.igpt import IGPT

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _backbone_trained(obj) -> bool:
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    return bool(grads) and sum(float(x.abs().sum()) for x in grads) > 0


def test_registry_holds_both_documented():
    for name, cls, modality in [("composite_lstm", CompositeLSTM, "clip"), ("igpt", IGPT, "image")]:
        assert OBJECTIVES[name] is cls and cls.name == name and cls.modality == modality and not cls.contrastive
        assert re.search(r"\b(19|20)\d\d\b", cls.__doc__) and "Shape" in cls.__doc__
        assert "Shape:" in cls.make_views.__doc__ and "Shape:" in cls.forward.__doc__
    assert "igpt_tiny" in backbones.BACKBONES


# --------------------------------------------------------------------------- composite LSTM

def _ramp(b: int = 8, t: int = 12) -> torch.Tensor:
    """Frame k of every clip is flat at 20·k + 20: a frame's value says which frame it is."""
    return (20 * torch.arange(1, t + 1, dtype=torch.uint8)).view(1, t, 1, 1, 1).expand(b, t, 1, SIZE, SIZE).clone()


def _moving(b: int = 16, t: int = 8) -> torch.Tensor:
    """A bright 4 px square moving one pixel per frame in a random direction, from a random place."""
    g = _gen(1)
    clips = torch.zeros(b, t, 1, SIZE, SIZE, dtype=torch.uint8)
    for i in range(b):
        vy, vx = (torch.randint(0, 3, (2,), generator=g) - 1).tolist()
        lo = lambda v: t - 1 if v < 0 else 0                                    # noqa: E731 - stays inside
        hi = lambda v: SIZE - 4 - (t - 1 if v > 0 else 0)                       # noqa: E731
        y0, x0 = (int(torch.randint(lo(v), hi(v) + 1, (1,), generator=g)) for v in (vy, vx))
        for k in range(t):
            y, x = y0 + vy * k, x0 + vx * k
            clips[i, k, :, y:y + 4, x:x + 4] = 240
    return clips


def _lstm(seed: int = 0, **kw) -> CompositeLSTM:
    torch.manual_seed(seed)
    kw = {"context": 3, "future": 2, "hidden_dim": 16, "decoder_width": 8, "crop_scale": (1.0, 1.0), "flip_p": 0.0,
          **kw}
    return build("composite_lstm", backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE,
                 **kw)


def test_composite_lstm_takes_consecutive_frames_and_decodes_frames():
    obj = _lstm()
    views = obj.make_views(_ramp(), generator=_gen())
    frames = views["frames"]
    assert frames.shape == (8, 5, 1, SIZE, SIZE) and frames.min() >= 0 and frames.max() <= 1
    idx = torch.round((frames.amax(dim=(2, 3, 4)) * 255 - 20) / 20).long()          # (B, 5): which frame
    assert torch.equal(idx - idx[:, :1], torch.arange(5).expand(8, 5))               # consecutive
    assert len(set(idx[:, 0].tolist())) > 1 and int(idx.max()) <= 11                 # random start, inside the clip
    rec, pred = obj.decode(views)
    assert rec.shape == (8, 3, 1, SIZE, SIZE) and pred.shape == (8, 2, 1, SIZE, SIZE)
    out = obj(views)
    assert set(out) == {"loss", "reconstruction_loss", "prediction_loss"}
    out["loss"].backward()
    assert _backbone_trained(obj)
    with pytest.raises(ValueError, match="at least context \\+ future = 5 frames"):
        obj.make_views(_ramp(2, t=4))


def _bce(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(z) against t in [0, 1], written out, mean over everything."""
    return -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).mean()


def test_composite_lstm_loss_matches_a_step_by_step_reference():
    obj = _lstm(context=3, future=2).eval()                  # eval: BatchNorm independent of the batch split
    x = obj.make_views(_moving(4), generator=_gen())["frames"]                   # (B, 5, 1, S, S)
    with torch.no_grad():
        out = obj({"frames": x})
        f = obj.backbone(normalize_input(x.flatten(0, 1))).view(4, 5, -1)      # (B, 5, D)
        _, state = obj.encoder(f[:, :3])

        def unroll(lstm, decoder, targets):
            h, prev, logits = state, torch.zeros_like(f[:, 0]), []
            for j in targets:                                 # one step at a time, the true previous frame fed in
                y, h = lstm(prev[:, None], h)
                logits.append(decoder(y[:, 0]).view(4, 1, SIZE, SIZE))
                prev = f[:, j]
            return torch.stack(logits, 1), x[:, targets]

        rec, rec_t = unroll(obj.reconstructor, obj.reconstruct_frame, [2, 1, 0])  # x_3, x_2, x_1
        pred, pred_t = unroll(obj.predictor, obj.predict_frame, [3, 4])          # x_4, x_5
    torch.testing.assert_close(out["reconstruction_loss"], _bce(rec, rec_t))
    torch.testing.assert_close(out["prediction_loss"], _bce(pred, pred_t))
    torch.testing.assert_close(out["loss"], _bce(rec, rec_t) + _bce(pred, pred_t))


@pytest.mark.parametrize("conditional", [True, False])
def test_composite_lstm_decoders_see_the_previous_target_only_when_conditional(conditional):
    obj = _lstm(context=3, future=3, conditional=conditional).eval()
    x = obj.make_views(_moving(2), generator=_gen())["frames"]                   # (B, 6, 1, S, S)
    y = x.clone()
    y[:, 3] = 1.0 - y[:, 3]                                                      # change the first future frame
    with torch.no_grad():
        (rec_x, pred_x), (rec_y, pred_y) = obj.decode({"frames": x}), obj.decode({"frames": y})
    torch.testing.assert_close(rec_x, rec_y)                                     # the encoder never saw it
    torch.testing.assert_close(pred_x[:, 0], pred_y[:, 0])                       # step 1 predicts it
    assert (not torch.allclose(pred_x[:, 1:], pred_y[:, 1:])) == conditional   # steps 2, 3 are told it


def test_composite_lstm_learns_to_reconstruct_and_predict_moving_squares():
    obj = _lstm(context=4, future=4, hidden_dim=32, flip_p=0.5)
    clips, g = _moving(16), _gen(3)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    rec, pred = [], []
    for _ in range(40):
        out = obj(obj.make_views(clips, generator=g))
        rec.append(float(out["reconstruction_loss"]))
        pred.append(float(out["prediction_loss"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert _backbone_trained(obj)
    x = obj.make_views(clips, generator=g)["frames"]
    m = x.mean(dim=(0, 1), keepdim=True).clamp(1e-4, 1 - 1e-4)                  # the mean frame, pixel by pixel
    mean_frame = float(_bce(torch.logit(m).expand_as(x), x))                     # what ignores where the square is
    for losses in (rec, pred):
        assert sum(losses[-5:]) / 5 < min(0.4 * sum(losses[:5]) / 5, 0.8 * mean_frame), (losses, mean_frame)


# --------------------------------------------------------------------------- image GPT

def _gpt(channels: int = 1, seed: int = 0, **kw) -> ImageGPT:
    torch.manual_seed(seed)
    return ImageGPT(in_channels=channels, seq_size=8, dim=32, depth=2, heads=2, **kw)


def _shapes(b: int = 32) -> torch.Tensor:
    """Grey images: a bright rectangle of random size and place on a dark background."""
    g = _gen(2)
    images = torch.full((b, 1, SIZE, SIZE), 10, dtype=torch.uint8)
    for i in range(b):
        h, w = torch.randint(4, 9, (2,), generator=g).tolist()
        y, x = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
        images[i, :, y:y + h, x:x + w] = 230
    return images


def test_palettes_and_tokens():
    assert grid_palette(1, 16).shape == (16, 1) and grid_palette(3, 8).shape == (512, 3)
    p332 = rgb332_palette()
    assert p332.shape == (256, 3) and len({tuple(c) for c in p332.tolist()}) == 256
    assert _gpt(1).vocab_size == 16 and _gpt(3).vocab_size == 256 and _gpt(3, levels=8).vocab_size == 512
    gpt = _gpt(1)
    # flat 2×2 blocks (pooled exactly) at grey value v in [0, 1]: token round(15 v), from the normalised image
    v = torch.rand(3, 1, 8, 8, generator=_gen())
    x = normalize_input(v.repeat_interleave(2, 2).repeat_interleave(2, 3))          # (3, 1, 16, 16)
    tokens = gpt.tokenize(x)
    assert tokens.shape == (3, 64) and torch.equal(tokens, torch.round(v.flatten(1) * 15).long())
    assert (gpt.colours(tokens) - v).abs().max() <= 1 / 30 + 1e-6
    rgb = _gpt(3)
    c = torch.rand(2, 3, 16, 16, generator=_gen(1))
    colours = rgb.colours(rgb.tokenize(normalize_input(c)))
    assert (colours - F.adaptive_avg_pool2d(c, 8)).abs().amax(dim=(0, 2, 3)).tolist() <= [1 / 14 + 1e-6] * 2 + [1 / 6 + 1e-6]
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        gpt.tokenize(torch.zeros(2, 3, 16, 16))


def test_igpt_logits_are_causal_and_the_probe_features_agree():
    gpt = _gpt(1).eval()
    tokens = torch.randint(0, 16, (2, 64), generator=_gen())
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 5) % 16
    with torch.no_grad():
        (a, fa), (b, _) = gpt.forward_tokens(tokens), gpt.forward_tokens(changed)
    assert a.shape == (2, 64, 16) and fa.shape == (2, 32)
    torch.testing.assert_close(a[:, :21], b[:, :21])          # logits of pixels ≤ 20 do not see pixel 20
    assert not torch.allclose(a[:, 21], b[:, 21])
    images = _shapes(4)
    obj = IGPT(gpt, image_size=SIZE)
    x = obj.preprocess(images)
    with torch.no_grad():                                     # evaluation's path = the training pass's probe
        feats = gpt(x)
        torch.testing.assert_close(feats, gpt.forward_tokens(gpt.tokenize(x))[1])
        torch.testing.assert_close(gpt.feature_maps(x)[-1].mean((2, 3)), feats)
    assert feats.shape == (4, gpt.feature_dim) and gpt.feature_maps(x)[0].shape == (4, 32, 8, 8)


def test_igpt_loss_is_the_next_pixel_cross_entropy_and_trains_the_whole_transformer():
    obj = IGPT(_gpt(1), image_size=SIZE, flip_p=0.0)
    views = obj.make_views(_shapes(8), generator=_gen())
    assert views["images"].shape == (8, 1, SIZE, SIZE)
    torch.testing.assert_close(views["images"], obj.preprocess(_shapes(8)))   # what evaluation feeds the backbone
    out = obj(views)
    tokens = obj.backbone.tokenize(views["images"])
    logits, _ = obj.backbone.forward_tokens(tokens)
    log_p = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]           # (B, N)
    torch.testing.assert_close(out["loss"], -log_p.mean())
    torch.testing.assert_close(out["bits_per_pixel"], -log_p.mean().detach() / torch.log(torch.tensor(2.0)))
    out["loss"].backward()
    gpt = obj.backbone
    for p in (gpt.tok_embed.weight, gpt.pos_embed, gpt.blocks[0].attn.qkv.weight, gpt.blocks[-1].mlp[0].weight,
              gpt.head.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_igpt_refuses_other_backbones_and_upsampling():
    with pytest.raises(ValueError, match="ImageGPT backbone"):
        IGPT(backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE)
    with pytest.raises(ValueError, match="pooled down to it, never up"):
        IGPT(ImageGPT(in_channels=1, seq_size=12, dim=32, depth=1, heads=2), image_size=10)


def test_igpt_learns_to_predict_the_next_pixel_of_simple_shapes():
    obj = IGPT(_gpt(1, seed=1), image_size=SIZE, flip_p=0.5)
    images, g = _shapes(32), _gen(3)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        out = obj(obj.make_views(images, generator=g))
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    counts = torch.bincount(obj.backbone.tokenize(obj.preprocess(images)).flatten()).float()
    p = counts[counts > 0] / counts.sum()
    marginal = float(-(p * p.log()).sum())             # the best loss that ignores the pixels before
    assert sum(losses[-5:]) / 5 < min(0.3 * sum(losses[:5]) / 5, 0.8 * marginal), (losses, marginal)
