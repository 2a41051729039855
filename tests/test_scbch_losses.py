"""SCBCH losses against hand computations and literal Python-loop references."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import scbch as S

# ---------- plain-Python references ----------


def _cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def _jac(a: list[float], b: list[float]) -> float:
    inter = sum(1 for x, y in zip(a, b, strict=True) if x > 0 and y > 0)
    union = sum(1 for x, y in zip(a, b, strict=True) if x > 0 or y > 0)
    return inter / union if union else 0.0


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _soft_ce_loop(sim: list[list[float]], tgt: list[list[float]], margin, tau) -> float | None:
    losses = []
    for i in range(len(sim)):
        total = sum(tgt[i])
        if total == 0:
            continue
        logits = [(sim[i][j] - margin * tgt[i][j]) / tau for j in range(len(sim[i]))]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        losses.append(-sum(tgt[i][j] / total * (logits[j] - lse) for j in range(len(logits))))
    return sum(losses) / len(losses) if losses else None


def _pairs(u_img, u_txt, labels):
    ui, ut, y = u_img.tolist(), u_txt.tolist(), labels.tolist()
    n = len(ui)
    sim = [[_cos(ui[i], ut[j]) for j in range(n)] for i in range(n)]
    tgt = [[_jac(y[i], y[j]) for j in range(n)] for i in range(n)]
    return sim, tgt


def _transpose(m):
    return [list(r) for r in zip(*m, strict=True)]


def _reliability_loop(img, txt, y, k, g) -> list[float]:
    n = len(y)
    k = min(k, n - 1)
    out = []
    for i in range(n):
        cand = []
        for j in range(n):
            if j == i:
                continue
            s = 0.5 * (_cos(img[i], txt[j]) + _cos(txt[i], img[j]))
            cand.append((-s, j, s))
        cand.sort()
        y_hat = [0.0] * len(y[i])
        for _, j, s in cand[:k]:
            for c in range(len(y_hat)):
                y_hat[c] += max(s, 0.0) * y[j][c]
        out.append(g + (1.0 - g) * _cos(y_hat, y[i]))
    return out


def _example(seed: int = 0, b: int = 3, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    u_img = torch.tanh(torch.randn(b, bits, generator=gen, dtype=torch.float64))
    u_txt = torch.tanh(torch.randn(b, bits, generator=gen, dtype=torch.float64))
    return u_img, u_txt


# ---------- jaccard / cosine ----------


def test_jaccard_hand_with_empty_row():
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    J = S.jaccard(y, y)
    expected = [[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert J.shape == (3, 3)
    assert torch.allclose(J, torch.tensor(expected))
    assert torch.isfinite(J).all()


def test_jaccard_rectangular():
    a = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(S.jaccard(a, b), torch.tensor([[1 / 4, 2 / 3]]))


def test_cosine_matrix_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]])
    C = S.cosine_matrix(x, y)
    expected = [
        [0.8, -0.6, 7 / (5 * math.sqrt(2))],
        [0.0, -1.0, 1 / math.sqrt(2)],
    ]
    assert C.shape == (2, 3)
    assert torch.allclose(C, torch.tensor(expected), atol=1e-6)
    zero = S.cosine_matrix(torch.zeros(1, 2), y)
    assert torch.equal(zero, torch.zeros(1, 3))


# ---------- BSCH ----------


def test_soft_contrastive_matches_loop():
    u_img, u_txt = _example(seed=1)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    margin, tau = 0.2, 0.3
    sim, tgt = _pairs(u_img, u_txt, labels)
    ref = 0.5 * (
        _soft_ce_loop(sim, tgt, margin, tau)
        + _soft_ce_loop(_transpose(sim), _transpose(tgt), margin, tau)
    )
    got = S.soft_contrastive(u_img, u_txt, labels, margin=margin, tau=tau)
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_soft_contrastive_is_bidirectional():
    # Asymmetric S: swapping modalities transposes S, which must leave ½(L_i2t + L_t2i) unchanged
    # but change a one-directional loss.
    u_img, u_txt = _example(seed=2)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    a = S.soft_contrastive(u_img, u_txt, labels, margin=0.1, tau=0.5)
    b = S.soft_contrastive(u_txt, u_img, labels, margin=0.1, tau=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    sim, tgt = _pairs(u_img, u_txt, labels)
    one_way = _soft_ce_loop(sim, tgt, 0.1, 0.5)
    other_way = _soft_ce_loop(_transpose(sim), _transpose(tgt), 0.1, 0.5)
    assert one_way != pytest.approx(other_way, rel=1e-6)


def test_soft_contrastive_skips_unlabelled_rows():
    u_img, u_txt = _example(seed=3)
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    margin, tau = 0.3, 0.4
    sim, tgt = _pairs(u_img, u_txt, labels)
    # reference: row 1 has no target mass in either direction, so only rows 0 and 2 count
    ref = 0.5 * (
        _soft_ce_loop(sim, tgt, margin, tau)
        + _soft_ce_loop(_transpose(sim), _transpose(tgt), margin, tau)
    )
    got = S.soft_contrastive(u_img, u_txt, labels, margin=margin, tau=tau)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # averaging over all three rows (a zero loss for row 1) would give 2/3 of the value
    assert got.item() != pytest.approx(ref * 2 / 3, rel=1e-3)


def test_soft_contrastive_all_rows_skipped_is_zero_with_graph():
    u_img, u_txt = _example(seed=4)
    u_img.requires_grad_(True)
    labels = torch.zeros(3, 2, dtype=torch.float64)
    got = S.soft_contrastive(u_img, u_txt, labels, margin=0.2, tau=0.3)
    assert got.item() == 0.0
    assert got.requires_grad
    got.backward()
    assert u_img.grad is not None and torch.equal(u_img.grad, torch.zeros_like(u_img))


def test_soft_contrastive_margin_raises_loss():
    u_img, u_txt = _example(seed=5)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    lo = S.soft_contrastive(u_img, u_txt, labels, margin=0.0, tau=0.5)
    hi = S.soft_contrastive(u_img, u_txt, labels, margin=0.5, tau=0.5)
    assert hi.item() > lo.item()


def test_pair_separation_matches_loop():
    u_img, u_txt = _example(seed=6, b=4)
    labels = torch.tensor(
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    shift, tau = 0.25, 0.2
    sim, tgt = _pairs(u_img, u_txt, labels)
    n = len(sim)
    ref = 0.0
    for i in range(n):
        for j in range(n):
            z = (sim[i][j] - shift) / tau
            ref += tgt[i][j] * _softplus(-z) + (1.0 - tgt[i][j]) * _softplus(z)
    ref /= n * n
    got = S.pair_separation(u_img, u_txt, labels, shift=shift, tau=tau)
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_bsch_loss_is_weighted_sum():
    u_img, u_txt = _example(seed=7)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    sim, tgt = _pairs(u_img, u_txt, labels)
    margin, shift, tau, w = 0.2, 0.1, 0.5, 0.4
    con = 0.5 * (
        _soft_ce_loop(sim, tgt, margin, tau)
        + _soft_ce_loop(_transpose(sim), _transpose(tgt), margin, tau)
    )
    sep = (
        sum(
            tgt[i][j] * _softplus(-(sim[i][j] - shift) / tau)
            + (1 - tgt[i][j]) * _softplus((sim[i][j] - shift) / tau)
            for i in range(3)
            for j in range(3)
        )
        / 9
    )
    got = S.bsch_loss(
        u_img, u_txt, labels, margin=margin, shift=shift, tau=tau, separation_weight=w
    )
    assert got.item() == pytest.approx(con + w * sep, rel=1e-9)
    default = S.bsch_loss(u_img, u_txt, labels, margin=margin, shift=shift, tau=tau)
    assert default.item() == pytest.approx(con + sep, rel=1e-9)


# ---------- quantization / classification ----------


def test_quantization_hand_values():
    u = torch.tensor([[0.5, -0.25, 0.0]])
    # |0.5-1|, |-0.25+1|, |0-1| (sgn(0) = +1)
    assert S.quantization_loss(u, u).item() == pytest.approx((0.5 + 0.75 + 1.0) / 3)
    v = torch.tensor([[0.9, -0.9, -0.5]])
    expected = 0.5 * ((0.5 + 0.75 + 1.0) / 3 + (0.1 + 0.1 + 0.5) / 3)
    assert S.quantization_loss(u, v).item() == pytest.approx(expected)


def test_classification_losses_formula():
    li = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    lt = torch.tensor([[-0.5, 1.5], [3.0, -2.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def bce(x: float, t: float) -> float:
        p = 1.0 / (1.0 + math.exp(-x))
        return -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))

    ref = [
        sum(bce(li[i, k].item(), y[i, k].item()) for k in range(2)) / 2
        + sum(bce(lt[i, k].item(), y[i, k].item()) for k in range(2)) / 2
        for i in range(2)
    ]
    got = S.classification_losses(li, lt, y)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(ref, rel=1e-6)


def test_weighted_classification_hand_and_detached():
    c = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    w = torch.tensor([0.5, 1.0, 0.25], requires_grad=True)
    got = S.weighted_classification(c, w)
    assert got.item() == pytest.approx((0.5 + 2.0 + 1.0) / 3)
    got.backward()
    assert w.grad is None
    assert torch.allclose(c.grad, torch.tensor([0.5, 1.0, 0.25]) / 3)


# ---------- reliability weights ----------


def _five_items():
    # img = txt, so sim_ij = cos(x_i, x_j).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # 0: nearest is 1 (sim 1), same labels
            [1.0, 0.0, 0.0],  # 1: nearest is 0 (sim 1), same labels
            [0.0, 1.0, 0.0],  # 2: nearest is 3 (sim 1), disjoint labels
            [0.0, 0.0, 1.0],  # 3: nearest is 2 (sim 1), disjoint labels
            [0.0, 1.0, 0.0],  # 4: sim 1/√2 with all four; tie → item 0, disjoint labels
        ]
    )
    return x, y


def test_reliability_weights_hand_k1():
    x, y = _five_items()
    g = 0.5
    w = S.reliability_weights(x, x, y, k=1, g=g)
    assert w.dtype == torch.float32 and w.shape == (5,)
    # agreeing neighbour → 1.0; disagreeing neighbour → g; item 4's tie goes to index 0 (not 2)
    assert w.tolist() == pytest.approx([1.0, 1.0, g, g, g], abs=1e-6)


def test_reliability_weights_hand_k2():
    x, y = _five_items()
    g = 0.2
    w = S.reliability_weights(x, x, y, k=2, g=g)
    # item 0: sims 1 → 1, 2 → 0, 3 → 0, 4 → 1/√2, so the neighbours are 1 and 4:
    #   ŷ0 = y1 + (1/√2)·y4 = [1, 1/√2, 0]; cos with [1,0,0] = 1/√(1.5)
    c0 = 1 / math.sqrt(1.5)
    # item 2: neighbours 3 (sim 1) and 4 (1/√2): ŷ2 = [0, 1/√2, 1]; cos with [0,1,0] = (1/√2)/√1.5
    c2 = (1 / math.sqrt(2)) / math.sqrt(1.5)
    # item 3: neighbours 2 (sim 1) and 4: ŷ3 = [0, 1 + 1/√2, 0]; cos with [0,0,1] = 0
    # item 4: all four tie at 1/√2 → neighbours 0 and 1: ŷ4 = √2·[1,0,0]; cos with [0,1,0] = 0
    expected = [g + (1 - g) * c for c in (c0, c0, c2, 0.0, 0.0)]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)
    loop = _reliability_loop(x.tolist(), x.tolist(), y.tolist(), 2, g)
    assert w.tolist() == pytest.approx(loop, abs=1e-6)


def test_reliability_weights_tie_break_prefers_smaller_index():
    x, y = _five_items()
    # relabel item 4 like item 0: the tie goes to item 0, so the weight is 1.0 (g via item 2)
    y2 = y.clone()
    y2[4] = torch.tensor([1.0, 0.0, 0.0])
    w = S.reliability_weights(x, x, y2, k=1, g=0.5)
    assert w[4].item() == pytest.approx(1.0, abs=1e-6)


def test_reliability_weights_zero_label_and_negative_sim():
    img = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    w = S.reliability_weights(img, img, y, k=1, g=0.3)
    # item 0: nearest 2 has no labels → ŷ = 0 → g. item 1: both neighbours at sim −1 → max(·,0) = 0
    # → g. item 2: own labels empty → g.
    assert w.tolist() == pytest.approx([0.3, 0.3, 0.3], abs=1e-6)


def test_reliability_weights_cross_modal_random_vs_loop_and_chunks():
    gen = torch.Generator().manual_seed(11)
    n, bits, k_lab = 37, 6, 5
    img = torch.tanh(torch.randn(n, bits, generator=gen))
    txt = torch.tanh(torch.randn(n, bits, generator=gen))
    y = (torch.rand(n, k_lab, generator=gen) < 0.35).float()
    y[3] = 0.0
    ref = _reliability_loop(img.tolist(), txt.tolist(), y.tolist(), 4, 0.5)
    full = S.reliability_weights(img, txt, y, k=4, g=0.5, chunk=n)
    chunked = S.reliability_weights(img, txt, y, k=4, g=0.5, chunk=5)
    assert full.tolist() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(full, chunked, atol=1e-6)
    assert full[3].item() == pytest.approx(0.5)
    # k larger than N − 1 is clipped
    clipped = S.reliability_weights(img, txt, y, k=1000, g=0.5, chunk=7)
    ref_all = _reliability_loop(img.tolist(), txt.tolist(), y.tolist(), n - 1, 0.5)
    assert clipped.tolist() == pytest.approx(ref_all, abs=1e-5)


def test_reliability_weights_no_grad():
    x, y = _five_items()
    x = x.clone().requires_grad_(True)
    w = S.reliability_weights(x, x, y, k=1, g=0.5)
    assert not w.requires_grad


# ---------- full objective ----------


def _objective_inputs():
    gen = torch.Generator().manual_seed(21)
    b, bits, k_lab = 4, 8, 3
    u_img = torch.tanh(torch.randn(b, bits, generator=gen)).requires_grad_(True)
    u_txt = torch.tanh(torch.randn(b, bits, generator=gen)).requires_grad_(True)
    li = torch.randn(b, k_lab, generator=gen).requires_grad_(True)
    lt = torch.randn(b, k_lab, generator=gen).requires_grad_(True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return u_img, u_txt, li, lt, y


HP = dict(alpha=0.7, beta=0.3, margin=0.2, shift=0.1, tau=0.3, separation_weight=0.5)


def test_objective_total_and_gradients():
    u_img, u_txt, li, lt, y = _objective_inputs()
    w = torch.tensor([1.0, 0.5, 0.75, 0.6], requires_grad=True)
    terms = S.scbch_objective(u_img, u_txt, li, lt, y, w, **HP)
    bsch = S.bsch_loss(
        u_img, u_txt, y, margin=0.2, shift=0.1, tau=0.3, separation_weight=0.5
    ).item()
    quant = S.quantization_loss(u_img, u_txt).item()
    c = S.classification_losses(li, lt, y).detach()
    cls = (w.detach() * c).mean().item()
    assert terms.total.item() == pytest.approx(0.7 * bsch + 0.3 * quant + cls, rel=1e-5)
    assert terms.contrastive.item() == pytest.approx(bsch, rel=1e-6)
    assert terms.quantization.item() == pytest.approx(quant, rel=1e-6)
    assert terms.classification.item() == pytest.approx(cls, rel=1e-6)
    assert torch.allclose(terms.per_item, c)
    for t in (terms.contrastive, terms.quantization, terms.classification, terms.per_item):
        assert not t.requires_grad
    terms.total.backward()
    for p in (u_img, u_txt, li, lt):
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
        assert p.grad.abs().sum().item() > 0
    assert w.grad is None


def test_objective_weights_none_means_ones():
    u_img, u_txt, li, lt, y = _objective_inputs()
    a = S.scbch_objective(u_img, u_txt, li, lt, y, None, **HP)
    b = S.scbch_objective(u_img, u_txt, li, lt, y, torch.ones(4), **HP)
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-7)
    assert a.classification.item() == pytest.approx(a.per_item.mean().item(), rel=1e-6)
    half = S.scbch_objective(u_img, u_txt, li, lt, y, torch.full((4,), 0.5), **HP)
    assert half.classification.item() == pytest.approx(0.5 * a.classification.item(), rel=1e-6)
