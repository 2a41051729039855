"""Speed of the retrieval metrics: the fast paths timed side by side with the straightforward way
(scipy ``cdist``, an argsort and a Python loop per query), a large query set × database run in
bounded memory, and top-k search against plain faiss ``IndexBinaryFlat``, on random codes."""

from __future__ import annotations

import logging
import os
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the straightforward reference


def straightforward_map(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ties: str = "expected",
) -> float:
    """MAP the usual way: scipy ``cdist`` Hamming distances, an argsort and a loop per query.

    ``ties="expected"`` applies the exact tie-aware closed form to each query's tie groups.
    """
    from scipy.spatial.distance import cdist

    bits = query_codes.shape[1]
    dist = np.rint(cdist(query_codes, db_codes, "hamming") * bits).astype(np.int64)
    relevant = (query_labels.astype(np.float32) @ db_labels.astype(np.float32).T) > 0
    n_db = db_codes.shape[0]
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_db + 1))])
    aps = np.zeros(len(query_codes))
    for i in range(len(query_codes)):
        order = np.argsort(dist[i], kind="stable")
        rel = relevant[i, order]
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        if ties == "index":
            ranks = np.flatnonzero(rel) + 1.0
            aps[i] = float(np.mean(np.arange(1, n_rel + 1) / ranks))
            continue
        d = dist[i, order]
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        n = np.diff(np.r_[starts, n_db]).astype(np.float64)
        r = np.add.reduceat(rel.astype(np.float64), starts)
        before = starts.astype(np.float64)
        rel_before = np.cumsum(r) - r
        b = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
        a = rel_before + 1
        s = n * b + (a - b - b * before) * (
            harmonic[starts + n.astype(np.int64)] - harmonic[starts]
        )
        aps[i] = float(np.sum(r / n * s)) / n_rel
    return float(aps.mean())


# ------------------------------------------------------------------------------------ benchmark


