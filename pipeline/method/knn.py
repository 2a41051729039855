"""SCBCH's cross-modal kNN and reliability weights over sharded codes (NumPy + faiss; no torch,
no Ray, no torch.distributed).

One inner product per pair. With î, t̂ the L2-normalised image and text codes, the query of item
i is q_i = [î_i, t̂_i] and the database row of item j is d_j = [t̂_j, î_j], so

    q_i · d_j = cos(img_i, txt_j) + cos(txt_i, img_j) = 2·sim_ij

and one inner-product search over the d_j gives the k nearest cross-modal neighbours of
:func:`pipeline.method.scbch.reliability_weights`. Intra-modal neighbours (its
``neighbours="intra"``) use d_j = q_j: q_i · q_j = cos(img_i, img_j) + cos(txt_i, txt_j).

Sharding. Every shard holds the d_j of the items it owns (:class:`ShardIndex`); a query is
searched in every shard, each returns its own top k, and :func:`merge_topk` keeps the k best of
the union. Neighbours are ordered by (similarity desc, item id asc); both the per-shard and the
merged selection use that total order, so the result does not depend on how the items are split
(a global top-k member is always in its own shard's top k).

Exactness (``kind="flat"``). faiss's float32 search only proposes candidates (k + 1 + ``extra``
per query); their similarities are recomputed pairwise in float64 from the float32 vectors (one
fixed routine, so the value of a pair never depends on the batch it came in). A query is *safe*
when the last proposed float32 score plus the float32 error bound ``δ`` is below the k-th
recomputed similarity: no unproposed item can then reach the k-th place or tie with it. Unsafe
queries (near-ties at the boundary, e.g. saturated ±1 codes) are scanned in full: every item with
float32 score ≥ the k-th similarity − δ is recomputed. The result is the exact top k under the
order above, with ties at the k-th value going to the smaller item id, as in the reference.
Differences from :func:`~pipeline.method.scbch.reliability_weights`: similarities are float64
(the reference's float32 sims can order two values within ~1e-7 of each other differently) and
the tie key is the item id (the reference's is the row position: equal when rows are sorted by
id, as the pipeline's are).

``kind="ivf"`` searches a per-shard ``IndexIVFFlat`` (inner product) with ``nprobe`` lists and
reranks its candidates in float64, without the safety scan: approximate. Float rather than binary
codes because the weights are defined on the continuous codes (a Hamming search on their signs
would change the neighbours, not only their order). ``flat`` (exact) is the default. In
``docs/results/scale/scbch-knn.md`` (4 shards, nprobe 16) IVF matched the exact neighbours on
the checked subsets and was not faster at 50k items, while at 200k items its refresh (80 s) beat
the flat scan's rate (43 s per 20k queries); a flat refresh costs N² pair scores, so IVF is the
option above a few hundred thousand items.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

log = logging.getLogger(__name__)

NO_ID = np.iinfo(np.int64).max  # padding of a top-k row with fewer than k neighbours
KINDS = ("flat", "ivf")
NEIGHBOURS = ("cross", "intra")
_EXTRA = 8  # candidates beyond k + 1 that the float32 search proposes
_PAIR_BLOCK = 1 << 22  # float64 elements per block of pairwise recomputation


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """x_i / max(‖x_i‖, 1e-12) as float32 (norms in float64)."""
    x64 = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))
    return (x64 / np.maximum(norm, 1e-12)).astype(np.float32)


def cross_modal_vectors(codes_img: np.ndarray, codes_txt: np.ndarray) -> np.ndarray:
    """Queries q_i = [î_i, t̂_i], float32 (n, 2L); the database rows are :func:`swap_halves`."""
    return np.ascontiguousarray(
        np.concatenate([normalise_rows(codes_img), normalise_rows(codes_txt)], axis=1)
    )


def swap_halves(v: np.ndarray) -> np.ndarray:
    """[a, b] → [b, a] along the columns (a query row into its database row and back)."""
    h = v.shape[1] // 2
    return np.ascontiguousarray(np.concatenate([v[:, h:], v[:, :h]], axis=1))


def float32_error_bound(dim: int) -> float:
    """A bound (×4 margin) on |float32 q·d − exact| for rows whose halves have norm ≤ 1."""
    return 4.0 * dim * 2.0**-24 * 2.0 + 1e-9


def pair_scores(q: np.ndarray, db: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """q_i · db[cand_ij] in float64, (m, c); the same value for a pair in any batch."""
    m, c = cand.shape
    out = np.empty((m, c), dtype=np.float64)
    step = max(1, _PAIR_BLOCK // max(1, c * q.shape[1]))
    for s in range(0, m, step):
        qa = q[s : s + step].astype(np.float64)[:, None, :]
        out[s : s + step] = (qa * db[cand[s : s + step]].astype(np.float64)).sum(axis=2)
    return out


def _order(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k first entries by (score desc, id asc)."""
    idx = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, idx, axis=1), np.take_along_axis(ids, idx, axis=1)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    m, c = scores.shape
    if c >= k:
        return scores, ids
    return (
        np.concatenate([scores, np.full((m, k - c), -np.inf)], axis=1),
        np.concatenate([ids, np.full((m, k - c), NO_ID, dtype=np.int64)], axis=1),
    )


