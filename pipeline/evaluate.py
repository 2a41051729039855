"""Retrieval metrics over Hamming ranking of ±1 codes (no Ray, no MLflow).

Two ways to rank items at equal Hamming distance:
- ``ties="index"``: ties broken by database index (a stable sort), the usual argsort convention;
- ``ties="expected"``: the exact expected AP over all orderings of tied items.

AP of a query is Σ_k P@k·rel_k / R over the ranked list, where R is the number of relevant items
(with ``top_k``: positions ≤ k only, divided by min(R, k)). A query with no relevant item has AP 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 1024


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _check(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    qc, dc = _as_numpy(query_codes), _as_numpy(db_codes)
    ql, dl = _as_numpy(query_labels), _as_numpy(db_labels)
    if qc.ndim != 2 or dc.ndim != 2 or qc.shape[1] != dc.shape[1]:
        raise ValueError(f"codes must be (n, L) with one L; got {qc.shape} and {dc.shape}")
    if ql.ndim == 1 or dl.ndim == 1:
        raise ValueError("labels must be multi-hot (n, K) arrays")
    if ql.shape[0] != qc.shape[0] or dl.shape[0] != dc.shape[0] or ql.shape[1] != dl.shape[1]:
        raise ValueError(f"labels {ql.shape}/{dl.shape} do not match codes {qc.shape}/{dc.shape}")
    if qc.shape[0] == 0 or dc.shape[0] == 0:
        raise ValueError("query and database sets must be non-empty")
    if not (np.isin(qc, (-1, 1)).all() and np.isin(dc, (-1, 1)).all()):
        raise ValueError("codes must contain only -1 and +1 (take the sign of continuous codes)")
    return (
        qc.astype(np.float32),
        dc.astype(np.float32),
        ql.astype(np.float32),
        dl.astype(np.float32),
    )


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Hamming distance of ±1 codes, (L − q·d)/2, as int16."""
    bits = query_codes.shape[1]
    dots = query_codes @ db_codes.T
    return np.rint((bits - dots) * 0.5).astype(np.int16)


def _ap_index(dist: np.ndarray, rel: np.ndarray, k: int, n_rel: np.ndarray) -> np.ndarray:
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # radix sort on int16, stable
    hits = np.take_along_axis(rel, order, axis=1)
    ranks = np.arange(1, hits.shape[1] + 1, dtype=np.float64)
    prec_sum = (np.cumsum(hits, axis=1) / ranks * hits).sum(axis=1)
    return prec_sum / np.maximum(np.minimum(n_rel, k), 1)


def _ap_expected(
    dist: np.ndarray, rel: np.ndarray, bits: int, k: int, n_rel: np.ndarray, harmonic: np.ndarray
) -> np.ndarray:
    q = dist.shape[0]
    nb = bits + 1
    rows = np.arange(q, dtype=np.int64)[:, None] * nb
    keys = (rows + dist).ravel()
    n = np.bincount(keys, minlength=q * nb).reshape(q, nb).astype(np.float64)
    r = np.bincount(keys, weights=rel.ravel(), minlength=q * nb).reshape(q, nb)
    before = np.cumsum(n, axis=1) - n  # items strictly closer
    rel_before = np.cumsum(r, axis=1) - r
    m = np.clip(k - before, 0, n)  # positions of this tie group inside the top k
    # A relevant item at position j of a group of n (r relevant), after c items with R_b relevant,
    # has expected precision (R_b + 1 + (j−1)(r−1)/(n−1)) / (c + j); summing over j with
    # probability r/n per position gives the closed form below (H = harmonic numbers).
    b = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    a = rel_before + 1
    c = before
    ci = c.astype(np.int64)
    mi = m.astype(np.int64)
    s = m * b + (a - b - b * c) * (harmonic[ci + mi] - harmonic[ci])
    contrib = np.where((n > 0) & (r > 0), r / np.maximum(n, 1) * s, 0.0)
    return contrib.sum(axis=1) / np.maximum(np.minimum(n_rel, k), 1)


def average_precisions(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    ties: str = "index",
    top_k: int | None = None,
) -> np.ndarray:
    """Per-query AP (see module docstring); relevance = the two items share at least one label."""
    if ties not in ("index", "expected"):
        raise ValueError(f"ties must be 'index' or 'expected', got {ties!r}")
    qc, dc, ql, dl = _check(query_codes, db_codes, query_labels, db_labels)
    n_db, bits = dc.shape[0], dc.shape[1]
    if top_k is not None and not 0 < top_k <= n_db:
        raise ValueError(f"top_k={top_k} must be in [1, {n_db}] (database size)")
    k = n_db if top_k is None else top_k
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_db + 1))])
    out = np.empty(qc.shape[0], dtype=np.float64)
    for s in range(0, qc.shape[0], _CHUNK):
        e = min(s + _CHUNK, qc.shape[0])
        dist = hamming_distances(qc[s:e], dc)
        rel = (ql[s:e] @ dl.T) > 0
        n_rel = rel.sum(axis=1)
        if ties == "index":
            out[s:e] = _ap_index(dist, rel, k, n_rel)
        else:
            out[s:e] = _ap_expected(dist, rel, bits, k, n_rel, harmonic)
    return out


def mean_average_precision(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    ties: str = "index",
    top_k: int | None = None,
) -> float:
    """MAP of Hamming ranking of ±1 codes (NumPy or torch), relevance = shares ≥ 1 label."""
    return float(
        average_precisions(
            query_codes, db_codes, query_labels, db_labels, ties=ties, top_k=top_k
        ).mean()
    )


def cross_modal_map(
    image_codes: Any, text_codes: Any, labels: Any, *, ties: str = "index"
) -> dict[str, float]:
    """Set-vs-itself cross-modal protocol: I2T, T2I and their mean."""
    i2t = mean_average_precision(image_codes, text_codes, labels, labels, ties=ties)
    t2i = mean_average_precision(text_codes, image_codes, labels, labels, ties=ties)
    return {"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2}


def noise_detection(weights: np.ndarray, is_noisy: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of "SPL weight = 0" as a detector of corrupted labels."""
    flagged = np.asarray(weights) <= 0.0
    noisy = np.asarray(is_noisy, dtype=bool)
    tp = float(np.sum(flagged & noisy))
    precision = tp / float(flagged.sum()) if flagged.any() else 0.0
    recall = tp / float(noisy.sum()) if noisy.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