def random_case(
    n_query: int, n_db: int, bits: int, classes: int, labels: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random ±1 int8 codes with single-label (one-hot) or multi-label (multi-hot) labels."""
    rng = np.random.default_rng(seed)
    qc = np.where(rng.random((n_query, bits), dtype=np.float32) < 0.5, 1, -1).astype(np.int8)
    dc = np.where(rng.random((n_db, bits), dtype=np.float32) < 0.5, 1, -1).astype(np.int8)
    if labels == "single":
        eye = np.eye(classes, dtype=np.uint8)
        return qc, dc, eye[rng.integers(0, classes, n_query)], eye[rng.integers(0, classes, n_db)]
    share = min(1.0, 2.0 / classes)  # about two labels per item
    ql = (rng.random((n_query, classes)) < share).astype(np.uint8)
    dl = (rng.random((n_db, classes)) < share).astype(np.uint8)
    return qc, dc, ql, dl


_CPU: list[float] = []  # process CPU seconds of the latest _times call, one per run


def _times(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeat`` runs (CPU seconds of each run go to ``_CPU``)."""
    out, result = [], None
    _CPU.clear()
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
        _CPU.append(time.process_time() - c0)
    return out, result


def _stats(ts: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    out = {"min": min(ts), "median": statistics.median(ts), "runs": len(ts)}
    if cpu:
        out["cpu_median"] = statistics.median(cpu)
    return out


def run_bench(
    *,
    n_query: int = 8000,
    n_db: int = 8000,
    bits: int = 128,
    classes: int = 10,
    labels: str = "single",
    repeat: int = 5,
    repeat_reference: int = 1,
    skip_straightforward: bool = False,
    search_k: int = 100,
    large: int = 0,
    large_ties: Sequence[str] = ("expected",),
    threads: int = 1,
) -> dict[str, Any]:
    """The benchmark of the module docstring on ``n_query`` × ``n_db`` random codes of ``bits``
    bits (``search_k`` 0 skips the search, ``large`` 0 the N×N run); returns its summary."""
    from pipeline.retrieval import metrics as evaluate
    from pipeline.retrieval.index import HammingIndex
    from pipeline.retrieval.metrics import mean_average_precision

    evaluate.WORKERS = threads
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg())},
        "threads": threads,
    }
    qc, dc, ql, dl = random_case(n_query, n_db, bits, classes, labels, 0)
    case = f"{n_query}×{n_db} at {bits} bits, {labels}-label"
    out["case"] = {
        "n_query": n_query,
        "n_db": n_db,
        "bits": bits,
        "labels": labels,
        "classes": classes,
    }
    log.info("case: %s; load average %s", case, out["machine"]["load_avg_start"])

    mean_average_precision(qc[:8], dc[:64], ql[:8], dl[:64], ties="expected")  # warm-up
    fast: dict[str, Any] = {}
    for ties in ("expected", "index"):
        ts, value = _times(lambda t=ties: mean_average_precision(qc, dc, ql, dl, ties=t), repeat)
        fast[ties] = {"map": value, "seconds": _stats(ts, _CPU)}
        log.info(
            "fast MAP (%s): %.6f in %.3fs (median %.3fs wall, %.3fs CPU)",
            ties,
            value,
            min(ts),
            statistics.median(ts),
            statistics.median(_CPU),
        )
    out["fast"] = fast

    if not skip_straightforward:
        ref: dict[str, Any] = {}
        for ties in ("expected", "index"):
            ts, value = _times(
                lambda t=ties: straightforward_map(qc, dc, ql, dl, ties=t), repeat_reference
            )
            ref[ties] = {"map": value, "seconds": _stats(ts, _CPU)}
            diff = abs(value - fast[ties]["map"])
            ref[ties]["abs_difference"] = diff
            ref[ties]["speedup_median"] = statistics.median(ts) / fast[ties]["seconds"]["median"]
            ref[ties]["speedup_min"] = min(ts) / fast[ties]["seconds"]["min"]
            log.info(
                "straightforward MAP (%s): %.6f in %.2fs → %.1f× slower than the fast path "
                "(medians; %.1f× by minimum times; |difference| %.2e)",
                ties,
                value,
                min(ts),
                ref[ties]["speedup_median"],
                ref[ties]["speedup_min"],
                diff,
            )
            if diff > 1e-9:
                raise RuntimeError(f"fast and straightforward MAP ({ties}) differ by {diff:.3e}")
        out["straightforward"] = ref

    if search_k:
        k = min(search_k, n_db)
        import faiss

        packed_q, packed_d = evaluate.pack_codes(qc), evaluate.pack_codes(dc)
        plain = faiss.IndexBinaryFlat(packed_d.shape[1] * 8)
        plain.add(packed_d)
        ours = HammingIndex(dc)
        t_plain, t_ours = [], []
        for _ in range(repeat):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            d_plain, i_plain = plain.search(packed_q, k)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d_ours, i_ours = ours.search(qc, k)
            t_ours.append(time.perf_counter() - t0)
        pack_s, _ = _times(lambda: ours._pack(qc, "query_codes"), repeat)
        same = bool(np.array_equal(i_plain, i_ours) and np.array_equal(d_plain, d_ours))
        ratio = statistics.median(t_ours) / statistics.median(t_plain)
        out["search"] = {
            "k": k,
            "faiss_index_binary_flat": _stats(t_plain),
            "hamming_index": _stats(t_ours),
            "ratio_median": ratio,
            "query_packing": _stats(pack_s),
            "identical_results": same,
        }
        log.info(
            "top-%d search: HammingIndex %.3fs vs faiss IndexBinaryFlat %.3fs (medians) → "
            "ratio %.3f (its own work, checking and packing the ±1 queries: %.4fs); "
            "identical results: %s",
            k,
            statistics.median(t_ours),
            statistics.median(t_plain),
            ratio,
            statistics.median(pack_s),
            same,
        )

    if large:
        n = large
        qc2, dc2, ql2, dl2 = random_case(n, n, bits, classes, labels, 1)
        big: dict[str, Any] = {"n": n, "pairs": n * n}
        for ties in large_ties:
            tracemalloc.start()
            t0 = time.perf_counter()
            value = mean_average_precision(qc2, dc2, ql2, dl2, ties=ties)
            seconds = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            big[ties] = {"map": value, "seconds": seconds, "peak_traced_mib": peak / 2**20}
            log.info(
                "%d×%d MAP (%s): %.6f in %.2fs, peak traced memory %.0f MiB (inputs %.0f MiB)",
                n,
                n,
                ties,
                value,
                seconds,
                peak / 2**20,
                (qc2.nbytes + dc2.nbytes + ql2.nbytes + dl2.nbytes) / 2**20,
            )
        big["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["large"] = big
    out["machine"]["load_avg_end"] = list(os.getloadavg())
    return out
