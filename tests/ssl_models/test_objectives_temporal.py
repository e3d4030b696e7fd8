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
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    clips, g = _fading(32), _gen(3)
    first = None
    for _ in range(60):
        out = obj(obj.make_views(clips, generator=g))
        first = first if first is not None else float(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(x.abs().sum()) for x in grads) > 0
    obj.eval()
    with torch.no_grad():
        acc = float(obj(obj.make_views(_fading(64), generator=_gen(9)))["accuracy"])
    assert float(out["loss"]) < first and acc > 0.9
