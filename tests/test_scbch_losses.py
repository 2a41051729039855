"""SCBCH losses against hand computations and literal Python-loop references."""

from __future__ import annotations

import math

import pytest
import references as R
import torch

from pipeline.method import scbch as S

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


def _soft_targets_loop(tgt: list[list[float]], lam: float) -> list[list[float]]:
    out = []
    for i, row in enumerate(tgt):
        total = sum(row)
        share = [
            (row[j] / total) if total > 0 else (1.0 if j == i else 0.0) for j in range(len(row))
        ]
        eye = [1.0 if j == i else 0.0 for j in range(len(row))]
        out.append([(1.0 - lam) * eye[j] + lam * share[j] for j in range(len(row))])
    return out


def _soft_ce_loop(sim, jac, tgt, margin, tau) -> float:
    """mean over ALL rows i of −Σ_j tgt_ij · log_softmax_j((sim − margin·jac)/tau)."""
    losses = []
    for i in range(len(sim)):
        logits = [(sim[i][j] - margin * jac[i][j]) / tau for j in range(len(sim[i]))]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        losses.append(-sum(tgt[i][j] * (logits[j] - lse) for j in range(len(logits))))
    return sum(losses) / len(losses)


def _contrastive_ref(sim, jac, margin, tau, lam) -> float:
    t = _soft_targets_loop(jac, lam)
    i2t = _soft_ce_loop(sim, jac, t, margin, tau)
    t_txt = _soft_targets_loop(_transpose(jac), lam)  # text anchors' own target rows
    t2i = _soft_ce_loop(_transpose(sim), _transpose(jac), t_txt, margin, tau)
    return 0.5 * (i2t + t2i)


def _separation_ref(sim, jac, shift, tau) -> float:
    pos, neg = [], []
    for i in range(len(sim)):
        for j in range(len(sim[i])):
            z = (sim[i][j] - shift) / tau
            ell = jac[i][j] * _softplus(-z) + (1.0 - jac[i][j]) * _softplus(z)
            (pos if jac[i][j] > 0 else neg).append(ell)
    means = [sum(g) / len(g) for g in (pos, neg) if g]
    return sum(means) / len(means)


def _pairs(u_img, u_txt, labels):
    ui, ut, y = u_img.tolist(), u_txt.tolist(), labels.tolist()
    n = len(ui)
    sim = [[_cos(ui[i], ut[j]) for j in range(n)] for i in range(n)]
    tgt = [[_jac(y[i], y[j]) for j in range(n)] for i in range(n)]
    return sim, tgt


def _transpose(m):
    return [list(r) for r in zip(*m, strict=True)]


def _reliability_loop(img, txt, y, k, g) -> list[float]:
    return R.reliability_weights_loop(img, txt, y, range(len(y)), k, g).tolist()


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


