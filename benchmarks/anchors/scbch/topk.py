"""Two MAP@k conventions of the cross-modal hashing literature, written out for comparison.

The project's ``pipeline.retrieval.metrics`` MAP@k averages precision over the top k positions
and divides by min(R, k) (R: relevant items in the database). Two other conventions appear in
the authors' code of this line of work:

* :func:`top_map_hits` (upstream ``utils/tools.py: CalcTopMap``): the top k positions, divided
  by the number of relevant items found there;
* :func:`first_relevant_map` (upstream ``calc_map_k(k=...)``): the precision at the positions of
  the first min(R, k) relevant items, wherever they rank.

Ranking: Hamming distance, ties by database index (a stable sort). Queries with R = 0 add 0 and
count in the mean for :func:`top_map_hits` (as ``CalcTopMap``) and are left out for
:func:`first_relevant_map` (as ``calc_map_k``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def _ranked_relevance(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any
) -> Iterator[np.ndarray]:
    q = np.asarray(query_codes, dtype=np.float64)
    d = np.asarray(db_codes, dtype=np.float64)
    ql = np.asarray(query_labels, dtype=np.float64)
    dl = np.asarray(db_labels, dtype=np.float64)
    for i in range(q.shape[0]):
        dist = 0.5 * (q.shape[1] - d @ q[i])
        order = np.argsort(dist, kind="stable")
        yield (dl[order] @ ql[i]) > 0


def top_map_hits(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any, top_k: int
) -> float:
    """MAP@k over the top k positions, each AP divided by its hits in the top k."""
    total, n = 0.0, 0
    for rel in _ranked_relevance(query_codes, db_codes, query_labels, db_labels):
        n += 1
        top = rel[:top_k]
        hits = int(top.sum())
        if hits:
            total += float(np.mean(np.arange(1, hits + 1) / (np.flatnonzero(top) + 1.0)))
    return total / max(n, 1)


def first_relevant_map(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any, k: int | None
) -> float:
    """MAP over the first min(R, k) relevant items (k None: all of them, i.e. MAP@all)."""
    total, n = 0.0, 0
    for rel in _ranked_relevance(query_codes, db_codes, query_labels, db_labels):
        pos = np.flatnonzero(rel) + 1.0
        if pos.size == 0:
            continue
        m = pos.size if k is None else min(k, pos.size)
        total += float(np.mean(np.arange(1, m + 1) / pos[:m]))
        n += 1
    return total / max(n, 1)
