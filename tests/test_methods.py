"""Objective variants of the benchmark grid against the brute-force reference and by hand;
method overrides."""

from __future__ import annotations

import math

import pytest
import references as R
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.method.losses import (
    ce_term,
    hard_weights,
    robust_term,
    rshnl_objective,
    small_loss_weights,
)
from pipeline.method.variants import METHODS, apply_method

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


def test_ce_term_is_negative_log_and_the_small_r_limit_of_the_robust_term():
    p = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    want = [-math.log(0.9), -math.log(0.5), -math.log(0.01)]
    assert ce_term(p).tolist() == pytest.approx(want)
    assert robust_term(p, 1e-6).tolist() == pytest.approx(want, rel=1e-4)
    assert ce_term(torch.tensor([0.0])).item() == pytest.approx(-math.log(1e-12))  # clamped


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_weights_keep_exactly_the_pairs_eq12_keeps(dtype):
    ell = torch.tensor([1.0, 2.999, 3.0, 5.0], dtype=dtype, requires_grad=True)
    w = hard_weights(ell, 3.0)
    assert w.tolist() == [1.0, 1.0, 0.0, 0.0] and w.dtype == dtype and not w.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_loss_weights_keep_the_smallest_share(dtype):
    ell = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7], dtype=dtype)
    assert small_loss_weights(ell, 0.4).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert small_loss_weights(ell, 0.6).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # ⌈0.6·5⌉ = 3
    assert small_loss_weights(ell, 0.01).sum().item() == 1.0  # at least one item
    assert small_loss_weights(ell, 0.5).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # ⌈2.5⌉ = 3
    assert small_loss_weights(ell, 0.61).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # ⌈3.05⌉ = 4
    assert small_loss_weights(ell, 1.0).tolist() == [1.0] * 5
    # ⌈0.6·3⌉ = 2 of equal losses 0.2: the earlier item is kept (a stable order)
    assert small_loss_weights(torch.tensor([0.2, 0.1, 0.2], dtype=dtype), 0.6).tolist() == [
        1.0, 1.0, 0.0,
    ]  # fmt: skip
    assert small_loss_weights(torch.zeros(0, dtype=dtype), 0.5).numel() == 0


def _batch(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(4)
    h = [torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2)]
    c = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    return [x.to(dtype) for x in h], c.to(dtype), y.to(dtype)


KW = dict(epoch=3, warmup_epochs=1, gamma=2.0, alpha=0.3, r=0.2)


def _objective(weighting: str, loss_form: str = "robust", keep_rate: float = 1.0, dtype=None):
    h, c, y = _batch(dtype or torch.float32)
    return rshnl_objective(
        h[0], h[1], c, y, weighting=weighting, loss_form=loss_form, keep_rate=keep_rate, **KW
    )


def _reference(weighting: str, loss_form: str = "robust", keep_rate: float = 1.0, dtype=None):
    h, c, y = _batch(dtype or torch.float32)
    hi, ht, c64 = R.f64(h[0], h[1], c)
    return R.objective(
        hi, ht, c64, y.tolist(), weighting=weighting, loss_form=loss_form, keep_rate=keep_rate,
        **KW,
    )  # fmt: skip


def _assert_matches(t, ref, dtype) -> None:
    tol = TOL[dtype]
    for key in ("total", "chl", "center"):
        assert getattr(t, key).item() == pytest.approx(R.value(ref[key]), rel=tol), key
    assert t.ell.tolist() == pytest.approx([R.value(x) for x in ref["ell"]], rel=tol)
    assert t.weights.tolist() == pytest.approx(ref["weights"], rel=tol, abs=1e-12)
    assert t.predicted.tolist() == ref["predicted"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_form", ["robust", "ce"])
@pytest.mark.parametrize(
    ("weighting", "keep_rate"),
    [("none", 1.0), ("spl", 1.0), ("hard", 1.0), ("small_loss", 0.5), ("small_loss", 0.8)],
)
def test_objective_variants_match_the_brute_force_reference(dtype, loss_form, weighting,
                                                            keep_rate):  # fmt: skip
    t = _objective(weighting, loss_form, keep_rate, dtype)
    assert not t.warmup and t.total.dtype == dtype
    _assert_matches(t, _reference(weighting, loss_form, keep_rate, dtype), dtype)


def test_variant_weights_by_hand():
    ref = _reference("none")
    ell = [R.value(x) for x in ref["ell"]]
    # the batch has pairs on both sides of γ = 2, so "hard" keeps some and drops some
    assert min(ell) < 2.0 < max(ell)
    assert _objective("none").weights.tolist() == [1.0] * 6
    assert _objective("hard").weights.tolist() == [1.0 if x < 2.0 else 0.0 for x in ell]
    order = sorted(range(6), key=lambda i: ell[i])
    sl = _objective("small_loss", keep_rate=0.5)
    assert sl.weights.tolist() == [1.0 if i in order[:3] else 0.0 for i in range(6)]
    # small-loss averages over the kept pairs, not over the batch
    want = sum(ell[i] for i in order[:3]) / 3 + 0.3 * R.value(ref["chl"])
    assert sl.total.item() == pytest.approx(want, rel=1e-5)


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting"):
        _objective("bogus")
    with pytest.raises(ConfigError, match="weighting"):
        TrainConfig(dataset="x", weighting="bogus").validate()


def test_method_overrides():
    base = TrainConfig(dataset="x")
    assert apply_method("RSHNL", base) == base
    assert apply_method("RSHNL-1", base).warmup_epochs == 0
    assert apply_method("RSHNL-2", base).alpha == 0.0
    assert apply_method("RSHNL-3", base).weighting == "none"
    assert apply_method("RSHNL-S", base).weighting == "hard"
    d = apply_method("RSHNL-D", base)
    # ℓmax(r = 0.01) = 2(0.01² − 0.01 + 1)/0.01 = 198.02 (Eq 14): RSHNL-D's γ is 1.5 × that
    assert d.gamma == pytest.approx(1.5 * 198.02) and d.gamma_fraction == pytest.approx(1.5)
    assert d.allow_gamma_above_ell_max
    plain = apply_method("plain", base)
    assert (plain.loss_form, plain.weighting) == ("ce", "none")
    assert apply_method("small-loss", base).weighting == "small_loss"
    assert apply_method("SCBCH", base).method == "scbch"
    m = apply_method("RSHNL-M", base)
    assert (m.weighting, m.gamma_mode, m.tau_center) == ("mixture", "fixed", 0.2)
    g = apply_method("RSHNL-G", base)
    assert (g.weighting, g.gamma_mode) == ("spl", "mixture")
    paper = apply_method("RSHNL-P", m)  # restores the paper's NSH on top of any config
    assert (paper.weighting, paper.gamma_mode, paper.tau_center) == ("spl", "fixed", 0.0)
    assert paper.replace(tau_center=0.0) == base.replace(tau_center=0.0)
    mp = apply_method("RSHNL-MP", base)
    assert (mp.weighting, mp.pseudo_labels, mp.tau_center) == ("mixture", True, 0.2)
    assert apply_method("RSHNL-M", mp).pseudo_labels is False
    assert apply_method("RSHNL-PR", base).feature_norm == "none"
    assert apply_method("RSHNL-MR", base).feature_norm == "none"
    assert apply_method("RSHNL-P", mp).replace(tau_center=0.0) == base.replace(tau_center=0.0)
    assert len(METHODS) == 15
    with pytest.raises(ConfigError, match="unknown method 'RSHNL-9'"):
        apply_method("RSHNL-9", base)