def test_soft_targets_hand():
    # T = Jaccard of [[1,1,0],[0,1,1],[0,0,0]]: row sums 4/3, 4/3 and 0 (unlabelled row 2).
    T = torch.tensor([[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    half = S.soft_targets(T, 0.5)
    # row 0: ½·e_0 + ½·[3/4, 1/4, 0] = [7/8, 1/8, 0]; row 2 (no overlap) → e_2
    expected = [[7 / 8, 1 / 8, 0.0], [1 / 8, 7 / 8, 0.0], [0.0, 0.0, 1.0]]
    assert torch.allclose(half, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # λ = 0: the own pair only
    assert torch.equal(S.soft_targets(T, 0.0), torch.eye(3, dtype=torch.float64))
    # λ = 1: the pure Jaccard share; the unlabelled row still puts all its mass on itself
    pure = [[3 / 4, 1 / 4, 0.0], [1 / 4, 3 / 4, 0.0], [0.0, 0.0, 1.0]]
    assert torch.allclose(S.soft_targets(T, 1.0), torch.tensor(pure, dtype=torch.float64))
    # every row is a distribution
    for lam in (0.0, 0.3, 0.5, 1.0):
        rows = S.soft_targets(T, lam).sum(dim=1)
        assert torch.allclose(rows, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_soft_targets_matches_loop(lam):
    gen = torch.Generator().manual_seed(31)
    T = torch.rand(5, 5, generator=gen, dtype=torch.float64)
    T[2] = 0.0  # a row without overlap
    T[4, 1] = 0.0
    got = S.soft_targets(T, lam)
    ref = _soft_targets_loop(T.tolist(), lam)
    assert got.shape == (5, 5)
    for i in range(5):
        assert got[i].tolist() == pytest.approx(ref[i], rel=1e-12, abs=1e-15)
    assert got[2].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("lam", [0.5, 1.0])
@pytest.mark.parametrize(
    "labels",
    [
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]],
    ],
    ids=["all-labelled", "one-unlabelled"],
)
def test_soft_contrastive_matches_loop(lam, labels):
    y = torch.tensor(labels, dtype=torch.float64)
    u_img, u_txt = _example(seed=1, b=y.shape[0])
    margin, tau = 0.2, 0.3
    sim, jac = _pairs(u_img, u_txt, y)
    ref = _contrastive_ref(sim, jac, margin, tau, lam)
    got = S.soft_contrastive(u_img, u_txt, y, margin=margin, tau=tau, label_share=lam)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref, rel=1e-9)


def test_soft_contrastive_default_label_share_is_half():
    u_img, u_txt = _example(seed=8)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    default = S.soft_contrastive(u_img, u_txt, y, margin=0.2, tau=0.3)
    half = S.soft_contrastive(u_img, u_txt, y, margin=0.2, tau=0.3, label_share=0.5)
    pure = S.soft_contrastive(u_img, u_txt, y, margin=0.2, tau=0.3, label_share=1.0)
    assert default.item() == pytest.approx(half.item(), rel=1e-12)
    assert default.item() != pytest.approx(pure.item(), rel=1e-6)


def test_soft_contrastive_unlabelled_row_is_not_skipped():
    u_img, u_txt = _example(seed=3)
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    margin, tau, lam = 0.3, 0.4, 0.5
    sim, jac = _pairs(u_img, u_txt, y)
    got = S.soft_contrastive(u_img, u_txt, y, margin=margin, tau=tau, label_share=lam)
    assert got.item() == pytest.approx(_contrastive_ref(sim, jac, margin, tau, lam), rel=1e-9)
    # the old behaviour, averaging only rows 0 and 2, gives a different value
    t = _soft_targets_loop(jac, lam)
    keep = [0, 2]

    def rows(m):
        return [m[i] for i in keep]

    simT, jacT = _transpose(sim), _transpose(jac)
    tT = _soft_targets_loop(jacT, lam)
    skipped = 0.5 * (
        _soft_ce_loop(rows(sim), rows(jac), rows(t), margin, tau)
        + _soft_ce_loop(rows(simT), rows(jacT), rows(tT), margin, tau)
    )
    assert got.item() != pytest.approx(skipped, rel=1e-6)


def test_soft_contrastive_no_labels_is_plain_infonce():
    # T = 0 → targets are the identity for any λ and the margin has no effect:
    # ½(CE(S/τ, diag) + CE(S.T/τ, diag)).
    u_img, u_txt = _example(seed=4)
    u_img.requires_grad_(True)
    y = torch.zeros(3, 2, dtype=torch.float64)
    tau = 0.3
    sim, _ = _pairs(u_img.detach(), u_txt, y)
    ref = 0.0
    for m in (sim, _transpose(sim)):
        for i in range(3):
            lse = math.log(sum(math.exp(m[i][j] / tau) for j in range(3)))
            ref += 0.5 * (lse - m[i][i] / tau) / 3
    for lam, margin in ((0.5, 0.2), (1.0, 0.7), (0.0, 0.0)):
        got = S.soft_contrastive(u_img, u_txt, y, margin=margin, tau=tau, label_share=lam)
        assert got.item() == pytest.approx(ref, rel=1e-9)
    got.backward()
    assert u_img.grad is not None and u_img.grad.abs().sum().item() > 0


def test_soft_contrastive_is_bidirectional():
    # Labels with equal Jaccard row sums give symmetric soft targets, so swapping the modalities
    # (which transposes S) must leave ½(L_i2t + L_t2i) unchanged; a one-way loss changes.
    u_img, u_txt = _example(seed=2)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    a = S.soft_contrastive(u_img, u_txt, labels, margin=0.1, tau=0.5)
    b = S.soft_contrastive(u_txt, u_img, labels, margin=0.1, tau=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    sim, jac = _pairs(u_img, u_txt, labels)
    t = _soft_targets_loop(jac, 0.5)
    one_way = _soft_ce_loop(sim, jac, t, 0.1, 0.5)
    t_txt = _soft_targets_loop(_transpose(jac), 0.5)
    other_way = _soft_ce_loop(_transpose(sim), _transpose(jac), t_txt, 0.1, 0.5)
    assert one_way != pytest.approx(other_way, rel=1e-6)
    assert a.item() == pytest.approx(0.5 * (one_way + other_way), rel=1e-9)


def test_soft_contrastive_margin_raises_loss():
    u_img, u_txt = _example(seed=5)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    for lam in (0.5, 1.0):
        lo = S.soft_contrastive(u_img, u_txt, labels, margin=0.0, tau=0.5, label_share=lam)
        hi = S.soft_contrastive(u_img, u_txt, labels, margin=0.5, tau=0.5, label_share=lam)
        assert hi.item() > lo.item()


def test_pair_separation_matches_loop():
    u_img, u_txt = _example(seed=6, b=4)
    labels = torch.tensor(
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    shift, tau = 0.25, 0.2
    sim, jac = _pairs(u_img, u_txt, labels)
    n = len(sim)
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            z = (sim[i][j] - shift) / tau
            ell = jac[i][j] * _softplus(-z) + (1.0 - jac[i][j]) * _softplus(z)
            (pos if jac[i][j] > 0 else neg).append(ell)
    assert pos and neg
    ref = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    got = S.pair_separation(u_img, u_txt, labels, shift=shift, tau=tau)
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # a plain mean over all pairs (the old formula) differs here
    plain = (sum(pos) + sum(neg)) / (n * n)
    assert got.item() != pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize(
    "labels",
    [
        [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]],  # rows 0 and 2 are disjoint
        [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]],  # no disjoint pairs
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],  # no label-sharing pairs
    ],
    ids=["mixed", "no-disjoint", "no-sharing"],
)
def test_pair_separation_groups(labels):
    u_img, u_txt = _example(seed=9, b=4)
    y = torch.tensor(labels, dtype=torch.float64)
    shift, tau = 0.1, 0.3
    sim, jac = _pairs(u_img, u_txt, y)
    got = S.pair_separation(u_img, u_txt, y, shift=shift, tau=tau)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_separation_ref(sim, jac, shift, tau), rel=1e-9)


