"""HammingIndex: exact top-k with ties by database index, input forms, approximate kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.retrieval import metrics as E
from pipeline.retrieval.index import (
    EXACT_BELOW,
    HammingIndex,
    IndexSpec,
    choose_kind,
    default_nlist,
    default_nprobe,
)


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
        HammingIndex(db, kind="ivfpq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        HammingIndex(db, packed=True, bits=16)


def _clustered(seed: int, n: int, bits: int, centers: int, flip: float) -> np.ndarray:
    """±1 codes around ``centers`` random centres (seed 0), bits flipped with prob ``flip``."""
    c = np.where(np.random.default_rng(0).random((centers, bits)) < 0.5, 1, -1)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centers, n)]
    return np.where(rng.random((n, bits)) < flip, -x, x).astype(np.int8)


def _check_exact_up_to_ties(d, i, want_d, want_i, db, q):
    """Distances equal the brute force's; ids differ only among codes tied at the k-th."""
    assert np.array_equal(d, want_d)
    true = (q[:, None, :] != db[None, :, :]).sum(-1)
    assert np.array_equal(np.take_along_axis(true, i, 1), d)  # reported = true distances
    for row in range(len(q)):
        assert len(set(i[row].tolist())) == i.shape[1]  # no duplicates
        dk = want_d[row, -1]
        assert set(i[row][d[row] < dk]) == set(want_i[row][want_d[row] < dk])
        keys = d[row].astype(np.int64) * len(db) + i[row]
        assert (np.diff(keys) > 0).all()  # sorted by distance, then id


@pytest.mark.parametrize(("bits", "nlist", "k"), [(64, 16, 30), (32, 7, 100), (128, 1, 5)])
def test_ivf_probing_every_list_is_the_exact_scan(bits, nlist, k):
    db = _clustered(1, 1200, bits, centers=12, flip=0.15)
    q = _clustered(2, 40, bits, centers=12, flip=0.15)
    index = HammingIndex(db, kind="ivf", nlist=nlist, nprobe=nlist, seed=3)
    assert index.params == {
        "kind": "ivf",
        "nlist": nlist,
        "nprobe": nlist,
        "train_size": min(1200, 40 * nlist),
        "seed": 3,
    }
    d, i = index.search(q, k)
    assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == (40, k)
    _check_exact_up_to_ties(d, i, *_brute(q, db, k), db, q)


def test_ivf_added_in_parts_and_packed_input_stay_exact():
    db = _clustered(4, 900, 64, centers=9, flip=0.1)
    q = _clustered(5, 20, 64, centers=9, flip=0.1)
    index = HammingIndex(E.pack_codes(db[:600]), kind="ivf", packed=True, bits=64, nlist=8)
    index.add(E.pack_codes(db[600:]))
    index.set_nprobe(100)  # clamped to nlist
    assert index.ntotal == 900 and index.params["nprobe"] == 8
    d, i = index.search(E.pack_codes(q), 25)
    _check_exact_up_to_ties(d, i, *_brute(q, db, 25), db, q)


def test_ivf_few_probes_pads_short_rows_and_is_seeded():
    db = _clustered(6, 800, 32, centers=8, flip=0.05)
    q = _clustered(7, 30, 32, centers=8, flip=0.05)
    a = HammingIndex(db, kind="ivf", nlist=8, nprobe=1, seed=0)
    d, i = a.search(q, 800)  # one list holds far fewer than all 800 codes
    pad = i < 0
    assert pad.any(axis=1).all()
    assert (d[pad] == -1).all() and (d[~pad] >= 0).all()
    assert (np.diff(pad.astype(int), axis=1) >= 0).all()  # pads only at the end of a row
    true = E.hamming_distances(q, db)
    assert np.array_equal(np.take_along_axis(true, np.maximum(i, 0), 1)[~pad], d[~pad])
    b = HammingIndex(db, kind="ivf", nlist=8, nprobe=1, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a.search(q, 50), b.search(q, 50), strict=True))
    with pytest.raises(ValueError, match="nprobe"):
        HammingIndex(db).set_nprobe(2)


