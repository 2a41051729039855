"""Speed and recall of the Hamming indexes on large synthetic code sets (no Ray, no MLflow).

Codes with cluster structure: ``centers`` random ±1 centre codes, every item a centre (drawn
uniformly) with each bit flipped independently with probability ``flip``; the queries are drawn
from the same distribution (other items of the same centres). The exact scan (faiss
``IndexBinaryFlat``) gives the reference top-k; each approximate index is measured against it in
the same run: build seconds, queries per second, resident memory added by the build and
recall@k.

Recall@k is tie-aware: with D_k the exact k-th distance of a query, any k items with all distances
< D_k and the rest at D_k are a correct top-k, so a result list scores
(#returned with distance < D_k + min(#returned at D_k, k − #exact items below D_k)) / k, the
largest overlap it has with any correct top-k (−1 pads count as misses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.retrieval.index import HammingIndex, default_nlist, default_nprobe
from pipeline.retrieval.metrics import _faiss

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # rows generated at a time


def clustered_codes(
    n: int, bits: int, *, centers: int, flip: float, seed: int, center_seed: int = 0
) -> np.ndarray:
    """(n, bits/8) packed codes: a random centre each, bits flipped with probability ``flip``.

    The centres depend on ``center_seed`` only, so two calls with other ``seed`` draw from the
    same distribution (a database and its queries).
    """
    if bits % 8:
        raise ValueError(f"bits must be a multiple of 8, got {bits}")
    if not 0.0 <= flip <= 0.5:
        raise ValueError(f"flip must be in [0, 0.5], got {flip}")
    c = np.packbits(np.random.default_rng(center_seed).random((centers, bits)) < 0.5, axis=1)
    rng = np.random.default_rng(seed)
    out = np.empty((n, bits // 8), dtype=np.uint8)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        flips = np.packbits(rng.random((e - s, bits), dtype=np.float32) < flip, axis=1)
        out[s:e] = c[rng.integers(0, centers, e - s)] ^ flips
    return out


def tie_aware_recall(exact_d: np.ndarray, found_d: np.ndarray, found_i: np.ndarray) -> float:
    """Mean recall@k of ``found`` against the exact distances (module docstring)."""
    k = exact_d.shape[1]
    dk = exact_d[:, -1:]
    below_exact = (exact_d < dk).sum(1)
    hit = found_i >= 0
    below = ((found_d < dk) & hit).sum(1)
    at = ((found_d == dk) & hit).sum(1)
    return float(np.mean((below + np.minimum(at, k - below_exact)) / k))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed_search(index: HammingIndex, q: np.ndarray, k: int) -> tuple[Any, Any, float]:
    t0 = time.perf_counter()
    d, i = index.search(q, k)
    return d, i, time.perf_counter() - t0


def _build(bits: int, db: np.ndarray, **kw: Any) -> tuple[HammingIndex, float, int]:
    before = _rss_bytes()
    t0 = time.perf_counter()
    index = HammingIndex(db, packed=True, bits=bits, **kw)
    return index, time.perf_counter() - t0, _rss_bytes() - before


def index_benchmark(
    n: int,
    *,
    bits: int = 128,
    queries: int = 1000,
    k: int = 100,
    centers: int | None = None,
    flip: float = 0.1,
    nlist: int | None = None,
    nprobes: Sequence[int] = (),
    mih: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Flat scan vs IVF (one build, each of ``nprobes``) and optionally mih on one code set.

    ``centers`` defaults to n / 1000 (clusters of about 1000 codes, so a query's top-100 lies
    in its own cluster; far fewer codes per centre make the top-100 mostly unrelated codes at
    near-random distances, where no index beats a scan).
    """
    f = _faiss()
    if f is None:
        raise RuntimeError("the index benchmark needs faiss (pip install faiss-cpu)")
    f.omp_set_num_threads(threads)
    centers = centers or max(1, n // 1000)
    t0 = time.perf_counter()
    db = clustered_codes(n, bits, centers=centers, flip=flip, seed=seed + 1, center_seed=seed)
    q = clustered_codes(queries, bits, centers=centers, flip=flip, seed=seed + 2, center_seed=seed)
    gen_s = time.perf_counter() - t0
    log.info("generated %d + %d codes of %d bits in %.1fs", n, queries, bits, gen_s)
    width = bits // 8
    rows: list[dict[str, Any]] = []

    flat, build_s, rss = _build(bits, db, kind="flat")
    exact_d, _, search_s = _timed_search(flat, q, k)
    flat_qps = queries / search_s
    rows.append(
        {
            "kind": "flat",
            "params": {},
            "build_seconds": build_s,
            "train_seconds": 0.0,
            "index_bytes": n * width,
            "rss_added_bytes": rss,
            "search_seconds": search_s,
            "qps": flat_qps,
            "speedup": 1.0,
            "recall": 1.0,
        }
    )
    log.info("flat: %.1f queries/s (%d queries in %.2fs)", flat_qps, queries, search_s)

    nlist = nlist or default_nlist(n)
    nprobes = list(nprobes) or sorted({1, 4, 16, default_nprobe(nlist), 64, 256} - {0})
    t0 = time.perf_counter()
    ivf, build_s, rss = _build(bits, db, kind="ivf", nlist=nlist, seed=seed)
    train_s = ivf.train_seconds
    log.info("ivf nlist=%d: built in %.1fs (training %.1fs)", nlist, build_s, train_s)
    for nprobe in nprobes:
        if nprobe > nlist:
            continue
        ivf.set_nprobe(nprobe)
        d, i, s = _timed_search(ivf, q, k)
        row = {
            "kind": "ivf",
            "params": {"nlist": nlist, "nprobe": nprobe, "train_size": ivf.params["train_size"]},
            "build_seconds": build_s,
            "train_seconds": train_s,
            "index_bytes": n * (width + 8) + nlist * width,
            "rss_added_bytes": rss,
            "search_seconds": s,
            "qps": queries / s,
            "speedup": (queries / s) / flat_qps,
            "recall": tie_aware_recall(exact_d, d, i),
        }
        rows.append(row)
        log.info(
            "ivf nprobe=%d: %.1f queries/s (%.1f× flat), recall@%d %.4f",
            nprobe,
            row["qps"],
            row["speedup"],
            k,
            row["recall"],
        )
    del ivf
    if mih:
        index, build_s, rss = _build(bits, db, kind="mih", nflip=1)
        d, i, s = _timed_search(index, q, k)
        tables = max(2, bits // 16)
        rows.append(
            {
                "kind": "mih",
                "params": {"tables": tables, "nflip": 1},
                "build_seconds": build_s,
                "train_seconds": 0.0,
                "index_bytes": n * (width + 8 * tables),
                "rss_added_bytes": rss,
                "search_seconds": s,
                "qps": queries / s,
                "speedup": (queries / s) / flat_qps,
                "recall": tie_aware_recall(exact_d, d, i),
            }
        )
        log.info("mih: %.1f queries/s, recall %.4f", rows[-1]["qps"], rows[-1]["recall"])
        del index
    # the exact scan once more, after the others: on a shared machine the load changes during a
    # run, so each speedup is taken against the faster of the two exact-scan timings
    _, _, again_s = _timed_search(flat, q, k)
    flat_qps_again = queries / again_s
    best = max(flat_qps, flat_qps_again)
    log.info("flat again: %.1f queries/s", flat_qps_again)
    rows[0].update(qps=best, search_seconds=queries / best)
    for row in rows:
        row["speedup"] = row["qps"] / best
    return {
        "n": n,
        "bits": bits,
        "queries": queries,
        "k": k,
        "centers": centers,
        "flip": flip,
        "threads": threads,
        "seed": seed,
        "generate_seconds": gen_s,
        "flat_qps_runs": [flat_qps, flat_qps_again],
        "rows": rows,
    }


def format_index_table(result: dict[str, Any]) -> str:
    """The rows of :func:`index_benchmark` as a Markdown table."""
    k = result["k"]
    lines = [
        f"| kind | params | build s (train s) | queries/s | × flat | recall@{k} | index MiB "
        "| RSS added MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        params = ", ".join(f"{a}={b}" for a, b in r["params"].items()) or "—"
        lines.append(
            f"| {r['kind']} | {params} | {r['build_seconds']:.1f} ({r['train_seconds']:.1f}) "
            f"| {r['qps']:.1f} | {r['speedup']:.1f} | {r['recall']:.4f} "
            f"| {r['index_bytes'] / 2**20:.0f} | {r['rss_added_bytes'] / 2**20:.0f} |"
        )
    a, b = result["flat_qps_runs"]
    lines.append(
        f"\nexact scan {a:.1f} queries/s first, {b:.1f} after the others; × flat is against the "
        "faster"
    )
    return "\n".join(lines)
