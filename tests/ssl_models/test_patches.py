"""The ops the predictive objectives are built on (ssl_models.tiles, rng, augment's light view, MAE's
patches and masking, jigsaw's permutations, the denoising corruptions) and ssl_models.color.

References are written plainly here (slicing, loops, textbook formulas), not with the vectorised
code under test.
"""
import itertools
import random

import pytest
import torch

from ssl_models import augment, color as C, tiles as T, vit
from ssl_models.objectives import denoising_autoencoder, jigsaw, mae

torch.set_num_threads(1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- patchify / masking

def test_patchify_matches_slicing_and_round_trips():
    x = torch.rand(2, 3, 8, 12, generator=_gen())
    seq = mae.patchify(x, 4)
    assert seq.shape == (2, 6, 4 * 4 * 3)
    # patch 4 = grid row 1, column 1 (3 columns); flattened as (row, column, channel)
    plain = x[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1)
    assert torch.equal(seq[1, 4], plain)
    assert torch.equal(mae.unpatchify(seq, 4, 3, grid=(2, 3)), x)
    sq = torch.rand(2, 1, 8, 8, generator=_gen(1))
    assert torch.equal(mae.unpatchify(mae.patchify(sq, 2), 2, 1), sq)
    with pytest.raises(ValueError, match="divisible"):
        mae.patchify(x, 5)


@pytest.mark.parametrize("N,ratio,masked", [(49, 0.75, 37), (64, 0.75, 48), (10, 0.9, 9), (16, 0.5, 8)])
def test_random_masking_exact_ratio(N, ratio, masked):
    ids_keep, mask, ids_restore = vit.random_masking(5, N, ratio, generator=_gen())
    assert mask.shape == (5, N) and ids_keep.shape == (5, N - masked)
    assert (mask.sum(dim=1) == masked).all()
    for b in range(5):
        assert (mask[b, ids_keep[b]] == 0).all()                       # kept patches are visible
        assert sorted(ids_restore[b].tolist()) == list(range(N))       # a permutation
    again = vit.random_masking(5, N, ratio, generator=_gen())
    assert torch.equal(again[1], mask)                                  # seeded → same mask
    noise = torch.rand(5, N, generator=_gen(3))
    keep_from_noise = vit.random_masking(5, N, ratio, noise=noise)[0]
    assert torch.equal(keep_from_noise.sort(dim=1).values, noise.argsort(dim=1)[:, : N - masked].sort(dim=1).values)
    with pytest.raises(ValueError, match="mask ratio"):
        vit.random_masking(2, 4, 1.0)


def test_patch_grid_tiles_are_the_plain_crops_without_jitter():
    x = torch.rand(3, 2, 28, 28, generator=_gen())
    tiles, coords = T.patch_grid(x, grid=3, patch=7, gap=2, jitter=0, generator=_gen(1), return_coords=True)
    assert tiles.shape == (3, 9, 2, 7, 7) and coords.shape == (3, 9, 2)
    for b in range(3):
        r0, c0 = coords[b, 0].tolist()
        for i in range(3):
            for j in range(3):
                t = 3 * i + j
                r, c = r0 + i * 9, c0 + j * 9          # nominal grid: step = patch + gap
                assert coords[b, t].tolist() == [r, c]
                assert torch.equal(tiles[b, t], x[b, :, r:r + 7, c:c + 7])


def test_patch_grid_jitter_stays_in_bounds_and_crops_match():
    x = torch.rand(4, 1, 32, 32, generator=_gen())
    tiles, coords = T.patch_grid(x, grid=3, patch=8, gap=2, jitter=2, generator=_gen(2), return_coords=True)
    assert coords.min() >= 0 and coords.max() <= 32 - 8
    for b in range(4):
        for t in range(9):
            r, c = coords[b, t].tolist()
            assert torch.equal(tiles[b, t], x[b, :, r:r + 8, c:c + 8])
        # neighbours along a row are one step (patch + gap = 10) apart, give or take 2·jitter
        steps = (coords[b].view(3, 3, 2)[:, 1:, 1] - coords[b].view(3, 3, 2)[:, :-1, 1]).flatten()
        assert ((steps >= 10 - 4) & (steps <= 10 + 4)).all()
    jittered = T.patch_grid(x, 3, 8, 2, 2, generator=_gen(2))
    assert torch.equal(jittered, tiles)                                          # seeded
    with pytest.raises(ValueError, match="needs"):
        T.patch_grid(x, grid=3, patch=10, gap=2, jitter=1)


# --------------------------------------------------------------------------- Hamming permutations

def _pairwise_hamming(perms):
    rows = [tuple(p) for p in perms.tolist()]
    return [sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(rows, 2)]


def test_hamming_set_is_valid_distinct_deterministic_and_spread():
    perms = jigsaw.hamming_permutations(100, 9, seed=0)
    assert perms.shape == (100, 9) and perms.dtype == torch.long
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 100
    assert torch.equal(perms, jigsaw.hamming_permutations(100, 9, seed=0))
    rng = random.Random(0)
    random_set = torch.tensor([rng.sample(range(9), 9) for _ in range(100)])
    d_greedy, d_random = _pairwise_hamming(perms), _pairwise_hamming(random_set)
    assert min(d_greedy) > min(d_random)
    assert sum(d_greedy) / len(d_greedy) >= sum(d_random) / len(d_random)


def _greedy_reference(n_perms, n_tiles, first, criterion):
    """The greedy selection written with loops over all permutations (lexicographic order)."""
    every = list(itertools.permutations(range(n_tiles)))
    chosen = [every[first]]
    while len(chosen) < n_perms:
        best, best_key = None, None
        for cand in every:
            if cand in chosen:
                continue
            ds = [sum(a != b for a, b in zip(cand, c)) for c in chosen]
            key = (min(ds), sum(ds)) if criterion == "maximin" else (sum(ds),)
            if best_key is None or key > best_key:          # strict: first maximum wins
                best, best_key = cand, key
        chosen.append(best)
    return [list(p) for p in chosen]


@pytest.mark.parametrize("criterion", ["maximin", "mean"])
def test_hamming_greedy_matches_loop_reference(criterion):
    perms = jigsaw.hamming_permutations(12, 5, seed=3, criterion=criterion)
    every = list(itertools.permutations(range(5)))
    first = every.index(tuple(perms[0].tolist()))
    assert perms.tolist() == _greedy_reference(12, 5, first, criterion)


def test_hamming_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_perms"):
        jigsaw.hamming_permutations(200, 5)          # 5! = 120
    with pytest.raises(ValueError, match="criterion"):
        jigsaw.hamming_permutations(10, 5, criterion="max")


# --------------------------------------------------------------------------- DAE corruptions

def test_masking_noise_zeroes_exact_fraction_of_pixels():
    x = torch.rand(4, 3, 10, 10, generator=_gen()) + 0.1          # no zeros to begin with
    out, mask = denoising_autoencoder.masking_noise(x, 0.3, generator=_gen(1), return_mask=True)
    assert (mask.flatten(1).sum(dim=1) == 30).all()
    assert (out[mask.expand_as(out)] == 0).all()
    assert torch.equal(out[~mask.expand_as(out)], x[~mask.expand_as(x)])
    assert torch.equal(out, denoising_autoencoder.masking_noise(x, 0.3, generator=_gen(1)))


def test_gaussian_noise_statistics():
    x = torch.full((2, 1, 64, 64), 0.5)
    out = denoising_autoencoder.gaussian_noise(x, 0.1, generator=_gen())
    assert abs((out - x).mean().item()) < 0.01 and abs((out - x).std().item() - 0.1) < 0.01
    assert denoising_autoencoder.gaussian_noise(x, 2.0, generator=_gen(), clamp=True).min() >= 0


def test_light_view_and_tile_helpers():
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=_gen())
    x = augment.prepare_images(images, 16)
    assert x.shape == (2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    same = augment.prepare_images(images, 20)
    assert torch.equal(same, images.float() / 255)
    assert augment.normalize_input(torch.ones(1, 1, 2, 2)).eq(1).all()
    assert T.resize_tiles(torch.rand(2, 9, 1, 7, 7), 16).shape == (2, 9, 1, 16, 16)


# --------------------------------------------------------------------------- colour

def test_lab_known_values():
    def lab(r, g, b):
        return C.rgb_to_lab(torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1)).flatten().tolist()
    assert lab(1, 1, 1) == pytest.approx([100.0, 0.0, 0.0], abs=1e-3)
    assert lab(0, 0, 0) == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)
    assert lab(1, 0, 0) == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert lab(0, 1, 0) == pytest.approx([87.73, -86.18, 83.18], abs=0.05)
    assert lab(0, 0, 1) == pytest.approx([32.30, 79.19, -107.86], abs=0.05)


