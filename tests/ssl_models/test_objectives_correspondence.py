"""The objectives that learn correspondence from video (clips in, dense features of an image backbone
trained): cycle consistency (the contrastive random walk) and tracking by colorization. Views,
shapes, gradients, each loss against a loop written from the paper's equation, the walk's product
order, and that each learns its pretext task on small synthetic clips."""
from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F

from ssl_models import backbones
from ssl_models.objectives import OBJECTIVES, build
from ssl_models.objectives.colorization_tracking import ColorizationTracking, ab_palette
from ssl_models.objectives.cycle_consistency import EPS, CycleConsistency, round_trips, walk

SIZE = 16          # frames the backbone sees: a ResNet-18's layer3 (small stem) is then 4 × 4 = 16 nodes
HUES = torch.tensor([[230, 40, 40], [40, 90, 230], [40, 200, 60], [230, 200, 30]]) / 255.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _resnet(in_channels: int) -> torch.nn.Module:
    return backbones.build("resnet18", in_channels=in_channels, small_stem=True, width=8)


def _walker(**kw) -> CycleConsistency:
    kw = {"frames": 4, "crop_scale": (1.0, 1.0), "flip_p": 0.5, "embed_dim": 32, **kw}
    return build("cycle_consistency", backbone=_resnet(1), image_size=SIZE, **kw)


def _colorizer(**kw) -> ColorizationTracking:
    kw = {"references": 2, "crop_scale": (1.0, 1.0), "flip_p": 0.5, **kw}
    return build("colorization_tracking", backbone=_resnet(1), image_size=SIZE, **kw)


def _textures(b: int = 16, t: int = 6, seed: int = 1) -> torch.Tensor:
    """Grey clips of a smooth random texture translating by a per-clip velocity of up to 2 px a frame."""
    g = _gen(seed)
    world = F.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(2 * SIZE, 2 * SIZE), mode="bilinear")
    v = torch.randint(-2, 3, (b, 2), generator=g).tolist()
    clips = torch.stack([torch.stack([world[i].roll((k * v[i][0], k * v[i][1]), (1, 2)) for k in range(t)])
                         for i in range(b)])                                           # (B, T, 1, 2S, 2S)
    return (clips[..., :SIZE, :SIZE] * 255).round().to(torch.uint8)


def _mosaics(b: int = 16, t: int = 6, seed: int = 1) -> torch.Tensor:
    """Colour clips: 4 × 4 px blocks of random hue, each pixel of random lightness, translating by up
    to 2 px a frame. A block's colour follows its texture, not its place."""
    g = _gen(seed)
    n = 2 * SIZE // 4
    colour = HUES[torch.randint(0, len(HUES), (b, n, n), generator=g)].permute(0, 3, 1, 2)   # (B, 3, n, n)
    world = F.interpolate(colour, scale_factor=4, mode="nearest") * (0.35 + 0.65 * torch.rand(b, 1, 2 * SIZE, 2 * SIZE,
                                                                                               generator=g))
    v = torch.randint(-2, 3, (b, 2), generator=g).tolist()
    clips = torch.stack([torch.stack([world[i].roll((k * v[i][0], k * v[i][1]), (1, 2)) for k in range(t)])
                         for i in range(b)])                                           # (B, T, 3, 2S, 2S)
    return (clips[..., :SIZE, :SIZE] * 255).round().to(torch.uint8)