@dataclass
class ShardIndex:
    """One shard's database rows d_j with their item ids and a faiss search structure."""

    db: np.ndarray  # float32 (n, 2L), d_j = [t̂_j, î_j]
    ids: np.ndarray  # int64 (n,), item ids
    kind: str = "flat"
    ivf: faiss.Index | None = None
    nprobe: int = 0

    @classmethod
    def build(
        cls,
        queries: np.ndarray,
        ids: np.ndarray,
        *,
        kind: str = "flat",
        nlist: int = 0,
        nprobe: int = 16,
        seed: int = 0,
        neighbours: str = "cross",
    ) -> ShardIndex:
        """The index of a shard from its items' queries (:func:`cross_modal_vectors`); database
        rows are the swapped queries for ``neighbours`` "cross", the queries for "intra".

        ``ivf``: ``nlist`` lists (0: 4·√n, at most n / 39), k-means on at most 64 points per
        list, seeded."""
        if kind not in KINDS:
            raise ValueError(f"unknown kNN index kind {kind!r}; expected one of {KINDS}")
        if neighbours not in NEIGHBOURS:
            raise ValueError(f"neighbours must be one of {NEIGHBOURS}, got {neighbours!r}")
        q32 = np.asarray(queries, dtype=np.float32)
        db = swap_halves(q32) if neighbours == "cross" else np.ascontiguousarray(q32)
        ids = np.asarray(ids, dtype=np.int64)
        if kind == "flat" or db.shape[0] < 2:
            return cls(db, ids, "flat")
        n, d = db.shape
        nlist = nlist or int(4 * math.sqrt(n))
        nlist = max(1, min(nlist, n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = int(seed)
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = 64
        ivf.train(db)
        ivf.add(db)
        ivf.nprobe = max(1, min(int(nprobe), nlist))
        index = cls(db, ids, "ivf", ivf, ivf.nprobe)
        index.quantizer = quantizer  # kept alive with the index
        return index

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def nbytes(self) -> int:
        """Bytes held: the rows, the ids and (ivf) the index's own copy, lists and centroids."""
        extra = 0
        if self.ivf is not None:
            n, d = self.db.shape
            extra = n * (d * 4 + 8) + self.ivf.nlist * d * 4
        return int(self.db.nbytes + self.ids.nbytes + extra)

    def topk(
        self, queries: np.ndarray, query_ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """This shard's k best (2·sim float64, item id) per query, self excluded; rows with fewer
        than k neighbours are padded with (−inf, ``NO_ID``)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        qid = np.asarray(query_ids, dtype=np.int64)
        m, n = q.shape[0], len(self)
        if m == 0 or n == 0 or k <= 0:
            return np.full((m, k), -np.inf), np.full((m, k), NO_ID, dtype=np.int64)
        c = min(n, k + 1 + _EXTRA)
        if self.ivf is not None:
            approx, pos = self.ivf.search(q, c)
        else:
            approx, pos = faiss.knn(q, self.db, c, metric=faiss.METRIC_INNER_PRODUCT)
        valid = pos >= 0
        pos = np.where(valid, pos, 0)
        exact = np.where(valid, pair_scores(q, self.db, pos), -np.inf)
        cand_ids = np.where(valid, self.ids[pos], NO_ID)
        self_hit = cand_ids == qid[:, None]
        exact[self_hit] = -np.inf
        cand_ids[self_hit] = NO_ID
        scores, ids = _order(exact, cand_ids, k)
        scores, ids = _pad(scores, ids, k)
        if self.ivf is None and c < n:  # the safety test: could an unproposed item reach rank k?
            delta = float32_error_bound(q.shape[1])
            unsafe = np.flatnonzero(approx[:, -1].astype(np.float64) + delta >= scores[:, -1])
            for r in unsafe:
                scores[r], ids[r] = self._full_scan(q[r], qid[r], scores[r, -1] - delta, k)
        return scores, ids

    def _full_scan(
        self, q: np.ndarray, qid: int, floor: float, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query against every row: recompute all with float32 score ≥ ``floor``."""
        approx = self.db @ q
        pos = np.flatnonzero(approx.astype(np.float64) >= floor)
        pos = pos[self.ids[pos] != qid]
        exact = pair_scores(q[None, :], self.db, pos[None, :])
        scores, ids = _order(exact, self.ids[pos][None, :], k)
        scores, ids = _pad(scores, ids, k)
        return scores[0], ids[0]


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) per row over the shards' top-k lists, by (score desc, id asc)."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    return _order(scores, ids, k)


@dataclass
class LabelTable:
    """Label vectors looked up by item id (every item of the training set)."""

    sorted_ids: np.ndarray
    labels: np.ndarray  # (N, K), uint8 for multi-hot labels, float32 otherwise

    @classmethod
    def of(cls, ids: np.ndarray, labels: np.ndarray) -> LabelTable:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], compact_labels(labels)[order])

    def __len__(self) -> int:
        return int(self.sorted_ids.shape[0])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The label rows of ``ids`` (which must all be present)."""
        pos = np.searchsorted(self.sorted_ids, ids)
        return self.labels[pos]


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """uint8 when every entry is 0 or 1 (multi-hot), float32 otherwise."""
    y = np.asarray(labels)
    if y.size and np.isin(y, (0, 1)).all():
        return y.astype(np.uint8)
    return y.astype(np.float32)


def neighbour_weights(
    scores: np.ndarray,
    nbr_ids: np.ndarray,
    own_labels: np.ndarray,
    table: LabelTable,
    g: float,
    neighbours: str = "cross",
) -> np.ndarray:
    """w_i = g + (1 − g)·cos(ŷ_i, y_i) over the row's neighbours (``scores`` = 2·sim; ``NO_ID``
    entries ignored); float32 (m,). ``neighbours`` "cross": ŷ_i = Σ_j ½(1 + sim_ij)·y_j;
    "intra": ŷ_i = Σ_j sim_ij·y_j / (Σ_j sim_ij + 1e-8)."""
    y = np.asarray(own_labels, dtype=np.float64)
    k = nbr_ids.shape[1]
    y_hat = np.zeros_like(y)
    total = np.zeros(y.shape[0])
    for t in range(k):
        col = nbr_ids[:, t]
        ok = col != NO_ID
        if not ok.any():
            continue
        sim = 0.5 * scores[ok, t]
        coef = 0.5 * (1.0 + sim) if neighbours == "cross" else sim
        total[ok] += coef
        y_hat[ok] += coef[:, None] * table.rows(col[ok]).astype(np.float64)
    if neighbours == "intra":
        y_hat /= (total + 1e-8)[:, None]
    dot = (y_hat * y).sum(axis=1)
    denom = np.sqrt((y_hat * y_hat).sum(axis=1)) * np.sqrt((y * y).sum(axis=1))
    c = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    return (g + (1.0 - g) * c).astype(np.float32)


def effective_k(k: int, total: int) -> int:
    """k clipped to N − 1 (the reference's rule)."""
    return max(0, min(int(k), int(total) - 1))


def sharded_reliability(
    shards: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    k: int,
    g: float,
    kind: str = "flat",
    nprobe: int = 16,
    seed: int = 0,
    chunk: int = 8192,
    neighbours: str = "cross",
) -> list[np.ndarray]:
    """Reliability weights of W shards simulated in one process, one float32 array per shard.

    ``shards``: (item_id, codes_img, codes_txt, label) per shard. Each shard's queries are
    searched in every shard's index and merged, as the distributed path does."""
    queries = [cross_modal_vectors(ci, ct) for _, ci, ct, _ in shards]
    ids = [np.asarray(s[0], dtype=np.int64) for s in shards]
    indexes = [
        ShardIndex.build(q, i, kind=kind, nprobe=nprobe, seed=seed + r, neighbours=neighbours)
        for r, (q, i) in enumerate(zip(queries, ids, strict=True))
    ]
    table = LabelTable.of(np.concatenate(ids), np.concatenate([s[3] for s in shards]))
    kk = effective_k(k, len(table))
    out = []
    for q, qid, s in zip(queries, ids, shards, strict=True):
        w = np.empty(q.shape[0], dtype=np.float32)
        for a in range(0, q.shape[0], chunk):
            sl = slice(a, a + chunk)
            parts = [ix.topk(q[sl], qid[sl], kk) for ix in indexes]
            scores, nbr = merge_topk(parts, kk)
            w[sl] = neighbour_weights(scores, nbr, np.asarray(s[3])[sl], table, g, neighbours)
        out.append(w)
    return out