def test_pair_separation_no_disjoint_pairs_is_plain_mean():
    u_img, u_txt = _example(seed=10, b=3)
    # every item carries label 0, so every pair shares a label
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    shift, tau = 0.2, 0.25
    sim, jac = _pairs(u_img, u_txt, y)
    assert all(v > 0 for r in jac for v in r)
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = (sim[i][j] - shift) / tau
            total += jac[i][j] * _softplus(-z) + (1.0 - jac[i][j]) * _softplus(z)
    got = S.pair_separation(u_img, u_txt, y, shift=shift, tau=tau)
    assert got.item() == pytest.approx(total / 9, rel=1e-9)


def test_bsch_loss_is_weighted_sum():
    u_img, u_txt = _example(seed=7)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    sim, jac = _pairs(u_img, u_txt, labels)
    margin, shift, tau, w = 0.2, 0.1, 0.5, 0.4
    con = _contrastive_ref(sim, jac, margin, tau, 0.5)
    sep = _separation_ref(sim, jac, shift, tau)
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
    # neighbour weight ½(1 + sim): sim 1 → 1, sim 1/√2 → a = ½(1 + 1/√2)
    a = 0.5 * (1 + 1 / math.sqrt(2))
    # item 0: sims 1 → 1, 2 → 0, 3 → 0, 4 → 1/√2, so the neighbours are 1 and 4:
    #   ŷ0 = y1 + a·y4 = [1, a, 0]; cos with [1,0,0] = 1/√(1 + a²)
    c0 = 1 / math.sqrt(1 + a * a)
    # item 2: neighbours 3 (sim 1) and 4 (1/√2): ŷ2 = [0, a, 1]; cos with [0,1,0] = a/√(1 + a²)
    c2 = a / math.sqrt(1 + a * a)
    # item 3: neighbours 2 (sim 1) and 4: ŷ3 = [0, 1 + a, 0]; cos with [0,0,1] = 0
    # item 4: all four tie at 1/√2 → neighbours 0 and 1: ŷ4 = 2a·[1,0,0]; cos with [0,1,0] = 0
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
    img = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    w = S.reliability_weights(img, img, y, k=1, g=0.3)
    # item 0: nearest 2 (sim 1) has no labels → ŷ = 0 → g.
    # item 1: both neighbours at sim −1/√2 (tie → item 0); the weight ½(1 − 1/√2) > 0 still counts,
    #   ŷ1 ∝ y0 = y1 → cos 1 → weight 1 (max(sim, 0) would have given g).
    # item 2: own labels empty → g.
    assert w.tolist() == pytest.approx([0.3, 1.0, 0.3], abs=1e-6)


def test_reliability_weights_all_negative_sims_weighted_hand():
    # item 3 has negative similarity to everyone; its two nearest (0 and 1) still count, weighted
    # by ½(1 + sim), so the propagated label mixes y0 and y1 unequally.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -2.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    g = 0.4
    w = S.reliability_weights(x, x, y, k=2, g=g)
    s30 = -1 / math.sqrt(5)  # cos(x3, x0)
    s31 = -2 / math.sqrt(5)  # cos(x3, x1); cos(x3, x2) = −3/√10 is the farthest
    a0, a1 = 0.5 * (1 + s30), 0.5 * (1 + s31)
    c3 = a0 / math.sqrt(a0 * a0 + a1 * a1)  # ŷ3 = [a0, a1], y3 = [1, 0]
    assert w[3].item() == pytest.approx(g + (1 - g) * c3, abs=1e-6)
    assert w[3].item() > g + 1e-3
    loop = _reliability_loop(x.tolist(), x.tolist(), y.tolist(), 2, g)
    assert w.tolist() == pytest.approx(loop, abs=1e-6)


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


