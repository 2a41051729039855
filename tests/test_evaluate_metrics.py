"""MAP@k, P@k, PR curves, label forms, kernels and chunking against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.retrieval import metrics as E
from pipeline.retrieval.bench import straightforward_map


def _codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return np.where(rng.random((n, bits)) < 0.5, 1, -1).astype(np.int8)


def _case(seed: int, nq: int, nd: int, bits: int, classes: int, multi: bool):
    rng = np.random.default_rng(seed)
    qc, dc = _codes(rng, nq, bits), _codes(rng, nd, bits)
    if multi:
        ql = (rng.random((nq, classes)) < 0.35).astype(np.uint8)
        dl = (rng.random((nd, classes)) < 0.35).astype(np.uint8)
    else:
        ql = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, nq)]
        dl = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, nd)]
    return qc, dc, ql, dl


def _dist_rel(qc, dc, ql, dl):
    dist = np.array([[int(np.sum(q != d)) for d in dc] for q in qc])
    rel = np.array([[bool(np.dot(a, b) > 0) for b in dl] for a in ql])
    return dist, rel


def _ap(ranked_rel, k, n_rel):
    hits, s = 0, 0.0
    for pos, r in enumerate(ranked_rel[:k], start=1):
        if r:
            hits += 1
            s += hits / pos
    return s / max(min(n_rel, k), 1)


def _orderings(dist_row):
    """Every ranking of the database that is consistent with the distances."""
    groups = [list(np.flatnonzero(dist_row == d)) for d in sorted(set(dist_row))]
    for perm in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [j for g in perm for j in g]


def brute(qc, dc, ql, dl, *, k, ties):
    """(MAP@k, P@k), ties by index or averaged over every tie ordering."""
    dist, rel = _dist_rel(qc, dc, ql, dl)
    aps, ps = [], []
    for i in range(len(qc)):
        if ties == "index":
            orders = [sorted(range(len(dc)), key=lambda j, i=i: (dist[i, j], j))]
        else:
            orders = list(_orderings(dist[i]))
        a = [_ap([rel[i, j] for j in o], k, int(rel[i].sum())) for o in orders]
        p = [sum(rel[i, j] for j in o[:k]) / k for o in orders]
        aps.append(np.mean(a))
        ps.append(np.mean(p))
    return float(np.mean(aps)), float(np.mean(ps))


def brute_pr(qc, dc, ql, dl):
    dist, rel = _dist_rel(qc, dc, ql, dl)
    bits = qc.shape[1]
    prec, recall = [], []
    for r in range(bits + 1):
        got = dist <= r
        n_got, n_good = got.sum(1), (got & rel).sum(1)
        p = [g / n for g, n in zip(n_good, n_got, strict=True) if n > 0]
        rc = [g / t for g, t in zip(n_good, rel.sum(1), strict=True) if t > 0]
        prec.append(float(np.mean(p)) if p else None)
        recall.append(float(np.mean(rc)) if rc else None)
    return prec, recall


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_map_at_k_and_precision_at_k_match_brute_force(seed, multi, k):
    # 7 items with 3-bit codes: many ties, few enough orderings to enumerate
    qc, dc, ql, dl = _case(seed, 5, 7, 3, 3, multi)
    for ties in ("index", "expected"):
        want_map, want_p = brute(qc, dc, ql, dl, k=k, ties=ties)
        assert E.mean_average_precision(qc, dc, ql, dl, ties=ties, top_k=k) == pytest.approx(
            want_map, abs=1e-12
        )
        assert E.precision_at_k(qc, dc, ql, dl, k, ties=ties) == pytest.approx(want_p, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("multi", [False, True])
def test_pr_curve_matches_brute_force(seed, multi):
    qc, dc, ql, dl = _case(seed, 12, 30, 6, 4, multi)
    curve = E.precision_recall_curve(qc, dc, ql, dl)
    want_p, want_r = brute_pr(qc, dc, ql, dl)
    assert curve["radius"] == list(range(7)) and curve["bits"] == 6
    for got, want in ((curve["precision"], want_p), (curve["recall"], want_r)):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx(
            [w for w in want if w is not None], abs=1e-12
        )
    assert curve["recall"][-1] == pytest.approx(1.0)  # radius L retrieves everything
    dist, rel = _dist_rel(qc, dc, ql, dl)
    assert curve["precision_micro"][-1] == pytest.approx(rel.mean())
    assert curve["mean_retrieved"] == pytest.approx([(dist <= r).sum(1).mean() for r in range(7)])


def test_report_agrees_with_the_single_metrics():
    qc, dc, ql, dl = _case(5, 40, 90, 8, 5, multi=True)
    rep = E.retrieval_report(qc, dc, ql, dl, ks=(1, 10, 500))
    for ties in ("index", "expected"):
        assert rep["map"][ties] == pytest.approx(
            E.mean_average_precision(qc, dc, ql, dl, ties=ties)
        )
        for k in (1, 10, 90):  # 500 is cut to the database size
            assert rep["map_at_k"][str(k)][ties] == pytest.approx(
                E.mean_average_precision(qc, dc, ql, dl, ties=ties, top_k=k)
            )
            assert rep["precision_at_k"][str(k)][ties] == pytest.approx(
                E.precision_at_k(qc, dc, ql, dl, k, ties=ties)
            )
    assert rep["pr_curve"] == E.precision_recall_curve(qc, dc, ql, dl)
    fast = E.retrieval_report(qc, dc, ql, dl, ks=(10,), index_ties=False)
    assert fast["map"]["index"] is None
    assert fast["map"]["expected"] == pytest.approx(rep["map"]["expected"])


@pytest.mark.parametrize("bits", [1, 3, 12, 63, 64, 65, 130])
def test_any_code_length(bits):
    qc, dc, ql, dl = _case(bits, 15, 40, bits, 3, multi=False)
    dist, _ = _dist_rel(qc, dc, ql, dl)
    assert np.array_equal(E.hamming_distances(qc, dc), dist)
    assert np.array_equal(E.unpack_codes(E.pack_codes(qc), bits), qc)
    assert E.mean_average_precision(qc, dc, ql, dl, ties="index") == pytest.approx(
        brute(qc, dc, ql, dl, k=40, ties="index")[0], abs=1e-12
    )


def test_numpy_fallback_matches_faiss_kernels(monkeypatch):
    if E._faiss() is None:
        pytest.skip("faiss is not installed; the fallback is the only path")
    qc, dc, ql, dl = _case(9, 50, 120, 20, 4, multi=True)
    with_faiss = (
        E.retrieval_report(qc, dc, ql, dl, ks=(5,)),
        E.average_precisions(qc, dc, ql, dl, ties="expected"),
    )
    monkeypatch.setattr(E, "_faiss", lambda: None)
    without = (
        E.retrieval_report(qc, dc, ql, dl, ks=(5,)),
        E.average_precisions(qc, dc, ql, dl, ties="expected"),
    )
    assert without[0] == with_faiss[0]
    assert np.array_equal(without[1], with_faiss[1])


@pytest.mark.parametrize("workers", [1, 3])
def test_chunking_and_threads_do_not_change_results(monkeypatch, workers):
    qc, dc, ql, dl = _case(11, 97, 61, 16, 4, multi=False)
    want = {t: E.average_precisions(qc, dc, ql, dl, ties=t) for t in ("index", "expected")}
    monkeypatch.setattr(E, "CHUNK_PAIRS", 61 * 7)  # 7 queries per chunk, a ragged last one
    monkeypatch.setattr(E, "WORKERS", workers)
    for t in ("index", "expected"):
        assert np.array_equal(E.average_precisions(qc, dc, ql, dl, ties=t), want[t])
    assert E.retrieval_report(qc, dc, ql, dl)["map"]["expected"] == pytest.approx(
        want["expected"].mean()
    )


def test_per_query_ap_keeps_the_query_order():
    # single-label expected-ties queries are reordered by class internally
    qc, dc, ql, dl = _case(4, 30, 25, 5, 3, multi=False)
    aps = E.average_precisions(qc, dc, ql, dl, ties="expected")
    for i in (0, 7, 29):
        one = E.average_precisions(qc[i : i + 1], dc, ql[i : i + 1], dl, ties="expected")
        assert aps[i] == pytest.approx(one[0], abs=1e-12)


def test_label_forms_class_ids_multi_hot_and_many_classes():
    rng = np.random.default_rng(2)
    qc, dc = _codes(rng, 20, 8), _codes(rng, 35, 8)
    q_ids, d_ids = rng.integers(0, 5, 20), rng.integers(0, 5, 35)
    one_hot = E.mean_average_precision(qc, dc, np.eye(5)[q_ids], np.eye(5)[d_ids])
    assert E.mean_average_precision(qc, dc, q_ids, d_ids) == pytest.approx(one_hot)
    # more than 64 classes: relevance uses several 64-bit label words
    ql = (rng.random((20, 150)) < 0.02).astype(np.uint8)
    dl = (rng.random((35, 150)) < 0.02).astype(np.uint8)
    ql[:, 140] = rng.random(20) < 0.5  # overlaps beyond the first word
    dl[:, 140] = rng.random(35) < 0.5
    assert E.mean_average_precision(qc, dc, ql, dl, top_k=6) == pytest.approx(
        brute(qc, dc, ql, dl, k=6, ties="index")[0], abs=1e-12
    )
    # tie-aware, against the benchmark's per-query loop: the same closed form, applied query by
    # query (the form itself is checked against every tie ordering above and against random
    # tie orders in tests/test_evaluate.py); this catches the vectorised grouping, not the form
    assert E.mean_average_precision(qc, dc, ql, dl, ties="expected") == pytest.approx(
        straightforward_map(qc, dc, ql, dl, ties="expected"), abs=1e-12
    )
    # a query without any label has AP 0 and counts in the mean
    ql[0] = 0
    aps = E.average_precisions(qc, dc, ql, dl, ties="expected")
    assert aps[0] == 0.0
    rep = E.retrieval_report(qc, dc, ql, dl, ks=(5,))
    assert rep["queries_without_relevant"] >= 1


def test_torch_and_float_inputs():
    qc, dc, ql, dl = _case(3, 10, 20, 16, 3, multi=False)
    want = E.mean_average_precision(qc, dc, ql, dl, ties="expected")
    got = E.mean_average_precision(
        torch.tensor(qc, dtype=torch.float32),
        torch.tensor(dc),
        torch.tensor(ql),
        dl,
        ties="expected",
    )
    assert got == pytest.approx(want)


def test_bad_inputs_are_refused():
    qc, dc, ql, dl = _case(0, 4, 6, 8, 3, multi=False)
    with pytest.raises(ValueError, match="one L"):
        E.mean_average_precision(qc, dc[:, :7], ql, dl)
    with pytest.raises(ValueError, match="rows"):
        E.mean_average_precision(qc, dc, ql[:3], dl)
    with pytest.raises(ValueError, match="classes"):
        E.mean_average_precision(qc, dc, ql[:, :2], dl)
    with pytest.raises(ValueError, match="both"):
        E.mean_average_precision(qc, dc, ql.argmax(1), dl)
    with pytest.raises(ValueError, match="integer class ids"):
        E.mean_average_precision(qc, dc, ql.argmax(1) * 1.0, dl.argmax(1) * 1.0)
    with pytest.raises(ValueError, match=r"k=0"):
        E.precision_at_k(qc, dc, ql, dl, 0)
    with pytest.raises(ValueError, match=r"k=7"):
        E.precision_at_k(qc, dc, ql, dl, 7)
    with pytest.raises(ValueError, match="-1 and"):
        E.precision_recall_curve(qc * 2, dc, ql, dl)
    with pytest.raises(ValueError, match="numeric"):
        E.mean_average_precision(qc > 0, dc, ql, dl)


def test_weight_histogram_and_noise_detection():
    w = np.array([0.0, 0.0, 0.04, 0.5, 1.0, 1.0, 0.99, 0.0])
    noisy = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    h = E.weight_histogram(w, noisy, bins=20)
    assert len(h["edges"]) == 21 and h["edges"][0] == 0.0 and h["edges"][-1] == 1.0
    assert h["noisy"][0] == 2 and h["noisy"][10] == 1 and sum(h["noisy"]) == 3
    assert h["clean"][0] == 2 and h["clean"][19] == 3 and sum(h["clean"]) == 5
    d = E.noise_detection(w, noisy)
    assert d == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    with pytest.raises(ValueError, match="align"):
        E.weight_histogram(w, noisy[:3])


@pytest.mark.slow
def test_speed_against_the_straightforward_way():
    """8000 × 8000 at 128 bits: tie-aware MAP fast and ≥ 40× faster than cdist+argsort+loop."""
    import time

    from pipeline.retrieval.bench import random_case, straightforward_map

    qc, dc, ql, dl = random_case(8000, 8000, 128, 10, "single", 0)
    E.mean_average_precision(qc[:10], dc[:10], ql[:10], dl[:10], ties="expected")
    fast = []
    for _ in range(3):
        t0 = time.perf_counter()
        value = E.mean_average_precision(qc, dc, ql, dl, ties="expected")
        fast.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = straightforward_map(qc, dc, ql, dl, ties="expected")
    slow = time.perf_counter() - t0
    assert value == pytest.approx(ref, abs=1e-9)
    assert min(fast) < 1.0
    assert slow / min(fast) > 40
