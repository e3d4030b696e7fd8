"""ssl_models.losses against plain-loop references and closed-form values."""
import math

import pytest
import torch

from ssl_models import losses as L

torch.set_num_threads(1)


def _dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / (math.sqrt(sum(float(x) ** 2 for x in a)) * math.sqrt(sum(float(y) ** 2 for y in b)))


# --------------------------------------------------------------------------- NT-Xent
def nt_xent_reference(z1, z2, t):
    """Loop over the 2N anchors; the positive of anchor i is its other view."""
    z = list(z1) + list(z2)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        num = math.exp(_cos(z[i], z[j]) / t)
        den = sum(math.exp(_cos(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert L.nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-5)


def test_nt_xent_closed_form_identical_orthogonal_embeddings():
    # z1 = z2 = N orthonormal rows: positive similarity 1, the 2N - 2 negatives 0.
    n, t = 4, 0.5
    e = torch.eye(n)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert L.nt_xent(e, e, t).item() == pytest.approx(expected, rel=1e-6)
    # Scale does not matter: the rows are L2-normalised.
    assert L.nt_xent(3 * e, 0.5 * e, t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_gradient_matches_autograd_of_loop_reference():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    L.nt_xent(z1, z2, 0.3).backward()
    ga, gb = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    # The same maths with explicit loops over anchors and candidates, in torch for autograd.
    z = [r / r.norm() for r in torch.cat([z1, z2])]
    terms = []
    for i in range(8):
        j = (i + 4) % 8
        den = torch.stack([torch.exp(z[i] @ z[k] / 0.3) for k in range(8) if k != i]).sum()
        terms.append(-torch.log(torch.exp(z[i] @ z[j] / 0.3) / den))
    torch.stack(terms).mean().backward()
    assert torch.allclose(ga, z1.grad) and torch.allclose(gb, z2.grad)


def test_nt_xent_rejects_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        L.nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        L.nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


# --------------------------------------------------------------------------- InfoNCE
def test_info_nce_matches_loop_reference_and_closed_form():
    g = torch.Generator().manual_seed(2)
    q, kp, kn = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    t = 0.2
    ref = 0.0
    for i in range(5):
        num = math.exp(_cos(q[i], kp[i]) / t)
        den = num + sum(math.exp(_cos(q[i], kn[m]) / t) for m in range(7))
        ref += -math.log(num / den)
    assert L.info_nce(q, kp, kn, t).item() == pytest.approx(ref / 5, rel=1e-5)
    # q = k+ = e_0, negatives orthogonal: -log(e^{1/t} / (e^{1/t} + M)).
    e = torch.eye(4)
    closed = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 3))
    assert L.info_nce(e[:1], e[:1], e[1:], t).item() == pytest.approx(closed, rel=1e-6)


# --------------------------------------------------------------------------- contrastive margin
def test_contrastive_margin_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    y = torch.tensor([0, 1] * 5)
    m = 2.0
    ref = 0.0
    for i in range(10):
        d = _dist(x1[i], x2[i])
        ref += 0.5 * d * d if y[i] == 0 else 0.5 * max(0.0, m - d) ** 2
    assert L.contrastive_margin(x1, x2, y, m).item() == pytest.approx(ref / 10, rel=1e-5)


def test_contrastive_margin_closed_forms():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0]])                       # D = 5
    zero, one = torch.zeros(1), torch.ones(1)
    assert L.contrastive_margin(a, a, zero).item() == 0.0                 # similar, D = 0
    assert L.contrastive_margin(a, b, zero).item() == pytest.approx(12.5)  # ½·25
    assert L.contrastive_margin(a, b, one, margin=1.0).item() == 0.0      # dissimilar beyond the margin
    assert L.contrastive_margin(a, b, one, margin=7.0).item() == pytest.approx(2.0)  # ½·(7-5)²
    assert L.contrastive_margin(a, a, one, margin=2.0).item() == pytest.approx(2.0)  # ½·m²
    assert L.contrastive_margin(a, b, torch.tensor([True]), margin=7.0).item() == pytest.approx(2.0)


def test_contrastive_margin_gradient_finite_at_zero_distance():
    a = torch.zeros(2, 3, requires_grad=True)
    L.contrastive_margin(a, torch.zeros(2, 3), torch.tensor([0.0, 1.0])).backward()
    assert torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="y must be"):
        L.contrastive_margin(a, a, torch.zeros(3))


# --------------------------------------------------------------------------- triplet
def test_triplet_margin_matches_loop_reference_and_closed_form():
    g = torch.Generator().manual_seed(4)
    a, p, n = (torch.randn(9, 4, generator=g) for _ in range(3))
    m = 0.7
    ref = sum(max(0.0, m + _dist(a[i], p[i]) - _dist(a[i], n[i])) for i in range(9)) / 9
    assert L.triplet_margin(a, p, n, m).item() == pytest.approx(ref, rel=1e-5)
    # Closed form: d(a,p) = 1, d(a,n) = 3 → max(0, m − 2).
    a0, p0, n0 = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert L.triplet_margin(a0, p0, n0, margin=1.0).item() == 0.0
    assert L.triplet_margin(a0, p0, n0, margin=2.5).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        L.triplet_margin(a0, p0, torch.zeros(2, 2))


# --------------------------------------------------------------------------- Sinkhorn
def sinkhorn_reference(scores, eps, iters):
    """SwAV's Algorithm (Appendix A.1) with explicit loops over prototypes and samples."""
    B, K = len(scores), len(scores[0])
    q = [[math.exp(float(scores[b][k]) / eps) for b in range(B)] for k in range(K)]   # K × B
    tot = sum(sum(r) for r in q)
    q = [[v / tot for v in r] for r in q]
    for _ in range(iters):
        for k in range(K):
            s = sum(q[k])
            q[k] = [v / s / K for v in q[k]]
        for b in range(B):
            s = sum(q[k][b] for k in range(K))
            for k in range(K):
                q[k][b] = q[k][b] / s / B
    return [[q[k][b] * B for k in range(K)] for b in range(B)]                       # B × K


def test_sinkhorn_matches_loop_reference():
    g = torch.Generator().manual_seed(5)
    s = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    ref = torch.tensor(sinkhorn_reference(s.tolist(), 0.1, 3))
    assert torch.allclose(L.sinkhorn(s, epsilon=0.1, iterations=3), ref, atol=1e-5)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(6)
    B, K = 32, 8
    s = torch.nn.functional.normalize(torch.randn(B, K, generator=g), dim=1)
    q = L.sinkhorn(s, epsilon=0.05, iterations=3)
    assert q.shape == (B, K) and (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(B), atol=1e-5)          # one unit per sample
    q = L.sinkhorn(s, epsilon=0.5, iterations=200)
    assert torch.allclose(q.sum(dim=0), torch.full((K,), B / K), atol=1e-3)  # equipartition
    # Uniform scores → uniform assignment 1/K.
    assert torch.allclose(L.sinkhorn(torch.zeros(B, K)), torch.full((B, K), 1 / K))


def test_sinkhorn_has_no_gradient_and_checks_shape():
    s = torch.randn(4, 3, requires_grad=True)
    assert not L.sinkhorn(s).requires_grad
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        L.sinkhorn(torch.randn(4))
