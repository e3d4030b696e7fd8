"""The objectives that learn from time (clips in, an image backbone trained): views, shapes,
gradients, and that each learns its pretext task where the task is well posed."""
from __future__ import annotations

import re

import pytest
import torch

from ssl_models import backbones
from ssl_models.augment import prepare_clips
from ssl_models.objectives import OBJECTIVES, build
from ssl_models.objectives.arrow_of_time import ArrowOfTime

SIZE = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fading(b: int = 16, t: int = 8, c: int = 1) -> torch.Tensor:
    """Clips whose bright square fades over time (irreversible): frame k at 240 − 25·k, at a random place."""
    g = _gen(1)
    clips = torch.zeros(b, t, c, SIZE, SIZE, dtype=torch.uint8)
    for i in range(b):
        y, x = torch.randint(0, SIZE - 6, (2,), generator=g).tolist()
        for k in range(t):
            clips[i, k, :, y:y + 6, x:x + 6] = 240 - 25 * k
    return clips


def _train(obj, clips: torch.Tensor, steps: int, seed: int) -> tuple[list[float], dict]:
    """``steps`` Adam steps on fixed clips (fresh views each step); the losses and the last outputs."""
    opt, g, losses = torch.optim.Adam(obj.parameters(), lr=3e-3), _gen(seed), []
    for _ in range(steps):
        out = obj(obj.make_views(clips, generator=g))
        losses.append(float(out["loss"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return losses, out


def _backbone_trained(obj) -> bool:
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    return bool(grads) and sum(float(x.abs().sum()) for x in grads) > 0


def test_clip_views_draw_one_crop_and_flip_per_clip():
    clips = torch.arange(2 * 3 * 1 * 8 * 8, dtype=torch.float32).view(2, 3, 1, 8, 8) / 400  # every frame differs
    out = prepare_clips(clips, 8, crop_scale=(0.3, 0.6), flip_p=0.5, generator=_gen())
    assert out.shape == (2, 3, 1, 8, 8)
    # the crop of frame k is frame 0's crop shifted by the same offset: one geometry per clip
    shift = (clips[:, 1] - clips[:, 0]).mean()
    assert torch.allclose(out[:, 1] - out[:, 0], torch.full_like(out[:, 0], float(shift)), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        prepare_clips(clips[0], 8)


def test_arrow_of_time_is_registered_documented_and_takes_clips():
    cls = OBJECTIVES["arrow_of_time"]
    assert cls is ArrowOfTime and cls.modality == "clip" and cls.contrastive is False
    assert re.search(r"\b(19|20)\d\d\b", cls.__doc__) and "Shape:" in cls.make_views.__doc__
    assert OBJECTIVES["simclr"].modality == "image"


def test_arrow_of_time_reverses_half_the_clips_and_labels_them():
    obj = build("arrow_of_time", backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE,
                frames=4, max_stride=2, crop_scale=(1.0, 1.0), flip_p=0.0)
    views = obj.make_views(_fading(64), generator=_gen())
    frames, labels = views["frames"], views["labels"]
    assert frames.shape == (64, 4, 1, SIZE, SIZE) and labels.shape == (64,)
    assert 16 < int(labels.sum()) < 48
    brightness = frames.amax(dim=(2, 3, 4))                       # (B, F): the square's value per frame
    falling = (brightness[:, 1:] < brightness[:, :-1]).all(1)
    rising = (brightness[:, 1:] > brightness[:, :-1]).all(1)
    assert torch.equal(falling, labels == 0) and torch.equal(rising, labels == 1)
    with pytest.raises(ValueError, match="at least 4 frames"):
        obj.make_views(_fading(2, t=3))


def test_arrow_of_time_learns_the_direction_of_irreversible_clips():
    torch.manual_seed(0)
    obj = build("arrow_of_time", backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE,
                frames=4, head_hidden_dim=32, crop_scale=(0.8, 1.0))
    losses, _ = _train(obj, _fading(32), 60, seed=3)
    assert _backbone_trained(obj)
    obj.eval()
    with torch.no_grad():
        acc = float(obj(obj.make_views(_fading(64), generator=_gen(9)))["accuracy"])
    assert losses[-1] < losses[0] and acc > 0.9


def _ramp(b: int = 32, t: int = 8) -> torch.Tensor:
    """Frame k of every clip is flat at 20·k + 20: a frame's value says which frame it is."""
    return (20 * torch.arange(1, t + 1, dtype=torch.uint8)).view(1, t, 1, 1, 1).expand(b, t, 1, SIZE, SIZE).clone()


def _shown(views) -> torch.Tensor:
    """Which frame each shown frame is (from its value). Shape: (B, K)."""
    v = views["frames"].amax(dim=(2, 3, 4))            # normalised (x − 0.5) / 0.5
    return torch.round(((v * 0.5 + 0.5) * 255 - 20) / 20).long()


def _plain(name: str, **kw):
    return build(name, backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE,
                 crop_scale=(1.0, 1.0), flip_p=0.0, **kw)


def test_shuffle_and_learn_puts_an_outside_frame_in_the_middle_of_negatives():
    obj = _plain("shuffle_and_learn")
    views = obj.make_views(_ramp(64), generator=_gen())
    idx, labels = _shown(views), views["labels"]
    assert views["frames"].shape == (64, 3, 1, SIZE, SIZE) and 16 < int(labels.sum()) < 48
    between = (idx[:, 0] < idx[:, 1]) & (idx[:, 1] < idx[:, 2])
    assert torch.equal(between, labels == 1) and (idx[:, 0] < idx[:, 2]).all()


def test_temporal_order_shows_four_frames_in_the_order_of_their_class():
    from ssl_models.objectives.temporal_order import order_classes

    orders = order_classes(4)
    assert orders.shape == (12, 4) and len({tuple(o) for o in orders} | {tuple(o.flip(0)) for o in orders}) == 24
    obj = _plain("temporal_order")
    views = obj.make_views(_ramp(64), generator=_gen())
    idx, labels = _shown(views), views["labels"]
    rank = idx.argsort(dim=1).argsort(dim=1)                     # the order shown, as ranks in time
    for r, c in zip(rank, labels):
        assert torch.equal(r, orders[c]) or torch.equal(r, orders[c].flip(0))
    assert len(set(labels.tolist())) > 6


@pytest.mark.parametrize("name", ["shuffle_and_learn", "temporal_order"])
def test_the_order_objectives_lower_their_loss_and_train_the_backbone(name):
    torch.manual_seed(0)
    kw = {"head_hidden_dim": 32} if name == "shuffle_and_learn" else {"pair_dim": 32}
    obj = build(name, backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE, **kw)
    cls = OBJECTIVES[name]
    assert cls.modality == "clip" and re.search(r"\b(19|20)\d\d\b", cls.__doc__) and "Shape:" in cls.forward.__doc__
    losses, _ = _train(obj, _fading(32), 50, seed=3)
    assert _backbone_trained(obj) and sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_tcn_takes_the_same_moment_from_the_second_camera_and_a_distant_negative():
    obj = _plain("tcn", negative_gap=3)
    assert OBJECTIVES["tcn"].takes_views and re.search(r"\b(19|20)\d\d\b", OBJECTIVES["tcn"].__doc__)
    cam1, cam2 = _ramp(64), _ramp(64) // 2                       # camera 2: the same frames, darker
    views = obj.make_views(torch.stack([cam1, cam2], 1), generator=_gen())
    value = lambda x: torch.round((x.amax(dim=(1, 2, 3)) * 0.5 + 0.5) * 255)  # noqa: E731
    a, p, n = value(views["anchor"]), value(views["positive"]), value(views["negative"])
    assert torch.equal(p, torch.floor(a / 2))                      # the same frame, seen by camera 2
    assert ((a - n).abs() >= 3 * 20).all()                          # at least 3 frames away
    single = obj.make_views(cam1, generator=_gen())                # one camera: a neighbouring frame
    a, p = value(single["anchor"]), value(single["positive"])
    assert ((a - p).abs() <= 20).all()


def test_tcn_learns_to_bring_the_two_cameras_together():
    torch.manual_seed(0)
    obj = build("tcn", backbone=backbones.build("small_cnn", in_channels=1, width=8), image_size=SIZE,
                negative_gap=3, embed_dim=16)
    clips = _fading(32)
    two = torch.stack([clips, (clips.float() * 0.7).to(torch.uint8)], 1)
    losses, out = _train(obj, two, 50, seed=4)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10 and float(out["triplet_accuracy"]) > 0.7
