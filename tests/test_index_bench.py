"""The index benchmark's pieces on tiny sizes: clustered codes, tie-aware recall, one small run;
and the training config's ``search_index``."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, TrainConfig
from pipeline.retrieval import metrics as E
from pipeline.retrieval.index_bench import (
    clustered_codes,
    format_index_table,
    index_benchmark,
    tie_aware_recall,
)


def test_clustered_codes_are_seeded_and_near_their_centres():
    a = clustered_codes(3000, 64, centers=5, flip=0.05, seed=1)
    assert a.shape == (3000, 8) and a.dtype == np.uint8
    assert np.array_equal(a, clustered_codes(3000, 64, centers=5, flip=0.05, seed=1))
    b = clustered_codes(200, 64, centers=5, flip=0.05, seed=2)  # same centres, other items
    assert not np.array_equal(a[:200], b)
    bits = E.unpack_codes(a, 64).astype(np.int64)
    d = E.hamming_distances(np.where(bits[:300] > 0, 1, -1), np.where(bits > 0, 1, -1))
    # 5 tight groups of ~600: two codes of one centre differ in ≈ 6 of 64 bits, others in ≈ 32
    assert np.median(np.sort(d, axis=1)[:, 500]) <= 10
    with pytest.raises(ValueError, match="multiple of 8"):
        clustered_codes(4, 12, centers=2, flip=0.1, seed=0)


def test_tie_aware_recall_counts_the_best_overlap_with_any_exact_top_k():
    exact = np.array([[1, 2, 2, 2]])  # D_k = 2; one code below it, any three at 2 complete it
    assert tie_aware_recall(exact, np.array([[1, 2, 2, 2]]), np.array([[0, 7, 8, 9]])) == 1.0
    # missing the one code below D_k costs a quarter even with four codes at D_k
    assert tie_aware_recall(exact, np.array([[2, 2, 2, 2]]), np.array([[5, 6, 7, 8]])) == 0.75
    # a farther code and a −1 pad are misses
    assert tie_aware_recall(exact, np.array([[1, 2, 3, -1]]), np.array([[0, 4, 5, -1]])) == 0.5
    # brute force over every code set on random distances
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, (30, 12))
    exact = np.sort(true, axis=1)[:, :5]
    got_i = np.array([rng.choice(12, 5, replace=False) for _ in range(30)])
    got_d = np.take_along_axis(true, got_i, 1)
    want = []
    for row in range(30):
        order = np.argsort(true[row], kind="stable")
        dk = true[row, order[4]]
        below = set(np.flatnonzero(true[row] < dk))
        at = set(np.flatnonzero(true[row] == dk))
        g = set(got_i[row])
        want.append((len(g & below) + min(len(g & at), 5 - len(below))) / 5)
    assert tie_aware_recall(exact, got_d, got_i) == pytest.approx(np.mean(want))


def test_small_index_benchmark_exact_rows_have_full_recall():
    r = index_benchmark(4000, bits=64, queries=30, k=20, nlist=16, nprobes=(1, 16), mih=True)
    kinds = [(row["kind"], row["params"].get("nprobe")) for row in r["rows"]]
    assert kinds == [("flat", None), ("ivf", 1), ("ivf", 16), ("mih", None)]
    assert r["rows"][0]["recall"] == 1.0 and r["rows"][2]["recall"] == 1.0  # nprobe = nlist
    assert 0.0 < r["rows"][1]["recall"] <= 1.0 and r["centers"] == 4
    assert all(row["qps"] > 0 and row["build_seconds"] >= 0 for row in r["rows"])
    assert r["rows"][0]["qps"] == max(r["flat_qps_runs"]) and r["rows"][0]["speedup"] == 1.0
    assert format_index_table(r).count("\n| ") == len(r["rows"])


def test_train_config_search_index_is_checked():
    cfg = TrainConfig.from_dict({"dataset": "x", "search_index": {"kind": "ivf", "nlist": 64}})
    assert cfg.validate().search_index == {"kind": "ivf", "nlist": 64}  # ints stay ints
    assert TrainConfig(dataset="x").validate().search_index == {}
    with pytest.raises(ConfigError, match=r"search_index.*nprobe"):
        TrainConfig(dataset="x", search_index={"nprobe": 0}).validate()
    with pytest.raises(ConfigError, match=r"search_index.*unknown"):
        TrainConfig(dataset="x", search_index={"lists": 3}).validate()