def test_rgb_lab_round_trip_batched():
    x = torch.rand(4, 3, 9, 9, generator=_gen())
    lab = C.rgb_to_lab(x)
    assert lab.shape == x.shape
    assert torch.allclose(C.lab_to_rgb(lab), x, atol=1e-4)
    with pytest.raises(ValueError, match="3 colour channels"):
        C.rgb_to_lab(torch.rand(2, 1, 4, 4))


def test_ab_quantizer_bins_and_encodings():
    q = C.ABQuantizer()
    assert q.num_bins == 262 and q.centers.shape == (262, 2)
    assert C.ABQuantizer(in_gamut_only=False).num_bins == 23 * 23
    # every real sRGB colour lands in a kept bin whose centre is within half a cell diagonal
    ab = C.rgb_to_lab(torch.rand(2, 3, 8, 8, generator=_gen()))[:, 1:]
    hard = q.encode_hard(ab)
    dist = (q.centers[hard].permute(0, 3, 1, 2) - ab).norm(dim=1)
    assert dist.max() <= 5 * 2 ** 0.5 + 1e-4
    # bin centres encode to themselves
    centres = q.centers.t().reshape(1, 2, 1, -1)
    assert torch.equal(q.encode_hard(centres).flatten(), torch.arange(262))
    soft = q.encode_soft(ab)
    assert soft.shape == (2, 262, 8, 8)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert torch.equal(soft.argmax(dim=1), hard)
    assert ((soft > 0).sum(dim=1) <= 5).all()
    # annealed mean of a confident prediction is that bin's centre
    logits = torch.full((1, 262, 1, 1), -50.0)
    logits[0, 17] = 50.0
    assert torch.allclose(q.decode(logits).flatten(), q.centers[17], atol=1e-3)


def test_rebalancing_weights_mean_one_and_rare_bins_weigh_more():
    counts = torch.tensor([1000.0, 300.0, 50.0, 5.0, 0.0])
    w = C.rebalancing_weights(counts, lam=0.5, sigma=0)
    p = counts / counts.sum()
    assert float((p * w).sum()) == pytest.approx(1.0, abs=1e-6)
    assert (w[1:] > w[:-1]).all()                                      # rarer → heavier
    # the formula itself: w ∝ 1 / ((1 − λ) p + λ / Q)
    raw = 1 / (0.5 * p + 0.5 / 5)
    assert torch.allclose(w, (raw / (p * raw).sum()).float())
    assert torch.equal(C.rebalancing_weights(torch.zeros(5), sigma=0), torch.ones(5))
    q = C.ABQuantizer()
    counts = torch.rand(262, generator=_gen()) ** 4 * 1000
    ws = C.rebalancing_weights(counts, q.centers, lam=0.5, sigma=5.0)
    ps = C.smooth_distribution(counts, q.centers, 5.0)
    assert float((ps * ws).sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(ws[ps.argmin()]) > float(ws[ps.argmax()])
