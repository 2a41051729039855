"""The data-driven weightings (loss mixture, mixture γ, τ of Eq 4) against hand computations
and the brute-force reference of tests/references.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as R
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.method import losses as L
from pipeline.training.step import epoch_gamma, needs_loss_mixture


def _pdf(x: float, m: float, v: float) -> float:
    return math.exp(-((x - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)


def test_clean_posterior_hand_values_and_clipping():
    mix = L.LossMixture(pi=(0.6, 0.4), mean=(1.0, 4.0), var=(0.5, 2.0))
    x = 2.0
    a, b = 0.6 * _pdf(x, 1.0, 0.5), 0.4 * _pdf(x, 4.0, 2.0)
    got = mix.clean_posterior(torch.tensor([x, 0.2, 9.0], dtype=torch.float64))
    assert got[0].item() == pytest.approx(a / (a + b), rel=1e-9)
    # below the clean mean the value is taken at the clean mean, above the noisy one at its mean
    at_m0 = 0.6 * _pdf(1.0, 1.0, 0.5) / (0.6 * _pdf(1.0, 1.0, 0.5) + 0.4 * _pdf(1.0, 4.0, 2.0))
    at_m1 = 0.6 * _pdf(4.0, 1.0, 0.5) / (0.6 * _pdf(4.0, 1.0, 0.5) + 0.4 * _pdf(4.0, 4.0, 2.0))
    assert got[1].item() == pytest.approx(at_m0, rel=1e-9)
    assert got[2].item() == pytest.approx(at_m1, rel=1e-9)
    # a degenerate fit (equal means) keeps every pair
    flat = L.LossMixture((0.5, 0.5), (2.0, 2.0), (1.0, 1.0))
    assert torch.equal(flat.clean_posterior(torch.tensor([0.0, 5.0])), torch.ones(2))


def test_boundary_hand_values():
    # equal shares and variances: the midpoint of the means
    assert L.LossMixture((0.5, 0.5), (1.0, 3.0), (1.0, 1.0)).boundary() == pytest.approx(2.0)
    # shares 3:1, unit variances, means 0 and 2: log 3 − x²/2 = −(x−2)²/2 ⇒ x = 1 + (log 3)/2
    b = L.LossMixture((0.75, 0.25), (0.0, 2.0), (1.0, 1.0)).boundary()
    assert b == pytest.approx(1 + math.log(3) / 2, abs=1e-9)


def test_one_em_step_hand_computation():
    x = [0.0, 1.0, 3.0, 4.0]
    # start: halves (0, 1) and (3, 4): means 0.5 / 3.5, variances 0.25, shares ½
    m, v = (0.5, 3.5), 0.25
    resp = []
    for xi in x:
        p0, p1 = _pdf(xi, m[0], v), _pdf(xi, m[1], v)
        resp.append(p0 / (p0 + p1))
    n0 = sum(resp)
    n1 = len(x) - n0
    mean0 = sum(r * xi for r, xi in zip(resp, x, strict=True)) / n0
    mean1 = sum((1 - r) * xi for r, xi in zip(resp, x, strict=True)) / n1
    var0 = sum(r * (xi - mean0) ** 2 for r, xi in zip(resp, x, strict=True)) / n0
    fit = L.fit_loss_mixture(np.array([3.0, 0.0, 4.0, 1.0]), iters=1)
    assert fit.pi[0] == pytest.approx(n0 / 4, rel=1e-6)
    assert fit.mean == pytest.approx((mean0, mean1), rel=1e-6)
    assert fit.var[0] == pytest.approx(var0, rel=1e-6)


def test_fit_recovers_a_known_mixture_deterministically():
    rng = np.random.default_rng(0)
    ell = np.concatenate([rng.normal(1.0, 0.3, 1200), rng.normal(4.0, 0.6, 800)])
    fit = L.fit_loss_mixture(rng.permutation(ell))
    assert fit.pi == pytest.approx((0.6, 0.4), abs=0.02)
    assert fit.mean == pytest.approx((1.0, 4.0), abs=0.05)
    assert math.sqrt(fit.var[0]) == pytest.approx(0.3, abs=0.03)
    assert fit == L.fit_loss_mixture(ell[::-1])  # order-free and deterministic
    assert L.LossMixture.from_dict(fit.to_dict()) == fit
    w = fit.clean_posterior(torch.as_tensor(ell))
    assert w[:1200].mean() > 0.95 and w[1200:].mean() < 0.05


DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}
ARGS = {"epoch": 5, "warmup_epochs": 2, "gamma": 3.0, "alpha": 0.1, "r": 0.1}


def _data(dtype: torch.dtype = torch.float32):
    # seed 2: the class nearest by Σ_m p(k | x) differs between τ = 1 and τ = 0.2 for some pairs
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    ctr = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    lab = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    return tuple(x.to(dtype) for x in (img, txt, ctr, lab))


def _objective(dtype: torch.dtype = torch.float32, **kw):
    img, txt, ctr, lab = _data(dtype)
    return L.rshnl_objective(img, txt, ctr, lab, **(ARGS | kw)), (img, txt, ctr, lab)


def _reference(dtype: torch.dtype = torch.float32, **kw):
    img, txt, ctr, lab = _data(dtype)
    return R.objective(*R.f64(img, txt, ctr), lab.tolist(), **(ARGS | kw))


def _mixture_inside_the_losses(tau_center: float) -> tuple[tuple, tuple, tuple]:
    """(pi, mean, var) with the means at the 2nd smallest and 2nd largest ℓ_i of the batch, so
    one pair is clipped at each end and the others fall in between."""
    ell = sorted(R.value(x) for x in _reference(weighting="none", tau_center=tau_center)["ell"])
    lo, hi = ell[1], ell[-2]
    assert hi - lo > 0.05
    spread = ((hi - lo) / 3) ** 2
    return (0.6, 0.4), (lo, hi), (spread, 1.5 * spread)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epoch", [1, 5])  # warm-up (N_w = 2): L_p, posteriors for monitoring
@pytest.mark.parametrize("pseudo", [False, True])
def test_mixture_objective_matches_the_brute_force_reference(dtype, epoch, pseudo):
    pi, mean, var = _mixture_inside_the_losses(0.2)
    kw = dict(weighting="mixture", tau_center=0.2, epoch=epoch, pseudo_labels=pseudo)
    t, _ = _objective(dtype, mixture=L.LossMixture(pi, mean, var), **kw)
    ref = _reference(dtype, mixture=(pi, mean, var), **kw)
    tol = TOL[dtype]
    assert t.warmup == (epoch < 2)
    for key in ("total", "chl", "center"):
        assert getattr(t, key).item() == pytest.approx(R.value(ref[key]), rel=tol), key
    assert t.ell.tolist() == pytest.approx([R.value(x) for x in ref["ell"]], rel=tol)
    assert t.weights.tolist() == pytest.approx(ref["weights"], rel=tol, abs=1e-12)
    assert t.predicted.tolist() == ref["predicted"]
    assert max(ref["weights"]) - min(ref["weights"]) > 0.3  # the weights do vary over pairs
    # the predicted class (and the pseudo-label) uses τ of Eq 4, which matters for this batch
    img, txt, ctr, _ = R.f64(*_data())
    assert ref["predicted"] != R.predicted([img, txt], ctr, 1.0)


def test_pseudo_labels_change_the_objective_only_after_warmup():
    mix = L.LossMixture(*_mixture_inside_the_losses(0.2))
    kw = dict(weighting="mixture", tau_center=0.2, mixture=mix)
    for epoch, differs in ((1, False), (5, True)):
        a, _ = _objective(epoch=epoch, pseudo_labels=False, **kw)
        b, _ = _objective(epoch=epoch, pseudo_labels=True, **kw)
        assert (abs(a.total.item() - b.total.item()) > 1e-3) is differs


def test_mixture_objective_without_a_fit_is_lp():
    # first epoch after warm-up, no fit yet: every pair has weight 1 and the center term is L_p
    t, _ = _objective(weighting="mixture", mixture=None)
    ref = _reference(weighting="none")
    assert t.weights.tolist() == [1.0] * 6
    assert t.center.item() == pytest.approx(R.value(ref["center"]), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tau_center_is_the_temperature_of_eq4_only(dtype):
    t, (img, txt, ctr, lab) = _objective(dtype, weighting="spl", tau=1.0, tau_center=0.2)
    # p(k|x) = softmax(b·c_k / 0.2) by hand, v = p of the label, ℓ = Σ_m robust_term(v)
    ref = [0.0] * 6
    for h in (img, txt):
        for i in range(6):
            logits = [float(h[i] @ ctr[k]) / 0.2 for k in range(3)]
            z = sum(math.exp(v) for v in logits)
            p = math.exp(logits[int(lab[i].argmax())]) / z
            ref[i] += (1 - 0.1) * (1 - p**0.1) / 0.1 + 0.1 * (1 - p)
    assert t.ell.tolist() == pytest.approx(ref, rel=TOL[dtype])
    # Eq 2 keeps τ = 1: L_C of the reference at τ = 1, not at 0.2
    lc = R.value(R.chl(R.f64(img, txt), 1.0, 0.1))
    assert t.chl.item() == pytest.approx(lc, rel=TOL[dtype])
    assert R.value(R.chl(R.f64(img, txt), 0.2, 0.1)) != pytest.approx(lc, rel=1e-2)


def test_mixture_gamma_and_config():
    mix = L.LossMixture((0.5, 0.5), (1.0, 3.0), (1.0, 1.0))
    cfg = TrainConfig(dataset="x", gamma_mode="mixture")
    assert needs_loss_mixture(cfg) and epoch_gamma(cfg, mix) == pytest.approx(2.0)
    assert epoch_gamma(cfg, None) == cfg.gamma  # no fit yet: the configured γ
    assert epoch_gamma(TrainConfig(dataset="x"), mix) == 3.0  # fixed: the paper's γ
    # the Eq 14 bound concerns a fixed γ only
    TrainConfig(dataset="x", gamma_mode="mixture", gamma=500.0).validate()
    TrainConfig(dataset="x", weighting="mixture").validate()
    with pytest.raises(ConfigError, match="gamma_mode"):
        TrainConfig(dataset="x", gamma_mode="quantile").validate()
    with pytest.raises(ConfigError, match="tau_center"):
        TrainConfig(dataset="x", tau_center=-1.0).validate()


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    from synthetic_util import write_synthetic

    return write_synthetic(
        tmp_path_factory.mktemp("store"), "calib", noise=("symmetric", 0.4, 0), seed=1,
        num_classes=6, counts={"train": 600, "valid": 96, "test": 96}, image_dim=24, text_dim=16,
        difficulty=0.0,  # well-separated classes: the clean pairs' ℓ_i is known to be small
    )  # fmt: skip


def test_mixture_weights_are_calibrated_on_known_noise(noisy_set):
    from pipeline.training.inprocess import train_in_process

    cfg = TrainConfig(
        dataset=noisy_set, bits=16, hidden_dim=128, epochs=8, warmup_epochs=3, lr=1e-3,
        batch_size=128, weighting="mixture", tau_center=0.2, seed=0,
    )  # fmt: skip
    s = train_in_process(cfg)
    d = s["noise_detection"]
    assert d["auc"] >= 0.95
    assert d["clean_mean_weight"] >= 0.8 and d["noisy_mean_weight"] <= 0.2
    assert all(a >= 0.95 for a in s["history"]["noise_auc"][cfg.warmup_epochs :])
    assert train_in_process(cfg)["noise_detection"] == d  # deterministic given the seed


def test_every_configurable_weighting_has_an_implementation():
    from pipeline.config import WEIGHTING_NAMES
    from pipeline.method.losses import WEIGHTINGS

    assert set(WEIGHTING_NAMES) == set(WEIGHTINGS)
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        h = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        L.rshnl_objective(
            h, h, h[:2], torch.eye(2)[[0, 1, 0, 1]], epoch=0, warmup_epochs=1, gamma=1.0,
            alpha=0.1, r=0.1, weighting="nope",
        )  # fmt: skip
