"""Objective variants of the benchmark grid: hand-computed weights and losses, method overrides."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.method.losses import (
    ce_term,
    center_aggregation_loss,
    chl_loss,
    ell_max,
    hard_weights,
    pair_losses,
    robust_term,
    rshnl_objective,
    small_loss_weights,
)
from pipeline.method.variants import METHODS, apply_method


def test_ce_term_is_negative_log_and_the_small_r_limit_of_the_robust_term():
    p = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    assert ce_term(p).tolist() == pytest.approx([-math.log(0.9), -math.log(0.5), -math.log(0.01)])
    assert robust_term(p, 1e-6).tolist() == pytest.approx(ce_term(p).tolist(), rel=1e-4)


def test_hard_weights_keep_exactly_the_pairs_eq12_keeps():
    ell = torch.tensor([1.0, 2.999, 3.0, 5.0])
    assert hard_weights(ell, 3.0).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_small_loss_weights_keep_the_smallest_share():
    ell = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert small_loss_weights(ell, 0.4).tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert small_loss_weights(ell, 0.6).tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # ⌈0.6·5⌉ = 3
    assert small_loss_weights(ell, 0.01).sum().item() == 1.0  # at least one item


def _batch():
    g = torch.Generator().manual_seed(4)
    h = [torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2)]
    c = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    return h, c, y


def _objective(weighting: str, loss_form: str = "robust", keep_rate: float = 1.0):
    h, c, y = _batch()
    return rshnl_objective(
        h[0], h[1], c, y, epoch=3, warmup_epochs=1, gamma=2.0, alpha=0.3, r=0.2,
        weighting=weighting, loss_form=loss_form, keep_rate=keep_rate,
    )  # fmt: skip


def test_unweighted_objective_is_lp_plus_alpha_lc_after_warmup():
    h, c, y = _batch()
    expect = center_aggregation_loss(pair_losses(h, c, y, 1.0, 0.2)) + 0.3 * chl_loss(h, 1.0, 0.2)
    t = _objective("none")
    assert t.total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert t.weights.tolist() == [1.0] * 6


def test_ce_objective_uses_negative_log_terms():
    h, c, y = _batch()
    p = [torch.softmax(x @ c.T, dim=1) for x in h]
    ell = sum(-torch.log((y * pm).sum(1)) for pm in p)
    t = _objective("none", "ce")
    lc = chl_loss(h, 1.0, 0.2, loss_form="ce")
    assert t.total.item() == pytest.approx((ell.mean() + 0.3 * lc).item(), rel=1e-6)


def test_hard_and_small_loss_objectives_average_over_the_kept_pairs():
    h, c, y = _batch()
    ell = pair_losses(h, c, y, 1.0, 0.2)
    lc = chl_loss(h, 1.0, 0.2)
    hard = _objective("hard")
    w = (ell < 2.0).float()
    assert hard.total.item() == pytest.approx(((w * ell).mean() + 0.3 * lc).item(), rel=1e-6)
    sl = _objective("small_loss", keep_rate=0.5)
    kept = torch.sort(ell).values[:3]
    assert sl.total.item() == pytest.approx((kept.mean() + 0.3 * lc).item(), rel=1e-6)
    assert sl.weights.sum().item() == 3


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
    assert d.gamma > ell_max(base.r) and d.gamma_fraction == pytest.approx(1.5)
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
