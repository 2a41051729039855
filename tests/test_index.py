"""HammingIndex: exact top-k with ties by database index, input forms, approximate kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.retrieval import metrics as E
from pipeline.retrieval.index import HammingIndex


def _codes(seed: int, n: int, bits: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((n, bits)) < 0.5, 1, -1).astype(np.int8)


def _brute(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = (q[:, None, :] != db[None, :, :]).sum(-1)
    ids = np.array([sorted(range(len(db)), key=lambda j, r=r: (r[j], j))[:k] for r in dist])
    return np.take_along_axis(dist, ids, axis=1), ids


@pytest.mark.parametrize("bits", [4, 12, 16, 64, 72])
@pytest.mark.parametrize("k", [1, 9, 200])
def test_flat_search_matches_brute_force_with_index_ties(bits, k):
    db, q = _codes(bits, 200, bits), _codes(bits + 1, 25, bits)
    d, i = HammingIndex(db).search(q, k)
    want_d, want_i = _brute(q, db, k)
    assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == (25, k)
    assert np.array_equal(d, want_d)
    assert np.array_equal(i, want_i)


def test_numpy_fallback_and_packed_and_torch_inputs(monkeypatch):
    db, q = _codes(0, 150, 24), _codes(1, 30, 24)
    want = HammingIndex(db).search(q, 40)
    packed = HammingIndex(E.pack_codes(db), packed=True, bits=24)
    assert np.array_equal(packed.search(E.pack_codes(q), 40)[1], want[1])
    from_torch = HammingIndex(torch.tensor(db, dtype=torch.float32))
    assert np.array_equal(from_torch.search(torch.tensor(q), 40)[1], want[1])
    monkeypatch.setattr("pipeline.retrieval.index._faiss", lambda: None)
    fallback = HammingIndex(db)
    got = fallback.search(q, 40)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_add_in_parts_continues_ids():
    db = _codes(3, 120, 16)
    index = HammingIndex(db[:50])
    index.add(db[50:])
    assert index.ntotal == len(index) == 120 and index.bits == 16
    q = db[[7, 77, 119]]
    d, i = index.search(q, 1)
    assert d[:, 0].tolist() == [0, 0, 0]
    assert np.array_equal(i, HammingIndex(db).search(q, 1)[1])


def test_search_results_agree_with_index_tie_map():
    """P@k from the index equals evaluate.precision_at_k with ties by index."""
    rng = np.random.default_rng(5)
    db, q = _codes(5, 300, 8), _codes(6, 40, 8)
    dl = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 300)]
    ql = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 40)]
    _, ids = HammingIndex(db).search(q, 25)
    rel = (ql[:, None, :] & dl[ids]).any(-1)
    assert rel.mean() == pytest.approx(E.precision_at_k(q, db, ql, dl, 25, ties="index"))


@pytest.mark.parametrize("kind", ["hash", "mih"])
def test_approximate_kinds_return_true_distances(kind):
    db = _codes(8, 2000, 32)
    q = db[:20].copy()
    q[:, :2] *= -1  # each query is 2 bits away from its source item
    d, i = HammingIndex(db, kind=kind, nflip=2).search(q, 5)
    found = i >= 0
    assert found[:, 0].all()  # the source item is always within 2 flips
    true = E.hamming_distances(q, db)
    assert np.array_equal(d[found], np.take_along_axis(true, np.maximum(i, 0), 1)[found])
    assert (d[~found] == -1).all()
    assert (d[:, 0] <= 2).all()


def test_bad_input_is_refused():
    db = _codes(9, 10, 16)
    index = HammingIndex(db)
    with pytest.raises(ValueError, match="larger than the database"):
        index.search(db[:2], 11)
    with pytest.raises(ValueError, match="positive"):
        index.search(db[:2], 0)
    with pytest.raises(ValueError, match="empty"):
        index.search(db[:0], 1)
    with pytest.raises(ValueError, match="8 bits, the index holds 16"):
        index.search(_codes(1, 2, 8), 1)
    with pytest.raises(ValueError, match="-1 and"):
        index.search(db[:2] * 0, 1)
    with pytest.raises(ValueError, match="empty"):
        HammingIndex().search(db[:2], 1)
    with pytest.raises(ValueError, match="kind"):
        HammingIndex(db, kind="ivf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        HammingIndex(db, packed=True, bits=16)
