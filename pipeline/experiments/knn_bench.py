"""The sharded SCBCH kNN at scale: synthetic codes with label structure, W simulated shards.

Reports memory per worker (its shard's queries, its index, the label table, one round of
queries), seconds to build the indexes and to refresh every item's weight, and the agreement of
the chosen index with the exact (flat) computation on a subset of queries searched over all items:
max |Δw| and the share of identical neighbour sets.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Any

import numpy as np

from pipeline.method import knn

log = logging.getLogger(__name__)


def synthetic_codes(
    n: int, bits: int, num_labels: int, seed: int, noise: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tanh codes of n items around n/1000 cluster prototypes (image and text noisy copies),
    each cluster with 1–3 labels; a ``noise`` share of items gets random labels instead."""
    rng = np.random.default_rng(seed)
    clusters = max(16, n // 1000)
    proto = rng.standard_normal((clusters, bits)).astype(np.float32)
    cl_labels = np.zeros((clusters, num_labels), np.uint8)
    for c in range(clusters):
        cl_labels[c, rng.choice(num_labels, rng.integers(1, 4), replace=False)] = 1
    member = rng.integers(0, clusters, n)
    img = np.tanh(1.5 * proto[member] + rng.standard_normal((n, bits), dtype=np.float32))
    txt = np.tanh(1.5 * proto[member] + rng.standard_normal((n, bits), dtype=np.float32))
    labels = cl_labels[member]
    flip = rng.random(n) < noise
    labels[flip] = cl_labels[rng.integers(0, clusters, int(flip.sum()))]
    return img.astype(np.float32), txt.astype(np.float32), labels


def scbch_knn_benchmark(
    items: int,
    bits: int = 64,
    shards: int = 4,
    kind: str = "ivf",
    nprobe: int = 16,
    k: int = 20,
    g: float = 0.5,
    subset: int = 20_000,
    num_labels: int = 24,
    chunk: int = 8192,
    seed: int = 0,
) -> dict[str, Any]:
    """One refresh of every item's weight over ``shards`` shards, and its agreement with the
    exact kNN on ``subset`` queries; a JSON-ready dict."""
    t0 = time.perf_counter()
    img, txt, labels = synthetic_codes(items, bits, num_labels, seed)
    ids = np.arange(items, dtype=np.int64)
    t_data = time.perf_counter() - t0
    cuts = np.array_split(ids, shards)
    queries = knn.cross_modal_vectors(img, txt)
    del img, txt
    t0 = time.perf_counter()
    indexes = [
        knn.ShardIndex.build(queries[c], c, kind=kind, nprobe=nprobe, seed=seed + r)
        for r, c in enumerate(cuts)
    ]
    t_build = time.perf_counter() - t0
    table = knn.LabelTable.of(ids, labels)
    kk = knn.effective_k(k, items)

    def weights_of(rows: np.ndarray, ixs: list[knn.ShardIndex]) -> tuple[np.ndarray, np.ndarray]:
        w = np.empty(rows.size, np.float32)
        nbr_all = np.empty((rows.size, kk), np.int64)
        for a in range(0, rows.size, chunk):
            r = rows[a : a + chunk]
            scores, nbr = knn.merge_topk([ix.topk(queries[r], r, kk) for ix in ixs], kk)
            w[a : a + chunk] = knn.neighbour_weights(scores, nbr, labels[r], table, g)
            nbr_all[a : a + chunk] = nbr
        return w, nbr_all

    t0 = time.perf_counter()
    w_all, nbr_all = weights_of(ids, indexes)
    t_refresh = time.perf_counter() - t0
    sub = np.sort(np.random.default_rng(seed + 1).choice(items, min(subset, items), replace=False))
    flat = [knn.ShardIndex.build(queries[c], c) for c in cuts] if kind != "flat" else indexes
    t0 = time.perf_counter()
    w_exact, nbr_exact = weights_of(sub, flat)
    t_exact = time.perf_counter() - t0
    same = [set(a) == set(b) for a, b in zip(nbr_all[sub], nbr_exact, strict=True)]
    shard_rows = max(c.size for c in cuts)
    dim = queries.shape[1]
    per_worker = {
        "shard_queries": shard_rows * dim * 4,
        "index": max(ix.nbytes() for ix in indexes),
        "label_table": int(table.labels.nbytes + table.sorted_ids.nbytes),
        "round_queries": shards * chunk * (dim * 4 + 8),
        "round_results": shards * shards * chunk * kk * 16,
    }
    per_worker["total"] = sum(per_worker.values())
    return {
        "items": items,
        "bits": bits,
        "shards": shards,
        "kind": kind,
        "nprobe": nprobe if kind == "ivf" else None,
        "k": kk,
        "seconds": {
            "synthetic_data": t_data,
            "build_indexes": t_build,
            "refresh_all_items": t_refresh,
            "exact_subset": t_exact,
        },
        "memory_per_worker_bytes": per_worker,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "subset": int(sub.size),
        "max_abs_weight_diff": float(np.abs(w_all[sub] - w_exact).max()),
        "identical_neighbour_sets": float(np.mean(same)),
        "mean_weight": float(w_all.mean()),
    }