def _train(obj, clips: torch.Tensor, steps: int, seed: int, metric: str) -> tuple[list[float], list[float]]:
    """``steps`` Adam steps on fixed clips (fresh views each step); the losses and the metric."""
    opt, g, losses, figures = torch.optim.Adam(obj.parameters(), lr=3e-3), _gen(seed), [], []
    for _ in range(steps):
        out = obj(obj.make_views(clips, generator=g))
        losses.append(float(out["loss"].detach()))
        figures.append(float(out[metric]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return losses, figures


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _every_parameter_has_a_gradient(obj) -> bool:
    """What DistributedDataParallel (no find_unused_parameters) needs: layer4, outside the dense map
    the loss reads, takes part too (with zero gradients)."""
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in obj.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- both

@pytest.mark.parametrize("name, cls, contrastive", [("cycle_consistency", CycleConsistency, True),
                                                    ("colorization_tracking", ColorizationTracking, False)])
def test_registered_documented_and_take_clips(name, cls, contrastive):
    assert OBJECTIVES[name] is cls and cls.name == name and cls.modality == "clip" and cls.contrastive is contrastive
    assert re.search(r"\b(19|20)\d\d\b", cls.__doc__) and "Shapes:" in cls.__doc__
    assert "Shape:" in cls.make_views.__doc__ and "Shape:" in cls.forward.__doc__


@pytest.mark.parametrize("name", ["cycle_consistency", "colorization_tracking"])
def test_under_bf16_autocast_the_walk_and_the_copy_stay_in_float32(name):
    torch.manual_seed(0)
    obj, clips = (_walker(), _textures(4)) if name == "cycle_consistency" else (_colorizer(), _mosaics(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(obj.make_views(clips, generator=_gen()))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert _every_parameter_has_a_gradient(obj)


# --------------------------------------------------------------------------- cycle consistency

def test_cycle_consistency_views_nodes_and_transitions_have_their_shapes():
    obj = _walker(frames=3).eval()
    views = obj.make_views(_textures(4, t=6), generator=_gen())
    assert views["frames"].shape == (4, 3, 1, SIZE, SIZE)
    q, _ = obj.embed(views["frames"])
    assert q.shape == (4, 3, 16, 32) and torch.allclose(q.norm(dim=-1), torch.ones(4, 3, 16))
    forward, backward = obj.transitions(q)
    assert forward.shape == backward.shape == (4, 2, 16, 16)
    assert torch.allclose(forward.sum(-1), torch.ones(4, 2, 16)) and torch.allclose(backward.sum(-1), torch.ones(4, 2, 16))
    with pytest.raises(ValueError, match="at least 3 frames"):
        obj.make_views(_textures(2, t=2))
    with pytest.raises(ValueError, match="0.01-0.05"):
        _walker(temperature=0.0)


def test_the_walk_multiplies_its_steps_in_the_order_it_takes_them():
    """Hand-made nodes: frame t + 1 holds frame t's contents permuted (a different permutation each
    step, so that the order matters: shifts would commute). At a low temperature each step is the
    permutation matrix, and the walk from frame 0 must end, after k steps, where node i's content is
    in frame k: P_k = A_0 A_1 ⋯ A_{k−1}. The reversed product (the published code's bug) does not."""
    n, frames = 6, 5
    g = _gen(2)
    content = [torch.arange(n)]                                                   # content[t][j]: what node j of frame t holds
    for _ in range(frames - 1):
        content.append(content[-1][torch.randperm(n, generator=g)])
    q = torch.stack([F.one_hot(c, n).float() for c in content])[None]              # (1, F, N, N): one-hot codes
    obj = _walker(temperature=0.01).eval()
    forward, backward = obj.transitions(q)                                         # (1, F−1, N, N)
    walks = walk(forward)[0]                                                        # (F−1, N, N)
    reversed_order = False
    for k in range(1, frames):
        expected = (content[k][None, :] == torch.arange(n)[:, None]).float()        # [i, j]: node j of frame k holds i
        assert torch.allclose(walks[k - 1], expected, atol=1e-4)
        reversed_order |= not torch.allclose(functools.reduce(torch.matmul, forward[0, :k].flip(0)), expected, atol=0.1)
    assert reversed_order, "the permutations commute: the test could not tell the orders apart"
    # on exact permutations every palindrome comes home, whatever the order (so that alone tests nothing)
    assert torch.allclose(round_trips(forward, backward)[0], torch.eye(n).expand(frames - 1, n, n), atol=1e-4)


def test_round_trips_are_the_palindromes_products():
    """R_k = A_0 ⋯ A_{k−1} Ā_{k−1} ⋯ Ā_0 on random stochastic matrices, where any other order differs."""
    g = _gen(3)
    forward = torch.softmax(torch.randn(2, 3, 5, 5, generator=g) * 3, -1)
    backward = torch.softmax(torch.randn(2, 3, 5, 5, generator=g) * 3, -1)
    trips = round_trips(forward, backward)
    for k in range(1, 4):
        path = [forward[:, t] for t in range(k)] + [backward[:, t] for t in reversed(range(k))]
        assert torch.allclose(trips[:, k - 1], functools.reduce(torch.matmul, path), atol=1e-6)
    # the published code's order: each next step multiplied on the left
    path = [forward[:, 0], forward[:, 1], backward[:, 1], backward[:, 0]]
    assert not torch.allclose(trips[:, 1], functools.reduce(torch.matmul, path[::-1]), atol=1e-3)


def test_cycle_consistency_loss_matches_a_loop_over_the_papers_equation():
    torch.manual_seed(0)
    obj = _walker(frames=4, temperature=0.05).eval()              # eval: no edge dropout, batch norm fixed
    views = obj.make_views(_textures(3), generator=_gen())
    out = obj(views)
    q = obj.embed(views["frames"])[0].double()                    # (B, F, N, E)
    b, f, n, _ = q.shape

    def step(src, dst):                                           # A[i, j] = exp(src_i·dst_j/τ) / Σ_m exp(src_i·dst_m/τ)
        a = torch.empty(n, n, dtype=torch.float64)
        for i in range(n):
            e = torch.exp(torch.stack([src[i] @ dst[j] for j in range(n)]) / 0.05)
            a[i] = e / e.sum()
        return a

    losses, hits = [], []
    for bi in range(b):
        fwd = [step(q[bi, t], q[bi, t + 1]) for t in range(f - 1)]
        bwd = [step(q[bi, t + 1], q[bi, t]) for t in range(f - 1)]
        for k in range(1, f):
            r = functools.reduce(torch.matmul, fwd[:k] + bwd[:k][::-1])
            losses += [-torch.log(r[i, i] + EPS) for i in range(n)]
            hits += [float(r[i].argmax() == i) for i in range(n)]
    assert torch.allclose(out["loss"].double(), torch.stack(losses).mean(), rtol=1e-4)
    assert float(out["round_trip_accuracy"]) == pytest.approx(_mean(hits), abs=1e-6)


def test_edge_dropout_drops_edges_in_training_only():
    q = F.normalize(torch.randn(2, 3, 16, 8, generator=_gen(4)), dim=-1)
    obj = _walker(edge_dropout=0.3)
    torch.manual_seed(0)
    forward, backward = obj.train().transitions(q)
    dropped = float((forward == 0).float().mean())
    assert 0.2 < dropped < 0.4 and torch.allclose(forward.sum(-1), torch.ones(2, 2, 16))
    assert (obj.eval().transitions(q)[0] > 0).all()
    everything = _walker(edge_dropout=0.99).train().transitions(q)[0]            # rows that lose every edge keep them
    assert torch.isfinite(everything).all() and torch.allclose(everything.sum(-1), torch.ones(2, 2, 16))


def test_cycle_consistency_learns_round_trips_and_trains_the_backbone():
    torch.manual_seed(0)
    obj = _walker(edge_dropout=0.0)
    losses, accuracy = _train(obj, _textures(16), 60, seed=3, metric="round_trip_accuracy")
    assert _every_parameter_has_a_gradient(obj)
    assert any(float(p.grad.abs().sum()) > 0 for p in obj.backbone.net.layer3.parameters())
    assert _mean(losses[-10:]) < 0.6 * _mean(losses[:10])
    assert _mean(accuracy[-10:]) > _mean(accuracy[:10]) + 0.1


# --------------------------------------------------------------------------- tracking by colorization

def test_colorization_tracking_views_show_lightness_and_colour_the_target_last():
    obj = _colorizer(references=3, max_stride=1, flip_p=0.0)
    # a clip whose frame k is flat grey at 20·k + 40: the frames shown must be consecutive, target last
    grey = (20 * torch.arange(8) + 40).to(torch.uint8).view(1, 8, 1, 1, 1).expand(5, 8, 3, SIZE, SIZE).clone()
    views = obj.make_views(grey, generator=_gen())
    assert views["L"].shape == (5, 4, 1, SIZE, SIZE) and views["ab"].shape == (5, 4, 2, SIZE, SIZE)
    level = views["L"].mean(dim=(2, 3, 4))                                          # (B, 4)
    assert (level[:, 1:] > level[:, :-1]).all() and views["ab"].abs().max() < 1e-3   # grey: no colour
    assert views["L"].min() >= -1 and views["L"].max() <= 1
    # evaluation feeds the backbone what training did: the L channel of the (un-augmented) frame
    still = _mosaics(3)[:, :1].expand(3, 6, 3, SIZE, SIZE)                           # a clip that does not move
    shown = obj.make_views(still, generator=_gen())["L"]
    assert torch.allclose(obj.preprocess(still[:, 0])[:, None].expand_as(shown), shown, atol=1e-5)
    assert ColorizationTracking.backbone_channels(3) == 1
    with pytest.raises(ValueError, match="colour clips"):
        ColorizationTracking.backbone_channels(1)
    with pytest.raises(ValueError, match="in_channels=1"):
        build("colorization_tracking", backbone=_resnet(3), image_size=SIZE)
    with pytest.raises(ValueError, match="colour clips"):
        obj.make_views(grey[:, :, :1])


def test_the_palette_is_sixteen_fixed_clusters_that_tell_hues_apart():
    palette = ab_palette()
    assert palette.shape == (16, 2) and torch.equal(palette, ab_palette())
    obj = _colorizer()
    assert torch.equal(obj.palette, palette)
    from ssl_models.color import rgb_to_lab

    ab = rgb_to_lab(torch.cat([HUES, torch.full((1, 3), 0.5)]).T[:, :, None])[1:]  # (2, 5, 1): 4 hues and grey
    clusters = obj.quantize(ab).flatten()
    assert len(set(clusters.tolist())) == 5 and int(clusters[-1]) == 0 and palette[0].norm() < 10  # 0: grey


def test_colorization_tracking_loss_matches_a_loop_over_the_papers_equation():
    torch.manual_seed(0)
    obj = _colorizer(references=2, temperature=1.0).eval()
    b, f, k = 2, 3, 16
    g = _gen(5)
    # colours constant on each 4 × 4 cell of the 4 × 4 feature grid: the references use clusters 0–7, the
    # target 0–9, so some target pixels have a colour no reference has
    cells = torch.cat([torch.randint(0, 8, (b, f - 1, 4, 4), generator=g), torch.randint(0, 10, (b, 1, 4, 4), generator=g)], 1)
    ab = obj.palette[cells].permute(0, 1, 4, 2, 3)                                  # (B, F, 2, 4, 4)
    views = {"L": torch.rand(b, f, 1, SIZE, SIZE, generator=g) * 2 - 1,
             "ab": F.interpolate(ab.flatten(0, 1), scale_factor=4, mode="nearest").view(b, f, 2, SIZE, SIZE)}
    out = obj(views)
    e = obj.embed(views["L"])[0].double()                                          # (B, F, N, E)
    labels = cells.flatten(2)                                                       # (B, F, N)
    losses, hits, copyable, chromatic = [], [], [], []
    for bi in range(b):
        refs = [(e[bi, r, j], int(labels[bi, r, j])) for r in range(f - 1) for j in range(16)]
        for i in range(16):
            scores = torch.stack([e[bi, -1, i] @ ej for ej, _ in refs])             # f_i·f_j / T, T = 1
            attn = torch.exp(scores - scores.max())
            attn = attn / attn.sum()
            p = torch.zeros(k, dtype=torch.float64)
            for a, (_, c) in zip(attn, refs):
                p[c] += a                                                            # Σ_j A_ij onehot(c_j)
            truth = int(labels[bi, -1, i])
            hits.append(float(p.argmax() == truth))
            if truth != 0:
                chromatic.append(hits[-1])
            copyable.append(p[truth] > 0)
            if p[truth] > 0:
                losses.append(-torch.log(p[truth]))
    assert 0 < len(losses) < len(hits)                                              # both kinds of pixel are there
    assert torch.allclose(out["loss"].double(), torch.stack(losses).mean(), rtol=1e-4)
    assert float(out["accuracy"]) == pytest.approx(_mean(hits), abs=1e-6)
    assert float(out["copyable"]) == pytest.approx(_mean([float(c) for c in copyable]), abs=1e-6)
    assert float(out["chromatic_accuracy"]) == pytest.approx(_mean(chromatic), abs=1e-6)


def test_colorization_tracking_learns_to_copy_colours_and_trains_the_backbone():
    torch.manual_seed(0)
    obj = _colorizer(references=2)
    losses, accuracy = _train(obj, _mosaics(16), 60, seed=3, metric="accuracy")
    assert _every_parameter_has_a_gradient(obj)
    assert any(float(p.grad.abs().sum()) > 0 for p in obj.backbone.net.layer3.parameters())
    assert _mean(losses[-10:]) < 0.6 * _mean(losses[:10])
    assert _mean(accuracy[-10:]) > _mean(accuracy[:10]) + 0.15