def test_auto_keeps_the_exact_scan_below_the_threshold():
    assert choose_kind(EXACT_BELOW - 1) == "flat" and choose_kind(EXACT_BELOW) == "ivf"
    assert choose_kind(10, exact_below=10) == "ivf" and choose_kind(9, exact_below=10) == "flat"
    db = _clustered(8, 500, 32, centers=5, flip=0.1)
    assert HammingIndex(db, kind="auto").kind == "flat"  # 500 < EXACT_BELOW
    small = HammingIndex(db, kind="auto", exact_below=501)
    large = HammingIndex(db, kind="auto", exact_below=500)
    assert small.kind == "flat" and large.kind == "ivf"
    assert IndexSpec().resolved_kind(500) == "flat"
    assert IndexSpec(kind="auto", exact_below=100).build(db).kind == "ivf"
    assert [default_nlist(n) for n in (1, 3, 1000, 10**6, 10**7)] == [1, 2, 32, 1024, 4096]
    assert [default_nprobe(n) for n in (1, 8, 1024, 4096)] == [1, 8, 16, 64]


def test_index_spec_round_trip_and_refusals():
    spec = IndexSpec.from_dict({"kind": "ivf", "nlist": 64, "nprobe": 4, "seed": 2})
    assert IndexSpec.from_dict(spec.to_dict()) == spec
    assert IndexSpec.from_dict(None) == IndexSpec() and IndexSpec().kind == "auto"
    assert spec.replace(kind="flat", nlist=None) == IndexSpec.from_dict(
        {**spec.to_dict(), "kind": "flat"}
    )
    for bad, match in (
        ({"kind": "pq"}, "kind"),
        ({"nlist": 0}, "nlist"),
        ({"nprobe": 2.5}, "nprobe"),
        ({"exact_below": -1}, "exact_below"),
        ({"nprobes": 3}, "unknown"),
        ({"seed": True}, "seed"),
    ):
        with pytest.raises(ValueError, match=match):
            IndexSpec.from_dict(bad)


def test_ivf_cache_reuses_the_built_index_only_for_the_same_codes_and_shape(tmp_path, caplog):
    from pipeline.retrieval.search import cached_build

    db = _clustered(8, 900, 64, centers=9, flip=0.1)
    q = _clustered(9, 30, 64, centers=9, flip=0.1)
    spec = IndexSpec(kind="ivf", nlist=8, nprobe=2, seed=1)
    fresh = spec.build(db).search(q, 20)  # nprobe 2 of 8 lists: results depend on the k-means
    cache = tmp_path / "cache"
    a, hit_a = cached_build(spec, db, str(cache))
    b, hit_b = cached_build(spec, db, str(cache))
    assert (hit_a, hit_b) == (False, True) and len(list(cache.glob("*.faissbin"))) == 1
    assert not list(cache.glob("*.tmp"))
    assert b.params == a.params == {
        "kind": "ivf", "nlist": 8, "nprobe": 2, "train_size": 320, "seed": 1,
    }  # fmt: skip
    for got in (a.search(q, 20), b.search(q, 20)):
        assert all(np.array_equal(x, y) for x, y in zip(got, fresh, strict=True))
    # nprobe is set after reading, so it does not need another build
    c, hit = cached_build(spec.replace(nprobe=8), db, str(cache))
    assert hit and c.params["nprobe"] == 8
    np.testing.assert_array_equal(c.search(q, 20)[0], _brute(q, db, 20)[0])
    # other codes, or parameters that shape the index, are other files
    other = db.copy()
    other[0] = -other[0]
    assert not cached_build(spec, other, str(cache))[1]
    assert not cached_build(spec.replace(seed=2), db, str(cache))[1]
    assert len(list(cache.glob("*.faissbin"))) == 3
    # flat / hash / mih are cheap to build and never cached
    assert cached_build(IndexSpec(kind="flat"), db, str(cache))[1] is False
    assert len(list(cache.glob("*.faissbin"))) == 3
    # a damaged file is rebuilt and replaced, with a warning
    for p in cache.glob("*.faissbin"):
        p.write_bytes(b"not an index")
    d, _ = cached_build(spec, db, str(cache))[0].search(q, 20), None
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(d[1], fresh[1])
    assert cached_build(spec, db, str(cache))[1]
