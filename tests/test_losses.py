"""Each loss term of the paper against a hand computation or a literal brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.method import losses as L
from pipeline.method.bounds import ell_max

E = math.e


def test_robust_term_hand_values():
    # r = 0.5, p = 0.25: (1-r)(1-p^r)/r + r(1-p) = 0.5*0.5/0.5 + 0.5*0.75 = 0.875
    assert L.robust_term(torch.tensor(0.25), 0.5).item() == pytest.approx(0.875)
    # r = 1 reduces to 1 - p (MAE); r → 0 approaches cross-entropy -log p
    assert L.robust_term(torch.tensor(0.3), 1.0).item() == pytest.approx(0.7)
    assert L.robust_term(torch.tensor(0.3), 1e-5).item() == pytest.approx(-math.log(0.3), rel=1e-3)


def _unit_codes():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return [img, txt]


def test_chl_probability_eq2_hand():
    # anchor b_0^img=[1,0]: similarities to (img0, img1, txt0, txt1) = (1, 0, 1, 0)
    # Eq 2 as written: numerator e^1 + e^1 (j = img, txt), denominator 2e + 2  →  e / (e + 1)
    q = L.chl_probabilities(_unit_codes(), tau=1.0)
    assert q.shape == (2, 2)
    assert torch.allclose(q, torch.full((2, 2), E / (E + 1)))
    # without the self-similarity term: e / (e + 2)
    q_ns = L.chl_probabilities(_unit_codes(), tau=1.0, exclude_self=True)
    assert torch.allclose(q_ns, torch.full((2, 2), E / (E + 2)))
    # temperature τ = 0.5 doubles every exponent: 2e² / (2e² + 2)
    q_t = L.chl_probabilities(_unit_codes(), tau=0.5)
    assert torch.allclose(q_t, torch.full((2, 2), E**2 / (E**2 + 1)))


def test_chl_loss_eq3_hand():
    r = 0.3
    q = E / (E + 1)
    per = (1 - r) * (1 - q**r) / r + r * (1 - q)
    # (1/N) Σ_i Σ_m with N = 2, M = 2 and all four terms equal
    assert L.chl_loss(_unit_codes(), tau=1.0, r=r).item() == pytest.approx(2 * per, rel=1e-6)


def _brute_q(codes, tau, exclude_self):
    M, N = len(codes), codes[0].shape[0]
    q = torch.zeros(M, N, dtype=torch.float64)
    for m in range(M):
        for i in range(N):
            num = sum(
                math.exp(float(codes[m][i] @ codes[j][i]) / tau)
                for j in range(M)
                if not (exclude_self and j == m)
            )
            den = sum(
                math.exp(float(codes[m][i] @ codes[j][z]) / tau)
                for j in range(M)
                for z in range(N)
                if not (exclude_self and j == m and z == i)
            )
            q[m, i] = num / den
    return q


@pytest.mark.parametrize("exclude_self", [False, True])
def test_chl_matches_brute_force(exclude_self):
    g = torch.Generator().manual_seed(0)
    codes = [F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1) for _ in "ab"]
    got = L.chl_probabilities(codes, tau=0.7, exclude_self=exclude_self)
    assert torch.allclose(got, _brute_q(codes, 0.7, exclude_self), atol=1e-12)


def test_center_probability_eq4_and_aggregation_eq5_hand():
    h = torch.tensor([[1.0, 0.0]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    p = L.center_probabilities(h, centers, tau=1.0)
    z = E + 1 + 1 / E
    assert torch.allclose(p, torch.tensor([[E / z, 1 / z, (1 / E) / z]]))
    # Eq 5 sums the probabilities of all positive labels (multi-label case included)
    v = L.aggregation_probability(p, torch.tensor([[1, 1, 0]]))
    assert v.item() == pytest.approx((E + 1) / z)


def test_pair_loss_eq6_7_brute_force():
    g = torch.Generator().manual_seed(1)
    codes = [F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1) for _ in "ab"]
    centers = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]])
    r, tau = 0.2, 0.5
    ell = L.pair_losses(codes, centers, labels, tau, r)
    for i in range(4):
        expect = 0.0
        for h in codes:
            logits = [float(h[i] @ centers[k]) / tau for k in range(3)]
            z = sum(math.exp(x) for x in logits)
            v = sum(labels[i, k].item() * math.exp(logits[k]) / z for k in range(3))
            expect += (1 - r) * (1 - v**r) / r + r * (1 - v)
        assert ell[i].item() == pytest.approx(expect, rel=1e-10)
    assert L.center_aggregation_loss(ell).item() == pytest.approx(ell.mean().item())


def test_spl_weights_eq12_closed_form_and_detached():
    ell = torch.tensor([0.0, 1.5, 3.0, 4.5], requires_grad=True)
    w = L.spl_weights(ell, gamma=3.0)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert not w.requires_grad
    # Eq 10/11: w* = argmin_{w∈[0,1]} w·ℓ + γ(½w² − w), checked by a fine grid search
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    for li in [0.0, 0.7, 2.2, 2.999, 3.0, 3.5, 10.0]:
        obj = grid * li + 3.0 * (0.5 * grid**2 - grid)
        best = grid[obj.argmin()].item()
        got = L.spl_weights(torch.tensor([li]), 3.0).item()
        assert got == pytest.approx(best, abs=1e-3)
        assert got == pytest.approx(max(0.0, 1 - li / 3.0), abs=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        L.spl_weights(ell, gamma=0.0)


def test_regulariser_eq8_and_self_paced_loss_eq7_hand():
    w = torch.tensor([0.5, 1.0, 0.0])
    # γ(½w² − w) with γ = 3: 3(0.125 − 0.5) = −1.125, 3(0.5 − 1) = −1.5, 0
    assert torch.allclose(L.spl_regularizer(w, 3.0), torch.tensor([-1.125, -1.5, 0.0]))
    ell = torch.tensor([1.5, 0.0, 4.0])
    # (1/N) Σ w ℓ + (1/N) Σ R = (0.75 + 0 + 0)/3 + (−2.625)/3
    assert L.self_paced_loss(ell, w, 3.0).item() == pytest.approx((0.75 - 2.625) / 3)


def test_ell_max_eq14_is_the_bound_of_ell():
    assert ell_max(0.01, 2) == pytest.approx(2 * (0.0001 - 0.01 + 1) / 0.01)
    assert ell_max(1.0, 2) == pytest.approx(2.0)
    # ℓ_i approaches ℓmax as v → 0 for both modalities
    r = 0.1
    assert 2 * L.robust_term(torch.tensor(0.0), r).item() == pytest.approx(ell_max(r), rel=1e-6)


def test_objective_eq9_warmup_then_self_paced():
    g = torch.Generator().manual_seed(2)
    hi = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    ht = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    c = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    kw = dict(warmup_epochs=2, gamma=4.0, alpha=0.3, r=0.5, tau=1.0)
    ell = L.pair_losses([hi, ht], c, y, 1.0, 0.5)
    chl = L.chl_loss([hi, ht], 1.0, 0.5)
    warm = L.rshnl_objective(hi, ht, c, y, epoch=1, **kw)
    assert warm.warmup
    assert warm.total.item() == pytest.approx((ell.mean() + 0.3 * chl).item(), rel=1e-6)
    late = L.rshnl_objective(hi, ht, c, y, epoch=2, **kw)
    assert not late.warmup
    w = (1 - ell.detach() / 4.0).clamp_min(0)
    expect = (w * ell).mean() + (4.0 * (0.5 * w**2 - w)).mean() + 0.3 * chl
    assert late.total.item() == pytest.approx(expect.item(), rel=1e-6)
    # the gradient treats w as a constant (Eq 12 is not back-propagated through)
    (g1,) = torch.autograd.grad(late.total, hi)
    (g2,) = torch.autograd.grad((w * ell).mean() + 0.3 * chl, hi)
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_chl_with_gathered_negatives_equals_one_big_batch(exclude_self):
    g = torch.Generator().manual_seed(4)
    full = [F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1) for _ in "ab"]
    q_full = L.chl_probabilities(full, 0.8, exclude_self)
    halves = [
        L.chl_probabilities(
            [c[s : s + 3] for c in full], 0.8, exclude_self, all_codes=full, offset=s
        )
        for s in (0, 3)
    ]
    assert torch.allclose(torch.cat(halves, dim=1), q_full, atol=1e-12)
    # the mean of the per-half losses is the loss of the whole batch
    per_half = [
        L.chl_loss([c[s : s + 3] for c in full], 0.8, 0.3, exclude_self, all_codes=full, offset=s)
        for s in (0, 3)
    ]
    assert (sum(per_half) / 2).item() == pytest.approx(
        L.chl_loss(full, 0.8, 0.3, exclude_self).item(), rel=1e-12
    )
