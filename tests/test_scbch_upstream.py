"""SCBCH's ``upstream`` form (the authors' formulation): contrastive loss, objective, intra-modal
reliability weights, model and config, each against a hand computation or a loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as R
import torch

from pipeline.config import SCBCH_FORMS, ConfigError, TrainConfig
from pipeline.method import knn
from pipeline.method import scbch as S
from pipeline.method.model import model_from_arch

UP = dict(margin=0.15, shift=0.8, tau=1.0)


def test_forms_are_named_alike_in_config_and_method():
    assert SCBCH_FORMS == S.FORMS


def test_upstream_contrastive_hand_two_items():
    # u_img = identity rows, so S_ij = u_txt[j][i]: S = [[0.9, 0.3], [0.5, 0.8]]; disjoint labels.
    u_img = torch.eye(2, dtype=torch.float64)
    u_txt = torch.tensor([[0.9, 0.5], [0.3, 0.8]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # kept entries: the diagonal (clamped at 0: unchanged); S01 = 0.3 and S10 = 0.5 fall below
    # both anchors' S_ii − 0.15 and are lowered by 0.8 → −0.5, −0.3; (1 − T) is 0 on the
    # diagonal; no label-sharing off-diagonal pair; mean diagonal 0.85
    ranking = (2 + 2 + 2 * math.exp(-0.5) + 2 * math.exp(-0.3)) / 4
    got = S.upstream_contrastive(u_img, u_txt, y, **UP).item()
    assert got == pytest.approx(ranking - 0.85, rel=1e-12)
    assert got == pytest.approx(0.823674440, rel=1e-8)


def test_upstream_contrastive_hand_shared_label_and_negative_diagonal():
    # S = [[−0.2, 0.1], [0.4, 0.6]], labels {0, 1} and {0}: T01 = T10 = ½
    u_img = torch.eye(2, dtype=torch.float64)
    u_txt = torch.tensor([[-0.2, 0.4], [0.1, 0.6]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # text anchors: row 0 threshold −0.35 keeps S01 = 0.1; row 1 threshold 0.45 lowers S10 to −0.4
    # image anchors: column 0 threshold −0.35 keeps S10 = 0.4; column 1 threshold 0.45 lowers
    # S01 to −0.7; S00 = −0.2 is clamped to 0 in both
    e = math.exp
    ranking = (
        (1 + 1)  # (0, 0): clamped, 1 − T = 0
        + (e(0.1 * 0.5) + e(-0.7 * 0.5))  # (0, 1)
        + (e(-0.4 * 0.5) + e(0.4 * 0.5))  # (1, 0)
        + (1 + 1)  # (1, 1)
    ) / 4
    positive = (e(0.8 - 0.1) + e(0.8 - 0.4)) / 4
    want = ranking + positive - (-0.2 + 0.6) / 2
    assert S.upstream_contrastive(u_img, u_txt, y, **UP).item() == pytest.approx(want, rel=1e-12)


def _inputs(dtype: torch.dtype, seed: int = 3, b: int = 6, bits: int = 8, k: int = 4):
    gen = torch.Generator().manual_seed(seed)

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).requires_grad_(True)

    u = torch.nn.functional.normalize(torch.tanh(torch.randn(b, bits, generator=gen)), dim=1)
    v = torch.nn.functional.normalize(torch.tanh(torch.randn(b, bits, generator=gen)), dim=1)
    y = (torch.rand(b, k, generator=gen) < 0.4).to(dtype)
    y[0] = 0.0  # an unlabelled row
    y[1] = y[2]  # two identical label sets
    li, lt = torch.randn(b, k, generator=gen), torch.randn(b, k, generator=gen)
    return leaf(u), leaf(v), leaf(li), leaf(lt), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_upstream_contrastive_matches_loop(dtype, tau):
    u, v, _, _, y = _inputs(dtype)
    hp = UP | {"tau": tau}
    got = S.upstream_contrastive(u, v, y, **hp)
    assert got.dtype == dtype
    want = R.upstream_contrastive_loop(u.detach(), v.detach(), y, **hp)
    assert got.item() == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_upstream_objective_matches_loop_and_finite_differences():
    u, v, li, lt, y = _inputs(torch.float64)
    w = torch.tensor([1.0, 0.5, 0.75, 0.6, 0.9, 0.55], dtype=torch.float64)
    hp = dict(alpha=0.7, beta=0.3, separation_weight=5.0, form="upstream", **UP)
    t = S.scbch_objective(u, v, li, lt, y, w, **hp)

    def bce(x: float, target: float) -> float:
        return -(
            target * math.log(1 / (1 + math.exp(-x)))
            + (1 - target) * math.log(1 - 1 / (1 + math.exp(-x)))
        )

    def quant(m: torch.Tensor) -> float:
        vals = [abs(a - (1.0 if a >= 0 else -1.0)) for row in m.tolist() for a in row]
        return sum(vals) / len(vals)

    rows = y.tolist()
    c = [
        0.5
        * (
            sum(bce(a, b) for a, b in zip(li.tolist()[i], rows[i], strict=True)) / len(rows[i])
            + sum(bce(a, b) for a, b in zip(lt.tolist()[i], rows[i], strict=True)) / len(rows[i])
        )
        for i in range(len(rows))
    ]
    con = R.upstream_contrastive_loop(u.detach(), v.detach(), y, **UP)
    q = quant(u) + quant(v)  # summed, not averaged, over the two modalities
    cls = sum(a * b for a, b in zip(w.tolist(), c, strict=True)) / len(c)
    assert t.contrastive.item() == pytest.approx(con, rel=1e-12)
    assert t.quantization.item() == pytest.approx(q, rel=1e-12)
    assert t.per_item.tolist() == pytest.approx(c, rel=1e-10)
    assert t.total.item() == pytest.approx(0.7 * con + 0.3 * q + cls, rel=1e-10)

    def total(a, b, c_, d):
        return S.scbch_objective(a, b, c_, d, y, w, **hp).total

    assert torch.autograd.gradcheck(total, (u, v, li, lt), eps=1e-6, atol=1e-5)


def test_the_forms_differ_and_an_unknown_form_is_refused():
    u, v, li, lt, y = _inputs(torch.float64)
    hp = dict(alpha=0.7, beta=0.3, separation_weight=1.0, **UP)
    a = S.scbch_objective(u, v, li, lt, y, None, **hp).total.item()
    b = S.scbch_objective(u, v, li, lt, y, None, form="upstream", **hp).total.item()
    assert a != pytest.approx(b, rel=1e-3)
    with pytest.raises(ValueError, match="form"):
        S.scbch_objective(u, v, li, lt, y, None, form="paper", **hp)


def _codes(n: int = 23, bits: int = 6, k_lab: int = 5, seed: int = 4):
    rng = np.random.default_rng(seed)
    img = np.tanh(rng.normal(size=(n, bits)))
    txt = np.tanh(rng.normal(size=(n, bits)))
    y = (rng.random((n, k_lab)) < 0.35).astype(np.float32)
    y[3] = 0.0
    return img, txt, y


@pytest.mark.parametrize("k", [1, 4, 30])
def test_intra_reliability_matches_loop(k):
    img, txt, y = _codes()
    want = R.reliability_weights_loop(img, txt, y, range(len(y)), k, 0.5, "intra")
    got = S.reliability_weights(
        torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(y), k=k, g=0.5,
        neighbours="intra", chunk=7,
    )  # fmt: skip
    assert np.allclose(got.numpy(), want, atol=1e-5)
    cross = S.reliability_weights(
        torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(y), k=k, g=0.5
    )
    if k < len(y) - 1:
        assert not np.allclose(cross.numpy(), want, atol=1e-3)  # a different neighbourhood


def test_intra_reliability_hand_k2():
    # items 0..3: images identical for 0, 1, 2 and opposite for 3; texts all equal
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])
    txt = torch.ones(4, 2)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w = S.reliability_weights(img, txt, y, k=2, g=0.5, neighbours="intra")
    # item 0: s01 = 1, s02 = ½(0.8 + 1) = 0.9 → ŷ ∝ (1, 0.9), cos with (1, 0) = 1/√1.81
    assert w[0].item() == pytest.approx(0.5 + 0.5 / math.sqrt(1.81), rel=1e-6)
    # item 3: s30 = s31 = ½(−1 + 1) = 0, s32 = ½(−0.8 + 1) = 0.1 → neighbours 2 (0.1) then 0 (0);
    # ŷ = (0.1·(0, 1) + 0·(1, 0)) / (0.1 + 1e-8) → cos with (0, 1) = 1
    assert w[3].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_intra_reliability_matches_loop(shards):
    img, txt, y = _codes(n=31)
    ids = np.arange(31, dtype=np.int64) * 7 + 2
    order = np.random.default_rng(0).permutation(31)
    parts = np.array_split(order, shards)
    got = knn.sharded_reliability(
        [(ids[p], img[p], txt[p], y[p]) for p in parts], k=5, g=0.4, neighbours="intra", chunk=4
    )
    want = R.reliability_weights_loop(img, txt, y, ids, 5, 0.4, "intra")
    for p, w in zip(parts, got, strict=True):
        assert np.allclose(w, want[p], atol=1e-6)


def test_upstream_model_normalised_codes_and_bias_free_orthogonal_classifiers():
    torch.manual_seed(0)
    arch = dict(image_dim=7, text_dim=5, num_classes=3, bits=8, hidden=16, method="scbch")
    up = model_from_arch(arch | {"form": "upstream"})
    old = model_from_arch(arch)  # a model file without "form" is the project form
    assert (up.form, old.form) == ("upstream", "project")
    x, t = torch.randn(9, 7), torch.randn(9, 5)
    u_img, u_txt, _, lg, _ = up(x, t)
    assert torch.allclose(u_img.norm(dim=1), torch.ones(9), atol=1e-6)
    assert torch.allclose(u_txt.norm(dim=1), torch.ones(9), atol=1e-6)
    assert up.image_cls.bias is None and up.text_cls.bias is None
    wt = up.image_cls.weight
    assert torch.allclose(wt @ wt.T, torch.eye(3), atol=1e-5)  # orthonormal rows
    assert torch.allclose(lg, u_img @ wt.T)
    p_img = old(x, t)[0]
    assert not torch.allclose(p_img.norm(dim=1), torch.ones(9), atol=1e-3)
    assert old.image_cls.bias is not None
    with pytest.raises(ValueError, match="form"):
        model_from_arch(arch | {"form": "paper"})


def test_config_resolves_each_forms_margin_shift_and_tau():
    proj = TrainConfig(dataset="x", method="scbch", scbch_form="project").validate()
    up = TrainConfig(dataset="x", method="scbch").validate()
    assert up.scbch_form == "upstream"  # the default
    assert proj.scbch_params() == {"margin": 0.2, "shift": 0.3, "tau": 0.1}
    assert up.scbch_params() == {"margin": 0.15, "shift": 0.8, "tau": 1.0}
    mixed = TrainConfig.from_dict({"dataset": "x", "scbch_form": "upstream", "scbch_shift": 1})
    assert mixed.scbch_params() == {"margin": 0.15, "shift": 1.0, "tau": 1.0}
    assert isinstance(mixed.scbch_shift, float)
    with pytest.raises(ConfigError, match="scbch_tau"):
        TrainConfig.from_dict({"dataset": "x", "scbch_tau": "big"})
    with pytest.raises(ConfigError, match="scbch_form"):
        TrainConfig(dataset="x", scbch_form="paper").validate()
    with pytest.raises(ConfigError, match="scbch_tau"):
        TrainConfig(dataset="x", scbch_tau=0.0).validate()
