"""The seven contrastive objectives: forward/backward, learning on a fixed batch, state updates, checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ssl_models import backbones
from ssl_models.objectives import OBJECTIVES, build
from ssl_models.objectives.byol import BYOL
from ssl_models.objectives.cpc import CPC, CausalRowConv
from ssl_models.objectives.moco import MoCo
from ssl_models.objectives.swav import SwAV
from ssl_models.objectives.triplet import Triplet

torch.set_num_threads(1)

SIDE = 16
NAMES = ["contrastive", "triplet", "simclr", "moco", "byol", "swav", "cpc"]
# Small heads so every test stays fast on two CPU cores.
SMALL = {
    "contrastive": {},
    "triplet": {},
    "simclr": dict(hidden_dim=32, out_dim=16),
    "moco": dict(hidden_dim=32, out_dim=16, queue_size=64),
    "byol": dict(hidden_dim=32, out_dim=16, predictor_hidden_dim=32),
    "swav": dict(hidden_dim=32, out_dim=16, n_prototypes=10, n_local=2, freeze_prototypes_steps=0),
    "cpc": {},
}
LR = {"cpc": 0.01}


def make(name: str, c: int = 1, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    backbone = backbones.build("small_cnn", in_channels=c, width=8)
    return build(name, backbone, image_size=SIDE, **{**SMALL[name], **overrides})


def images(c: int = 1, b: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def views_of(obj, imgs, seed: int = 0):
    return obj.make_views(imgs, generator=torch.Generator().manual_seed(seed))


def sgd(obj, lr=0.05, **kw):
    return torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=lr, momentum=0.9, **kw)


def train(obj, imgs, steps, lr=0.05, **kw):
    opt = sgd(obj, lr, **kw)
    for step in range(steps):
        obj.set_progress(step, steps)
        out = obj(views_of(obj, imgs))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.after_step()
    return out


def test_registry_holds_the_contrastive_objectives():
    for name in NAMES:
        cls = OBJECTIVES[name]
        assert cls.name == name and cls.contrastive is True
        assert "Shape:" in cls.make_views.__doc__ and cls.__doc__ and "(20" in cls.__doc__   # paper with year


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_finite_loss_and_backbone_gradients(name, c):
    obj = make(name, c)
    out = obj(views_of(obj, images(c)))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in obj.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    for key, value in out.items():                         # logged figures are finite numbers
        value = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
        assert value.numel() == 1 and torch.isfinite(value), key


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_and_preprocess(name):
    obj = make(name, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(views_of(obj, images(3)))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    x = obj.preprocess(images(3, b=2))                       # the base class's evaluation input
    assert x.shape == (2, 3, SIDE, SIDE) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_default_build_at_28_px(name):
    backbone = backbones.build("small_cnn", in_channels=1, width=8)
    obj = build(name, backbone, image_size=28)
    views = obj.make_views(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8))
    assert torch.isfinite(obj(views)["loss"])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "moco"])
def test_steps_on_a_fixed_batch_lower_the_loss(name):
    c = 3 if name in ("simclr", "swav") else 1
    obj, imgs = make(name, c), images(c)
    before = obj(views_of(obj, imgs))["loss"].item()
    train(obj, imgs, 30, lr=LR.get(name, 0.05))
    after = obj(views_of(obj, imgs))["loss"].item()
    assert after < 0.8 * before, (before, after)


def test_moco_steps_lower_the_loss_against_the_same_queue():
    # On a fixed batch the queue would fill with keys of the very same images (negatives that are
    # copies of the positives), which no real run sees; keep the queue at its initial, unrelated
    # keys instead, so the test measures what the encoders learn. The queue's own updates are
    # checked in test_moco_queue_takes_the_keys_once_per_step.
    obj, imgs = make("moco", 1, key_bn="none", momentum=0.9), images(1)
    queue0 = obj.queue.clone()
    before = obj(views_of(obj, imgs))["loss"].item()
    opt = sgd(obj)
    for _ in range(30):
        out = obj(views_of(obj, imgs))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.after_step()
        obj.queue.copy_(queue0)
    after = obj(views_of(obj, imgs))["loss"].item()
    assert after < 0.8 * before, (before, after)


# --------------------------------------------------------------------------- MoCo
def test_moco_queue_takes_the_keys_once_per_step():
    obj, imgs = make("moco", 1, key_bn="none"), images(1)
    assert all(not p.requires_grad for p in obj.key_parameters())
    assert torch.allclose(obj.queue.norm(dim=1), torch.ones(64))
    views = views_of(obj, imgs)
    obj(views)["loss"].backward()
    assert int(obj.queue_ptr) == 0                          # forward alone leaves the queue alone
    with torch.no_grad():
        keys = F.normalize(obj.key_projection(obj.key_backbone(views["key"])), dim=1)
    obj.after_step()
    assert int(obj.queue_ptr) == 8
    assert torch.allclose(obj.queue[:8], keys, atol=1e-6)
    obj.after_step()                                        # no forward since: nothing more to enqueue
    assert int(obj.queue_ptr) == 8
    obj.eval()
    obj(views)
    obj.after_step()                                        # evaluation forwards are not enqueued
    assert int(obj.queue_ptr) == 8
    obj.train()
    for _ in range(8):                                      # wraps around the 64 slots
        obj(views)
        obj.after_step()
    assert int(obj.queue_ptr) == (8 + 8 * 8) % 64


def test_moco_momentum_update_and_local_shuffle():
    obj = make("moco", 1, momentum=0.5)
    before = [p.detach().clone() for p in obj.key_parameters()]
    with torch.no_grad():
        for p in obj.query_parameters():
            p.add_(1.0)
    obj.after_step()
    for k, k0, q in zip(obj.key_parameters(), before, obj.query_parameters()):
        assert torch.allclose(k, 0.5 * k0 + 0.5 * q)
    # The single-process shuffle returns keys in the original order: with the model in eval mode
    # (BatchNorm on running statistics) shuffled and plain keys are identical.
    obj.eval()
    x = views_of(obj, images(1))["key"]
    assert torch.allclose(obj._keys_shuffled_locally(x), obj._encode_keys(x), atol=1e-6)


# --------------------------------------------------------------------------- BYOL
def test_byol_momentum_schedule_and_target_update():
    obj = make("byol", 1, momentum_base=0.9)
    assert all(not p.requires_grad for p in obj.target_backbone.parameters())
    obj.set_progress(0, 10)
    assert obj.current_momentum() == pytest.approx(0.9)
    obj.set_progress(5, 10)
    assert obj.current_momentum() == pytest.approx(0.95)
    obj.set_progress(10, 10)
    assert obj.current_momentum() == pytest.approx(1.0)
    online = list(obj.backbone.parameters()) + list(obj.projection.parameters())
    target = list(obj.target_backbone.parameters()) + list(obj.target_projection.parameters())
    assert all(torch.equal(t, o) for t, o in zip(target, online))     # a copy at the start
    train(obj, images(1), 3)
    assert any(not torch.allclose(t, o) for t, o in zip(target, online))
    obj.set_progress(0, 10)
    t0 = [t.detach().clone() for t in target]
    obj.after_step()
    for t, t_old, o in zip(target, t0, online):
        assert torch.allclose(t, 0.9 * t_old + 0.1 * o, atol=1e-6)


# --------------------------------------------------------------------------- SwAV
def test_swav_prototypes_frozen_then_trained_and_unit_norm():
    obj, imgs = make("swav", 3, freeze_prototypes_steps=3), images(3)
    w0 = obj.prototypes.layer.weight.detach().clone()
    opt = sgd(obj, weight_decay=1e-2)
    for step in range(6):
        out = obj(views_of(obj, imgs))
        opt.zero_grad()
        out["loss"].backward()
        w = obj.prototypes.layer.weight
        if step < 3:
            assert out["prototypes_frozen"] == 1.0
            assert w.grad is not None and torch.count_nonzero(w.grad) == 0
        opt.step()
        obj.after_step()
        assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-5)
        if step < 3:      # weight decay only rescales a frozen C; the renormalisation undoes it
            assert torch.allclose(w, w0, atol=1e-6)
    assert int(obj.step) == 6 and out["prototypes_frozen"] == 0.0
    assert not torch.allclose(obj.prototypes.layer.weight, w0, atol=1e-4)


def test_swav_queue_starts_fills_and_is_used():
    obj, imgs = make("swav", 1, queue_length=16, queue_start_steps=2), images(1)
    opt = sgd(obj)
    used = []
    for step in range(6):
        out = obj(views_of(obj, imgs))
        used.append(out["queue_in_use"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        obj.after_step()
        if step == 1:
            assert int(obj.queue_filled) == 0               # not started yet
    # Filled at steps 2 and 3 (8 + 8 = 16 rows), used from step 4 on.
    assert used == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(obj.queue.norm(dim=2), torch.ones(2, 16), atol=1e-5)


def test_swav_views_are_multi_crop():
    obj = make("swav", 1, n_local=3, local_size=8)
    v = views_of(obj, images(1))
    assert v["global"].shape == (2, 8, 1, SIDE, SIDE) and v["local"].shape == (3, 8, 1, 8, 8)


# --------------------------------------------------------------------------- Triplet, CPC
def test_triplet_random_negatives_are_other_images():
    obj = make("triplet", 1, mining="random")
    v = views_of(obj, images(1))
    for key in ("negative1", "negative2"):
        assert (v[key] != torch.arange(8)).all() and v[key].min() >= 0 and v[key].max() < 8
    assert torch.isfinite(obj(v)["loss"])
    with pytest.raises(ValueError, match="mining"):
        make("triplet", 1, mining="semi_hard")


def test_cpc_grid_geometry_and_causal_context():
    obj = make("cpc", 1)
    assert (obj.patch_size, obj.stride, obj.grid) == (8, 4, 3)
    assert CPC(backbones.build("small_cnn", in_channels=1, width=8), image_size=28).grid == 6
    assert views_of(obj, images(1))["patches"].shape == (8, 3, 3, 1, 8, 8)
    ctx = CausalRowConv(4, 4, layers=2, kernel_rows=2)
    z = torch.randn(2, 4, 5, 5)
    z2 = z.clone()
    z2[:, :, 3:] += 1.0                                     # change rows 3 and 4 only
    c1, c2 = ctx(z), ctx(z2)
    assert torch.allclose(c1[:, :, :3], c2[:, :, :3])      # rows 0-2 never see rows below
    assert not torch.allclose(c1[:, :, 3:], c2[:, :, 3:])


# --------------------------------------------------------------------------- checkpoints, checks
@pytest.mark.parametrize("name", ["moco", "byol", "swav"])
def test_state_dict_round_trip_restores_queues_and_momentum_encoders(name):
    kw = dict(queue_length=16, queue_start_steps=0) if name == "swav" else {}
    if name == "moco":
        kw = dict(key_bn="none")
    obj, imgs = make(name, 1, **kw), images(1)
    train(obj, imgs, 3)
    state = copy.deepcopy(obj.state_dict())
    fresh = make(name, 1, seed=99, **kw)
    fresh.load_state_dict(state)
    for key, value in obj.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if name == "moco":
        assert int(fresh.queue_ptr) == 24 and torch.equal(fresh.queue, obj.queue)
    if name == "swav":
        assert int(fresh.queue_filled) == 16 and int(fresh.step) == 3
    obj.eval(), fresh.eval()
    v = views_of(obj, imgs)
    assert torch.allclose(obj(v)["loss"], fresh(v)["loss"])


def test_argument_checks_say_how_to_fix():
    with pytest.raises(ValueError, match="in_channels=3"):
        make("simclr", 1).make_views(images(3))
    with pytest.raises(ValueError, match="key_bn"):
        make("moco", 1, key_bn="ghost")
    with pytest.raises(ValueError, match="temperature"):
        make("simclr", 1, temperature=0)
    with pytest.raises(ValueError, match="prediction_steps"):
        make("cpc", 1, prediction_steps=5)
    with pytest.raises(ValueError, match="unknown view option"):
        make("simclr", 1, view={"sise": 12})
    assert make("simclr", 1, view={"size": 12, "blur_p": 0.0}).view_config.size == 12
    assert isinstance(make("moco", 1), MoCo) and isinstance(make("byol", 1), BYOL)
    assert isinstance(make("swav", 1), SwAV) and isinstance(make("triplet", 1), Triplet)
