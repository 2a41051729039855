"""MAP over Hamming ranking against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import references as R
import torch

from pipeline.retrieval.metrics import (
    average_precisions,
    cross_modal_map,
    mean_average_precision,
    noise_detection,
    precision_at_k,
    retrieval_report,
)


def _ap_of_ranking(rel_sorted: list[bool], k: int, n_rel: int) -> float:
    hits, s = 0, 0.0
    for pos, rel in enumerate(rel_sorted[:k], start=1):
        if rel:
            hits += 1
            s += hits / pos
    return s / max(min(n_rel, k), 1)


def _brute_index(qc, dc, ql, dl, k=None):
    aps = []
    for i in range(len(qc)):
        dist = [int(np.sum(qc[i] != dc[j])) for j in range(len(dc))]
        rel = [bool(np.dot(ql[i], dl[j]) > 0) for j in range(len(dc))]
        order = sorted(range(len(dc)), key=lambda j: (dist[j], j))
        aps.append(_ap_of_ranking([rel[j] for j in order], k or len(dc), sum(rel)))
    return float(np.mean(aps))


def _brute_expected(qc, dc, ql, dl, k=None):
    """Average AP over every ordering of tied items (exhaustive, tiny databases only)."""
    aps = []
    for i in range(len(qc)):
        dist = [int(np.sum(qc[i] != dc[j])) for j in range(len(dc))]
        rel = [bool(np.dot(ql[i], dl[j]) > 0) for j in range(len(dc))]
        groups = [[j for j in range(len(dc)) if dist[j] == d] for d in sorted(set(dist))]
        total, count = 0.0, 0
        for perm in itertools.product(*(itertools.permutations(g) for g in groups)):
            order = [j for g in perm for j in g]
            total += _ap_of_ranking([rel[j] for j in order], k or len(dc), sum(rel))
            count += 1
        aps.append(total / count)
    return float(np.mean(aps))


def _random_case(seed, nq, nd, bits, k, multi=False):
    rng = np.random.default_rng(seed)
    qc = np.where(rng.random((nq, bits)) > 0.5, 1, -1)
    dc = np.where(rng.random((nd, bits)) > 0.5, 1, -1)
    if multi:
        ql = (rng.random((nq, k)) > 0.6).astype(int)
        dl = (rng.random((nd, k)) > 0.6).astype(int)
    else:
        ql = np.eye(k, dtype=int)[rng.integers(0, k, nq)]
        dl = np.eye(k, dtype=int)[rng.integers(0, k, nd)]
    return qc, dc, ql, dl


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("multi", [False, True])
def test_index_ties_match_brute_force(seed, multi):
    qc, dc, ql, dl = _random_case(seed, 9, 40, 4, 3, multi)
    assert mean_average_precision(qc, dc, ql, dl, ties="index") == pytest.approx(
        _brute_index(qc, dc, ql, dl), abs=1e-12
    )
    assert mean_average_precision(qc, dc, ql, dl, ties="index", top_k=7) == pytest.approx(
        _brute_index(qc, dc, ql, dl, k=7), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(6))
def test_expected_ties_match_exhaustive_orderings(seed):
    # 7 items with 3-bit codes: many ties, few enough orderings to enumerate
    qc, dc, ql, dl = _random_case(seed, 4, 7, 3, 2, multi=seed % 2 == 1)
    assert mean_average_precision(qc, dc, ql, dl, ties="expected") == pytest.approx(
        _brute_expected(qc, dc, ql, dl), abs=1e-12
    )
    assert mean_average_precision(qc, dc, ql, dl, ties="expected", top_k=3) == pytest.approx(
        _brute_expected(qc, dc, ql, dl, k=3), abs=1e-12
    )


def _sampled_orderings(qc, dc, ql, dl, k, trials, seed):
    """Tie-aware AP@k and P@k estimated by ranking ``trials`` times with ties broken at random
    (a uniform key per item added to its integer distance); per-query means and their standard
    errors."""
    rng = np.random.default_rng(seed)
    dist = (qc[:, None, :] != dc[None, :, :]).sum(axis=2)
    rel = (ql.astype(int) @ dl.astype(int).T) > 0
    pos = np.arange(1, dc.shape[0] + 1)
    ap_mean, ap_var, p_mean = [], [], []
    for i in range(qc.shape[0]):
        order = np.argsort(dist[i] + rng.random((trials, dc.shape[0])), axis=1)
        r = rel[i][order][:, :k]
        ap = (np.cumsum(r, axis=1) / pos[:k] * r).sum(axis=1) / max(min(rel[i].sum(), k), 1)
        ap_mean.append(ap.mean())
        ap_var.append(ap.var() / trials)
        p_mean.append(r.sum(axis=1).mean() / k)
    return np.array(ap_mean), np.array(ap_var), np.array(p_mean)


@pytest.mark.parametrize(
    ("seed", "bits", "classes", "multi", "k"),
    [(0, 5, 4, False, 60), (1, 6, 3, False, 9), (2, 4, 150, True, 60), (3, 6, 8, True, 17)],
)
def test_expected_ties_match_randomly_broken_ties(seed, bits, classes, multi, k):
    # 60 items on few bits: tie groups far too large to enumerate, so the reference averages
    # 4000 rankings with ties broken at random; 150 classes need several 64-bit label words
    rng = np.random.default_rng(seed)
    qc = np.where(rng.random((12, bits)) > 0.5, 1, -1)
    dc = np.where(rng.random((60, bits)) > 0.5, 1, -1)
    if multi:
        share = 3.0 / classes
        ql, dl = ((rng.random((n, classes)) < share).astype(int) for n in (12, 60))
        ql[0] = 0  # a query without any label: AP 0, counted in the mean
        dl[:, -1] = rng.random(60) < 0.3
        ql[1:, -1] = rng.random(11) < 0.3
    else:
        ql = np.eye(classes, dtype=int)[rng.integers(0, classes, 12)]
        dl = np.eye(classes, dtype=int)[rng.integers(0, classes, 60)]
    ap, var, p = _sampled_orderings(qc, dc, ql, dl, k, trials=4000, seed=seed)
    se = float(np.sqrt(var.sum())) / len(ap)
    assert se > 0  # the ties matter here, or the comparison would say little
    top = None if k == 60 else k
    aps = average_precisions(qc, dc, ql, dl, ties="expected", top_k=top)
    assert abs(aps.mean() - ap.mean()) < 5 * se + 1e-12
    assert np.all(np.abs(aps - ap) < 5 * np.sqrt(var) + 1e-12)
    assert precision_at_k(qc, dc, ql, dl, k, ties="expected") == pytest.approx(p.mean(), abs=0.01)
    rep = retrieval_report(qc, dc, ql, dl, ks=(k,))
    want = rep["map"]["expected"] if k == 60 else rep["map_at_k"][str(k)]["expected"]
    assert abs(want - ap.mean()) < 5 * se + 1e-12
    assert rep["precision_at_k"][str(k)]["expected"] == pytest.approx(p.mean(), abs=0.01)
    if multi:
        assert aps[0] == 0.0 and rep["queries_without_relevant"] >= 1


@pytest.mark.parametrize("multi", [False, True])
def test_expected_ties_of_one_tie_group_are_a_random_ranking(multi):
    # every database code equal: the tie-aware ranking is a uniformly random order, whose
    # expected AP has the closed form derived in references.random_ranking_ap
    rng = np.random.default_rng(7)
    n, classes = 300, 5
    if multi:
        ql, dl = ((rng.random((m, classes)) < 0.3).astype(int) for m in (40, n))
    else:
        ql = np.eye(classes, dtype=int)[rng.integers(0, classes, 40)]
        dl = np.eye(classes, dtype=int)[rng.integers(0, classes, n)]
    qc = np.where(rng.random((40, 8)) > 0.5, 1, -1)
    dc = np.ones((n, 8), dtype=int)
    aps = average_precisions(qc, dc, ql, dl, ties="expected")
    rel = (ql @ dl.T) > 0
    want = [R.random_ranking_ap(int(row.sum()), n) for row in rel]
    assert aps.tolist() == pytest.approx(want, abs=1e-12)
    assert R.random_ranking_map(ql, dl) == pytest.approx(float(np.mean(want)))


def test_random_ranking_ap_by_hand_and_by_enumeration():
    # n = 3, R = 1: the relevant item at rank 1, 2 or 3 → (1 + 1/2 + 1/3)/3
    assert R.random_ranking_ap(1, 3) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert R.random_ranking_ap(4, 4) == 1.0 and R.random_ranking_ap(0, 5) == 0.0
    for n_rel in range(1, 6):
        rel = [True] * n_rel + [False] * (6 - n_rel)
        perms = list(itertools.permutations(rel))
        want = sum(_ap_of_ranking(list(p), 6, n_rel) for p in perms) / len(perms)
        assert R.random_ranking_ap(n_rel, 6) == pytest.approx(want, abs=1e-12)


def test_hand_example_and_tie_handling():
    q = np.array([[1, 1]])
    db = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])  # distances 0, 1, 1, 2
    ql = np.array([[1, 0]])
    dl = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])  # relevant: items 0 and 2
    # index ties: ranking 0,1,2,3 → AP = (1/1 + 2/3) / 2
    assert mean_average_precision(q, db, ql, dl) == pytest.approx((1 + 2 / 3) / 2)
    # expected: item 2 at rank 2 or 3 with equal chance → (1 + (1/2)(2/2 + 2/3)) / 2
    assert mean_average_precision(q, db, ql, dl, ties="expected") == pytest.approx(
        (1 + 0.5 * (1 + 2 / 3)) / 2
    )


def test_torch_input_and_cross_modal_protocol():
    qc, dc, ql, _ = _random_case(0, 20, 20, 16, 4)
    t = mean_average_precision(torch.tensor(qc), torch.tensor(dc), torch.tensor(ql), ql)
    assert t == pytest.approx(mean_average_precision(qc, dc, ql, ql))
    m = cross_modal_map(qc, dc, ql)
    assert m["i2t"] == pytest.approx(_brute_index(qc, dc, ql, ql), abs=1e-12)
    assert m["t2i"] == pytest.approx(_brute_index(dc, qc, ql, ql), abs=1e-12)
    assert m["mean"] == pytest.approx((m["i2t"] + m["t2i"]) / 2)
    # identical codes in both modalities retrieve perfectly when classes have distinct codes
    codes = np.repeat(np.array([[1, 1, 1, 1], [-1, -1, -1, -1]]), 5, axis=0)
    labels = np.repeat(np.eye(2, dtype=int), 5, axis=0)
    assert cross_modal_map(codes, codes, labels)["mean"] == pytest.approx(1.0)


def test_query_without_relevant_item_counts_as_zero():
    aps = average_precisions(
        np.array([[1, 1]]), np.array([[1, 1], [-1, -1]]), np.array([[0, 1]]), np.array([[1, 0]] * 2)
    )
    assert aps.tolist() == [0.0]


def test_bad_input_is_refused():
    c = np.ones((3, 4))
    lab = np.eye(3)
    with pytest.raises(ValueError, match="-1 and \\+1"):
        mean_average_precision(c * 0.5, c, lab, lab)
    with pytest.raises(ValueError, match="top_k"):
        mean_average_precision(c, c, lab, lab, top_k=4)
    with pytest.raises(ValueError, match="ties"):
        mean_average_precision(c, c, lab, lab, ties="random")
    with pytest.raises(ValueError, match="non-empty"):
        mean_average_precision(c[:0], c, lab[:0], lab)


def test_noise_detection_hand():
    w = np.array([0.0, 0.0, 0.5, 1.0, 0.0])
    noisy = np.array([True, False, True, False, True])
    d = noise_detection(w, noisy)
    assert d["precision"] == pytest.approx(2 / 3)
    assert d["recall"] == pytest.approx(2 / 3)
    assert d["f1"] == pytest.approx(2 / 3)