def _objective_inputs(dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(21)
    b, bits, k_lab = 4, 8, 3

    def leaf(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).requires_grad_(True)

    u_img = leaf(torch.tanh(torch.randn(b, bits, generator=gen)))
    u_txt = leaf(torch.tanh(torch.randn(b, bits, generator=gen)))
    li = leaf(torch.randn(b, k_lab, generator=gen))
    lt = leaf(torch.randn(b, k_lab, generator=gen))
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return u_img, u_txt, li, lt, y.to(dtype)


HP = dict(alpha=0.7, beta=0.3, margin=0.2, shift=0.1, tau=0.3, separation_weight=0.5)


def _objective_ref(u_img, u_txt, li, lt, y, w) -> dict:
    """alpha·(contrastive + s·separation) + beta·quantization + mean_i w_i c_i and its parts, in
    plain Python."""
    sim, jac = _pairs(u_img, u_txt, y)
    bsch = _contrastive_ref(sim, jac, HP["margin"], HP["tau"], 0.5)
    bsch += HP["separation_weight"] * _separation_ref(sim, jac, HP["shift"], HP["tau"])

    def quant(u: list[list[float]]) -> float:
        vals = [abs(x - (1.0 if x >= 0 else -1.0)) for row in u for x in row]
        return sum(vals) / len(vals)

    def bce(x: float, t: float) -> float:
        return t * _softplus(-x) + (1.0 - t) * _softplus(x)

    q = 0.5 * (quant(u_img.tolist()) + quant(u_txt.tolist()))
    rows = y.tolist()
    c = [
        sum(bce(a, t) for a, t in zip(li.tolist()[i], rows[i], strict=True)) / len(rows[i])
        + sum(bce(a, t) for a, t in zip(lt.tolist()[i], rows[i], strict=True)) / len(rows[i])
        for i in range(len(rows))
    ]
    cls = sum(wi * ci for wi, ci in zip(w, c, strict=True)) / len(c)
    total = HP["alpha"] * bsch + HP["beta"] * q + cls
    return {"total": total, "bsch": bsch, "quant": q, "cls": cls, "per_item": c}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_objective_total_matches_loop_reference(dtype):
    u_img, u_txt, li, lt, y = _objective_inputs(dtype)
    w = torch.tensor([1.0, 0.5, 0.75, 0.6], dtype=dtype, requires_grad=True)
    terms = S.scbch_objective(u_img, u_txt, li, lt, y, w, **HP)
    ref = _objective_ref(u_img, u_txt, li, lt, y, w.tolist())
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    assert terms.total.item() == pytest.approx(ref["total"], rel=rel)
    assert terms.contrastive.item() == pytest.approx(ref["bsch"], rel=rel)
    assert terms.quantization.item() == pytest.approx(ref["quant"], rel=rel)
    assert terms.classification.item() == pytest.approx(ref["cls"], rel=rel)
    assert terms.per_item.tolist() == pytest.approx(ref["per_item"], rel=rel)
    for t in (terms.contrastive, terms.quantization, terms.classification, terms.per_item):
        assert not t.requires_grad
    terms.total.backward()
    for p in (u_img, u_txt, li, lt):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert w.grad is None  # the reliability weights are constants of the step


def test_objective_gradients_match_finite_differences():
    u_img, u_txt, li, lt, y = _objective_inputs(torch.float64)
    w = torch.tensor([1.0, 0.5, 0.75, 0.6], dtype=torch.float64)

    def total(a, b, c, d):
        return S.scbch_objective(a, b, c, d, y, w, **HP).total

    assert torch.autograd.gradcheck(total, (u_img, u_txt, li, lt), eps=1e-6, atol=1e-5)


def test_objective_weights_none_means_ones():
    u_img, u_txt, li, lt, y = _objective_inputs()
    a = S.scbch_objective(u_img, u_txt, li, lt, y, None, **HP)
    b = S.scbch_objective(u_img, u_txt, li, lt, y, torch.ones(4), **HP)
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-7)
    assert a.classification.item() == pytest.approx(a.per_item.mean().item(), rel=1e-6)
    half = S.scbch_objective(u_img, u_txt, li, lt, y, torch.full((4,), 0.5), **HP)
    assert half.classification.item() == pytest.approx(0.5 * a.classification.item(), rel=1e-6)
