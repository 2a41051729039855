"""Each loss term of the paper against a hand computation or a literal brute-force reference.

The brute-force references (tests/references.py) loop over items, modalities and classes in
float64 and call no pipeline code; every unit is checked in float32 and float64.
"""

from __future__ import annotations

import math

import pytest
import references as R
import torch
import torch.nn.functional as F

from pipeline.method import losses as L
from pipeline.method.bounds import ell_max

E = math.e
DTYPES = [torch.float32, torch.float64]
# float32 keeps ~7 digits; the robust term's (1 − p^r)/r loses about log10(1/r) more
TOL = {torch.float32: {"rel": 2e-4, "abs": 1e-6}, torch.float64: {"rel": 1e-10, "abs": 1e-12}}


def _close(got: torch.Tensor, want, dtype: torch.dtype) -> None:
    want_t = torch.as_tensor([R.value(w) for w in want], dtype=torch.float64)
    tol = TOL[dtype]
    assert torch.allclose(
        got.detach().double().reshape(-1), want_t, rtol=tol["rel"], atol=tol["abs"]
    ), (got, want_t)


def _rand_codes(seed: int, n: int, bits: int, dtype: torch.dtype, m: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, bits, generator=g, dtype=torch.float64), dim=1).to(dtype)
            for _ in range(m)]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_robust_term_hand_values(dtype):
    # r = 0.5, p = 0.25: (1-r)(1-p^r)/r + r(1-p) = 0.5*0.5/0.5 + 0.5*0.75 = 0.875
    got = L.robust_term(torch.tensor(0.25, dtype=dtype), 0.5)
    assert got.dtype == dtype and got.item() == pytest.approx(0.875, rel=1e-6)
    # r = 1 reduces to 1 - p (MAE); r → 0 approaches cross-entropy -log p
    assert L.robust_term(torch.tensor(0.3, dtype=dtype), 1.0).item() == pytest.approx(0.7)
    small = L.robust_term(torch.tensor(0.3, dtype=torch.float64), 1e-5).item()
    assert small == pytest.approx(-math.log(0.3), rel=1e-3)
    # p = 1 costs nothing, p = 0 costs ℓmax/M = (r² − r + 1)/r (Eq 14 per modality)
    p = torch.tensor([1.0, 0.0], dtype=dtype)
    assert L.robust_term(p, 0.2).tolist() == pytest.approx([0.0, (0.04 - 0.2 + 1) / 0.2])


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
    # the CE form: −log q for each of the four terms
    ce = L.chl_loss(_unit_codes(), tau=1.0, r=r, loss_form="ce").item()
    assert ce == pytest.approx(2 * -math.log(q), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("tau", [0.7, 1.0])
def test_chl_matches_brute_force(dtype, exclude_self, tau):
    codes = _rand_codes(0, 5, 8, dtype)
    got = L.chl_probabilities(codes, tau=tau, exclude_self=exclude_self)
    assert got.dtype == dtype and got.shape == (2, 5)
    want = R.chl_q(R.f64(*codes), tau, exclude_self)
    _close(got, [q for row in want for q in row], dtype)
    for form, r in (("robust", 0.3), ("robust", 0.01), ("ce", 0.3)):
        loss = L.chl_loss(codes, tau, r, exclude_self, loss_form=form)
        _close(loss, [R.chl(R.f64(*codes), tau, r, exclude_self, form=form)], dtype)


def test_center_probability_eq4_and_aggregation_eq5_hand():
    h = torch.tensor([[1.0, 0.0]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    p = L.center_probabilities(h, centers, tau=1.0)
    z = E + 1 + 1 / E
    assert torch.allclose(p, torch.tensor([[E / z, 1 / z, (1 / E) / z]]))
    # Eq 5 sums the probabilities of all positive labels (multi-label case included)
    v = L.aggregation_probability(p, torch.tensor([[1, 1, 0]]))
    assert v.item() == pytest.approx((E + 1) / z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_center_and_aggregation_probabilities_match_brute_force(dtype):
    (h,) = _rand_codes(5, 4, 6, dtype, m=1)
    (c,) = _rand_codes(6, 3, 6, dtype, m=1)
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    p = L.center_probabilities(h, c, tau=0.5)
    assert p.dtype == dtype
    h64, c64 = R.f64(h, c)
    _close(p, [x for i in range(4) for x in R.center_p(h64[i], c64, 0.5)], dtype)
    v = L.aggregation_probability(p, labels)
    _close(v, [R.aggregation_v(h64[i], c64, labels[i].tolist(), 0.5) for i in range(4)], dtype)
    assert v[3].item() == pytest.approx(1.0)  # every class positive: v = Σ_k p = 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["robust", "ce"])
def test_pair_loss_eq6_7_brute_force(dtype, form):
    codes = _rand_codes(1, 4, 6, dtype)
    (centers,) = _rand_codes(2, 3, 6, dtype, m=1)
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]])
    r, tau = 0.2, 0.5
    ell = L.pair_losses(codes, centers, labels, tau, r, loss_form=form)
    assert ell.dtype == dtype and ell.shape == (4,)
    want = R.ell(R.f64(*codes), R.f64(centers)[0], labels.tolist(), tau, r, form)
    _close(ell, want, dtype)
    _close(L.center_aggregation_loss(ell), [sum(R.value(w) for w in want) / 4], dtype)


def test_pair_loss_literal_hand_value():
    # one item, one center per class, codes on the centers' axes: b·c ∈ {1, 0}
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    img, txt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # label 0: v_img = e/(e+1), v_txt = 1/(e+1); ℓ = Σ_m robust(v) with r = 1: Σ (1 − v) = 1
    ell = L.pair_losses([img, txt], c, torch.tensor([[1, 0]]), tau=1.0, r=1.0)
    assert ell.item() == pytest.approx(1.0)
    ce = L.pair_losses([img, txt], c, torch.tensor([[1, 0]]), tau=1.0, r=1.0, loss_form="ce")
    assert ce.item() == pytest.approx(-math.log(E / (E + 1)) - math.log(1 / (E + 1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_spl_weights_eq12_closed_form_and_detached(dtype):
    ell = torch.tensor([0.0, 1.5, 3.0, 4.5], dtype=dtype, requires_grad=True)
    w = L.spl_weights(ell, gamma=3.0)
    assert w.dtype == dtype and torch.equal(w, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=dtype))
    assert not w.requires_grad
    # Eq 10/11: w* = argmin_{w∈[0,1]} w·ℓ + γ(½w² − w), checked by a fine grid search
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    for li in [0.0, 0.7, 2.2, 2.999, 3.0, 3.5, 10.0]:
        obj = grid * li + 3.0 * (0.5 * grid**2 - grid)
        best = grid[obj.argmin()].item()
        got = L.spl_weights(torch.tensor([li], dtype=dtype), 3.0).item()
        assert got == pytest.approx(best, abs=1e-3)
    with pytest.raises(ValueError, match="gamma"):
        L.spl_weights(ell, gamma=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regulariser_eq8_and_self_paced_loss_eq7_hand(dtype):
    w = torch.tensor([0.5, 1.0, 0.0], dtype=dtype)
    # γ(½w² − w) with γ = 3: 3(0.125 − 0.5) = −1.125, 3(0.5 − 1) = −1.5, 0
    assert L.spl_regularizer(w, 3.0).tolist() == pytest.approx([-1.125, -1.5, 0.0])
    ell = torch.tensor([1.5, 0.0, 4.0], dtype=dtype)
    # (1/N) Σ w ℓ + (1/N) Σ R = (0.75 + 0 + 0)/3 + (−2.625)/3
    got = L.self_paced_loss(ell, w, 3.0)
    assert got.dtype == dtype and got.item() == pytest.approx((0.75 - 2.625) / 3)


def test_self_paced_loss_at_the_optimal_weights_is_the_minimum_over_w():
    # with w = w*(ℓ) of Eq 12, L_S is the minimum of Eq 7 over w ∈ [0, 1]^N (a grid per item)
    ell = torch.tensor([0.2, 1.0, 2.9, 3.5], dtype=torch.float64)
    gamma = 3.0
    at_opt = L.self_paced_loss(ell, L.spl_weights(ell, gamma), gamma).item()
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    brute = sum(min(float(li) * w + gamma * (0.5 * w * w - w) for w in grid.tolist()) for li in ell)
    assert at_opt == pytest.approx(brute / 4, abs=1e-6)


def test_ell_max_eq14_is_the_bound_of_ell():
    assert ell_max(0.01, 2) == pytest.approx(2 * (0.0001 - 0.01 + 1) / 0.01)
    assert ell_max(1.0, 2) == pytest.approx(2.0)
    # ℓ_i approaches ℓmax as v → 0 for both modalities
    r = 0.1
    assert 2 * L.robust_term(torch.tensor(0.0), r).item() == pytest.approx(ell_max(r), rel=1e-6)


def _objective_batch(dtype: torch.dtype, grad: bool = False):
    hi, ht = _rand_codes(2, 6, 8, dtype)
    (c,) = _rand_codes(3, 3, 8, dtype, m=1)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    return [t.requires_grad_(grad) for t in (hi, ht, c)] + [y]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epoch", [1, 2])  # warm-up (epoch < N_w = 2), then self-paced
@pytest.mark.parametrize("exclude_self", [False, True])
def test_objective_eq9_matches_brute_force_values_and_gradients(dtype, epoch, exclude_self):
    hi, ht, c, y = _objective_batch(dtype, grad=True)
    kw = dict(epoch=epoch, warmup_epochs=2, gamma=4.0, alpha=0.3, r=0.5, tau=1.0,
              exclude_self=exclude_self)  # fmt: skip
    got = L.rshnl_objective(hi, ht, c, y, **kw)
    assert got.warmup == (epoch < 2) and got.total.dtype == dtype
    ri, rt, rc = R.f64(hi, ht, c, grad=True)
    want = R.objective(ri, rt, rc, y.tolist(), **kw)
    _close(got.total, [want["total"]], dtype)
    _close(got.chl, [want["chl"]], dtype)
    _close(got.center, [want["center"]], dtype)
    _close(got.ell, want["ell"], dtype)
    _close(got.weights, want["weights"], dtype)
    assert got.predicted.tolist() == want["predicted"]
    # gradients: the reference treats w as a constant (Eq 12 is not back-propagated through)
    g_got = torch.autograd.grad(got.total, (hi, ht, c))
    g_want = torch.autograd.grad(want["total"], (ri, rt, rc))
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == dtype
        tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
        assert torch.allclose(a.double(), b, rtol=tol, atol=tol), (a, b)


def test_objective_after_warmup_is_not_the_warmup_objective():
    # the self-paced branch changes the value: guards the reference comparison above against a
    # regression that would run the warm-up objective after N_w
    hi, ht, c, y = _objective_batch(torch.float64)
    kw = dict(warmup_epochs=2, gamma=4.0, alpha=0.3, r=0.5)
    warm = L.rshnl_objective(hi, ht, c, y, epoch=1, **kw)
    late = L.rshnl_objective(hi, ht, c, y, epoch=2, **kw)
    assert late.total.item() < warm.total.item() - 0.1  # R(w, γ) < 0 for every kept pair


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_chl_with_gathered_negatives_matches_brute_force(dtype, exclude_self):
    full = _rand_codes(4, 6, 8, dtype)
    q_full = L.chl_probabilities(full, 0.8, exclude_self)
    halves = [
        L.chl_probabilities(
            [c[s : s + 3] for c in full], 0.8, exclude_self, all_codes=full, offset=s
        )
        for s in (0, 3)
    ]
    f64 = R.f64(*full)
    for s, half in zip((0, 3), halves, strict=True):
        want = R.chl_q([c[s : s + 3] for c in f64], 0.8, exclude_self, all_codes=f64, offset=s)
        _close(half, [q for row in want for q in row], dtype)
    assert torch.allclose(torch.cat(halves, dim=1), q_full, rtol=TOL[dtype]["rel"])
    # the mean of the per-half losses is the loss of the whole batch
    per_half = [
        L.chl_loss([c[s : s + 3] for c in full], 0.8, 0.3, exclude_self, all_codes=full, offset=s)
        for s in (0, 3)
    ]
    _close(sum(per_half) / 2, [R.chl(f64, 0.8, 0.3, exclude_self)], dtype)
