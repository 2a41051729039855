"""Retrieval metrics over Hamming ranking of ±1 codes (no Ray, no MLflow).

Relevance: a database item is relevant to a query when they share at least one label (multi-hot
``(n, K)`` label rows; single-label data is the one-hot special case) or, with 1-D integer labels,
when their class ids are equal. A label row with no positive entry is relevant to nothing.

Items are ranked by Hamming distance to the query. An L-bit code has only L+1 distances, so many
items tie; two conventions are offered:

- ``ties="index"``: ties broken by database index (a stable sort, the usual argsort convention);
- ``ties="expected"``: the exact expected value over all orderings of the tied items (uniformly
  random tie-breaking), computed in closed form, not by sampling.

AP of a query is Σ_k P@k·rel_k / R over the ranked list, where R is the number of relevant items
(with ``top_k``: positions ≤ k only, divided by min(R, k)). A query with no relevant item has AP 0.
The precision–recall curve retrieves every item within Hamming radius ρ = 0..L (no ties involved).

Protocols: a query set against a database set (the multi-label protocol) and a set against itself
(the single-label protocol: e.g. every test image queries all test texts, and its own text stays
in the database as a relevant item); :func:`cross_modal_map` runs both directions.

Speed: codes are bit-packed and compared with popcount (faiss when installed, else a matrix
product), queries are processed in chunks of bounded memory (``CHUNK_PAIRS``). The tie-aware
variant needs only the per-query counts of items and of relevant items at each distance, a
histogram, no sort (single-label data is grouped by class first, so relevance is one block per
class). The index variant sorts one integer key per pair that carries distance, index and
relevance. ``RSHNL_EVAL_THREADS`` (default 1) sets threads over query chunks.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Ties = Literal["index", "expected"]
TIES: tuple[str, ...] = ("index", "expected")

# Pairs per chunk: a few int32 arrays of this many elements are alive at a time (~8 MB each).
CHUNK_PAIRS = 1 << 21
# Threads over query chunks (the kernels release the GIL). One by default: evaluation often runs
# beside training workers on the same cores, where more threads only contend.
WORKERS = max(1, int(os.environ.get("RSHNL_EVAL_THREADS", "1")))

_FAISS: Any = None
_FAISS_TRIED = False


def _faiss() -> Any:
    """The faiss module when installed (popcount distances and histograms), else None."""
    global _FAISS, _FAISS_TRIED
    if not _FAISS_TRIED:
        _FAISS_TRIED = True
        try:
            import faiss

            _FAISS = faiss if hasattr(faiss, "hammings") and hasattr(faiss, "ivec_hist") else None
        except ImportError:
            _FAISS = None
    return _FAISS


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


# ---------------------------------------------------------------------------------------- codes


def code_bits(codes: Any, name: str = "codes") -> np.ndarray:
    """Validate ±1 codes (NumPy or torch, any dtype) and return them as a bool array (bit = +1)."""
    a = _as_numpy(codes)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, L) array of -1/+1, got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric -1/+1 codes, got dtype {a.dtype}")
    if a.size and not bool((np.abs(a) == 1).all()):
        raise ValueError(f"{name} must contain only -1 and +1 (take the sign of continuous codes)")
    return a > 0


def pack_codes(codes: Any) -> np.ndarray:
    """±1 codes (n, L) → packed bits (n, ⌈L/8⌉) uint8, most significant bit first (faiss order)."""
    return np.packbits(code_bits(codes), axis=1)


def unpack_codes(packed: Any, bits: int) -> np.ndarray:
    """Packed bits (n, ⌈L/8⌉) uint8 → ±1 int8 codes (n, L); the inverse of :func:`pack_codes`."""
    p = np.asarray(packed, dtype=np.uint8)
    if p.ndim != 2 or p.shape[1] != (bits + 7) // 8:
        raise ValueError(f"packed codes of {bits} bits must have shape (n, {(bits + 7) // 8})")
    b = np.unpackbits(p, axis=1, count=bits)
    return (b.astype(np.int8) * 2 - 1).astype(np.int8)


@dataclass
class _Codes:
    """Codes in the forms the distance kernels need."""

    bits: int
    packed: np.ndarray  # (n, 8·w) uint8, zero-padded to whole 64-bit words, C-contiguous
    _signs: np.ndarray | None = None

    @classmethod
    def from_any(cls, codes: Any, name: str) -> _Codes:
        b = code_bits(codes, name)
        packed = np.packbits(b, axis=1)
        width = max(8, -(-packed.shape[1] // 8) * 8)
        if width != packed.shape[1]:
            packed = np.pad(packed, ((0, 0), (0, width - packed.shape[1])))
        return cls(bits=b.shape[1], packed=np.ascontiguousarray(packed))

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    def signs(self) -> np.ndarray:
        """±1 float32 (n, L), for the matrix-product fallback."""
        if self._signs is None:
            b = np.unpackbits(self.packed, axis=1, count=self.bits)
            self._signs = b.astype(np.float32) * 2 - 1
        return self._signs


def _distance_block(q: _Codes, s: int, e: int, d: _Codes, out: np.ndarray) -> np.ndarray:
    """Hamming distances of queries s..e to every database code, into ``out`` (e−s, n) int32."""
    f = _faiss()
    if f is not None:
        qp = q.packed[s:e]
        f.hammings(f.swig_ptr(qp), f.swig_ptr(d.packed), e - s, d.n, qp.shape[1], f.swig_ptr(out))
        return out
    dots = q.signs()[s:e] @ d.signs().T
    np.subtract(q.bits, dots, out=dots)
    dots *= 0.5
    np.rint(dots, out=dots)
    out[...] = dots
    return out


def _histogram(keys: np.ndarray, bins: int) -> np.ndarray:
    """Counts of the values 0..bins−1 in a C-contiguous int32 array."""
    f = _faiss()
    if f is not None:
        out = np.empty(bins, dtype=np.int32)
        f.ivec_hist(keys.size, f.swig_ptr(keys), bins, f.swig_ptr(out))
        return out
    return np.bincount(keys.ravel(), minlength=bins)


def hamming_distances(query_codes: Any, db_codes: Any) -> np.ndarray:
    """Hamming distances (nq, n_db) int32 between ±1 codes (NumPy or torch)."""
    q, d = _Codes.from_any(query_codes, "query_codes"), _Codes.from_any(db_codes, "db_codes")
    if q.bits != d.bits:
        raise ValueError(f"codes must have one length; got {q.bits} and {d.bits} bits")
    out = np.empty((q.n, d.n), dtype=np.int32)
    step = max(1, CHUNK_PAIRS // max(d.n, 1))
    for s in range(0, q.n, step):
        e = min(s + step, q.n)
        _distance_block(q, s, e, d, out[s:e])
    return out


# --------------------------------------------------------------------------------------- labels


class _Relevance:
    """Relevance of database items to queries, evaluated one query chunk at a time."""

    def __init__(self, query_labels: Any, db_labels: Any, nq: int, nd: int) -> None:
        ql, dl = _as_numpy(query_labels), _as_numpy(db_labels)
        if ql.ndim != dl.ndim or ql.ndim not in (1, 2):
            raise ValueError(
                "labels must both be multi-hot (n, K) arrays or both 1-D class ids; "
                f"got shapes {ql.shape} and {dl.shape}"
            )
        if ql.shape[0] != nq or dl.shape[0] != nd:
            raise ValueError(
                f"labels have {ql.shape[0]} and {dl.shape[0]} rows but there are {nq} query "
                f"and {nd} database codes"
            )
        self.class_counts: np.ndarray | None = None
        if ql.ndim == 1:
            if not (np.issubdtype(ql.dtype, np.integer) and np.issubdtype(dl.dtype, np.integer)):
                raise ValueError("1-D labels must be integer class ids")
            self._set_classes(ql.astype(np.int64), dl.astype(np.int64))
            return
        if ql.shape[1] != dl.shape[1]:
            raise ValueError(f"labels have {ql.shape[1]} and {dl.shape[1]} classes")
        qp, dp = ql > 0, dl > 0
        if (qp.sum(axis=1) == 1).all() and (dp.sum(axis=1) == 1).all():
            self._set_classes(qp.argmax(axis=1), dp.argmax(axis=1))
        else:  # multi-label: shares ≥ 1 label ⇔ the bitmasks intersect (64 classes per word)
            self.mode = "mask"
            self.q, self.d = self._masks(qp), self._masks(dp)

    def _set_classes(self, qc: np.ndarray, dc: np.ndarray) -> None:
        self.mode = "class"
        self.q, self.d = qc, dc
        classes, inverse = np.unique(dc, return_inverse=True)
        counts = np.bincount(inverse, minlength=classes.size)
        pos = np.clip(np.searchsorted(classes, qc), 0, max(classes.size - 1, 0))
        self.class_counts = np.where(classes[pos] == qc, counts[pos], 0).astype(np.int64)

    @staticmethod
    def _masks(p: np.ndarray) -> np.ndarray:
        """(n, K) bool → (W, n) words: one uint8/16/32 word when K ≤ 32, else W = ⌈K/64⌉ uint64.

        The narrowest word keeps the per-pair AND cheap."""
        packed = np.packbits(p, axis=1, bitorder="little")
        nbytes = packed.shape[1]
        word = {1: np.uint8, 2: np.uint16, 3: np.uint32, 4: np.uint32}.get(nbytes, np.uint64)
        size = np.dtype(word).itemsize
        width = -(-nbytes // size) * size
        packed = np.pad(packed, ((0, 0), (0, width - nbytes)))
        return np.ascontiguousarray(packed.view(word).T)

    def block(self, s: int, e: int) -> np.ndarray:
        """(e−s, n_db) bool: is database item j relevant to query s+i."""
        if self.mode == "class":
            return self.q[s:e, None] == self.d[None, :]
        acc = self.q[0, s:e, None] & self.d[0, None, :]
        if self.q.shape[0] > 1:
            tmp = np.empty_like(acc)
            for w in range(1, self.q.shape[0]):
                np.bitwise_and(self.q[w, s:e, None], self.d[w, None, :], out=tmp)
                acc |= tmp
        return acc != 0


class _IndexHits:
    """Hits of a chunk's ranked lists (ties by index), for AP and precision at cut-offs.

    ``odd`` is a (c, m) int32 array: 1 where the item at that rank is relevant, else 0.
    """

    def __init__(self, odd: np.ndarray) -> None:
        self.odd = odd
        self.c, self.m = odd.shape
        self.hit_terms = np.cumsum(odd, axis=1, dtype=np.int32)  # hits so far at each rank
        self.hit_terms *= odd  # ... kept at the ranks of hits only
        self.inv_rank = 1.0 / np.arange(1, self.m + 1, dtype=np.float64)

    def ap(self, n_rel: np.ndarray, k: int) -> np.ndarray:
        k = min(k, self.m)
        # Σ over hits within the first k of (hits so far)/rank; einsum avoids BLAS threads.
        sums = np.einsum("ij,j->i", self.hit_terms[:, :k], self.inv_rank[:k])
        return sums / np.maximum(np.minimum(n_rel, k), 1)

    def precision(self, k: int) -> np.ndarray:
        k = min(k, self.m)
        return self.odd[:, :k].sum(axis=1, dtype=np.int64) / k


@dataclass
class _Chunk:
    start: int
    stop: int
    n_rel: np.ndarray  # (c,) relevant items per query in the whole database
    counts: np.ndarray | None  # (c, L+1) items at each distance
    rel_counts: np.ndarray | None  # (c, L+1) relevant items at each distance
    hits: _IndexHits | None  # the first ``index_k`` ranks of each query, ties by index


class _Problem:
    """Validated inputs of one evaluation, and the chunked pass over all pairs."""

    def __init__(
        self,
        query_codes: Any,
        db_codes: Any,
        query_labels: Any,
        db_labels: Any,
        *,
        group_by_class: bool = False,
    ):
        self.q = _Codes.from_any(query_codes, "query_codes")
        self.d = _Codes.from_any(db_codes, "db_codes")
        if self.q.bits != self.d.bits:
            raise ValueError(
                f"codes must be (n, L) with one L; got {self.q.bits} and {self.d.bits} bits"
            )
        if self.q.n == 0 or self.d.n == 0:
            raise ValueError("query and database sets must be non-empty")
        self.rel = _Relevance(query_labels, db_labels, self.q.n, self.d.n)
        self.bits = self.q.bits
        self.q_order: np.ndarray | None = None
        if group_by_class and self.rel.mode == "class":
            self._group_by_class()

    def _group_by_class(self) -> None:
        """Reorder queries and database items by class (single-label data, histograms only).

        The relevant items of a query then form one contiguous block of columns, so relevance
        costs one slice addition per class instead of a comparison per pair. Database order does
        not matter to histograms; query results are put back in input order by the caller.
        """
        rel = self.rel
        self.q_order = np.argsort(rel.q, kind="stable")
        d_order = np.argsort(rel.d, kind="stable")
        self.q = _Codes(self.bits, np.ascontiguousarray(self.q.packed[self.q_order]))
        self.d = _Codes(self.bits, np.ascontiguousarray(self.d.packed[d_order]))
        rel.q, rel.d = rel.q[self.q_order], rel.d[d_order]
        assert rel.class_counts is not None
        rel.class_counts = rel.class_counts[self.q_order]
        classes = np.unique(rel.d)
        self._class_ranges = {
            int(c): (int(a), int(b))
            for c, a, b in zip(
                classes,
                np.searchsorted(rel.d, classes, side="left"),
                np.searchsorted(rel.d, classes, side="right"),
                strict=True,
            )
        }

    def in_input_order(self, per_query: np.ndarray) -> np.ndarray:
        """Per-query values computed by :meth:`scan`, in the order the queries were given."""
        if self.q_order is None:
            return per_query
        out = np.empty_like(per_query)
        out[self.q_order] = per_query
        return out

    @property
    def nq(self) -> int:
        return self.q.n

    @property
    def nd(self) -> int:
        return self.d.n

    def check_k(self, k: int | None, name: str = "top_k") -> int:
        if k is None:
            return self.nd
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= self.nd:
            raise ValueError(f"{name}={k} must be an integer in [1, {self.nd}] (database size)")
        return int(k)

    def scan(self, *, histogram: bool, index_k: int | None) -> Iterator[_Chunk]:
        """Chunks of queries in order: distance histograms and/or the first ``index_k`` ranks."""
        nd = self.nd
        step = max(1, min(self.nq, CHUNK_PAIRS // nd))
        # Thread-local scratch: every chunk reuses the same distance buffer (no page faults).
        local = threading.local()
        key_dtype = np.int32 if (self.bits + 1) * 2 * nd < 2**31 else np.int64
        idx2 = np.arange(nd, dtype=key_dtype) * 2
        offsets = np.arange(step, dtype=np.int32) * np.int32(2 * (self.bits + 1))

        def run(s: int) -> _Chunk:
            if getattr(local, "dist", None) is None:
                local.dist = np.empty((step, nd), dtype=np.int32)
            e = min(s + step, self.nq)
            return self._chunk(s, e, local.dist[: e - s], histogram, index_k, idx2, offsets)

        starts = range(0, self.nq, step)
        workers = min(WORKERS, len(starts))
        if workers <= 1:
            yield from map(run, starts)
            return
        with ThreadPoolExecutor(workers) as pool:
            # bounded look-ahead keeps memory at a few chunks per worker
            pending: list[Any] = []
            for s in starts:
                pending.append(pool.submit(run, s))
                if len(pending) > 2 * workers:
                    yield pending.pop(0).result()
            for f in pending:
                yield f.result()

    def _chunk(
        self,
        s: int,
        e: int,
        D: np.ndarray,
        histogram: bool,
        index_k: int | None,
        idx2: np.ndarray,
        offsets: np.ndarray,
    ) -> _Chunk:
        nd, bits, c = self.nd, self.bits, e - s
        _distance_block(self.q, s, e, self.d, D)
        if self.q_order is not None and index_k is None:
            return self._grouped_histogram(s, e, D, offsets)
        rel = self.rel.block(s, e)
        hits = None
        if index_k is not None:
            # key = 2·(distance·n + index) + relevance: sorting it ranks by distance with ties
            # by index, and the lowest bit carries relevance along without a gather.
            keys = np.multiply(D, 2 * nd, dtype=idx2.dtype)
            keys += idx2
            keys += rel
            if index_k < nd:
                keys = np.ascontiguousarray(np.partition(keys, index_k - 1, axis=1)[:, :index_k])
            keys.sort(axis=1)
            np.bitwise_and(keys, 1, out=keys)
            hits = _IndexHits(keys)
        counts = rel_counts = None
        if histogram:
            # key = row·2(L+1) + 2·distance + relevance: one histogram gives both counts
            D *= 2
            D += rel
            D += offsets[:c, None]
            h = _histogram(D, c * 2 * (bits + 1)).reshape(c, bits + 1, 2)
            rel_counts = h[:, :, 1].astype(np.int64)
            counts = h[:, :, 0] + rel_counts
            n_rel = rel_counts.sum(axis=1)
        elif self.rel.class_counts is not None:
            n_rel = self.rel.class_counts[s:e]
        else:
            n_rel = rel.sum(axis=1, dtype=np.int64)
        return _Chunk(s, e, n_rel, counts, rel_counts, hits)

    def _grouped_histogram(self, s: int, e: int, D: np.ndarray, offsets: np.ndarray) -> _Chunk:
        # key = row·2(L+1) + distance + (L+1)·relevance, relevance added per class block
        bits, c = self.bits, e - s
        qc = self.rel.q[s:e]
        runs = np.flatnonzero(np.r_[True, qc[1:] != qc[:-1], True])
        for r0, r1 in itertools.pairwise(runs):
            block = self._class_ranges.get(int(qc[r0]))
            if block is not None:
                D[r0:r1, block[0] : block[1]] += bits + 1
        D += offsets[:c, None]
        h = _histogram(D, c * 2 * (bits + 1)).reshape(c, 2, bits + 1)
        rel_counts = h[:, 1, :].astype(np.int64)
        counts = h[:, 0, :] + rel_counts
        return _Chunk(s, e, rel_counts.sum(axis=1), counts, rel_counts, None)


def _harmonic(n: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64))])


def _expected_ap(
    counts: np.ndarray, rel_counts: np.ndarray, n_rel: np.ndarray, k: int, harmonic: np.ndarray
) -> np.ndarray:
    n = counts.astype(np.float64)
    r = rel_counts.astype(np.float64)
    before = np.cumsum(n, axis=1) - n  # items strictly closer
    rel_before = np.cumsum(r, axis=1) - r
    m = np.clip(k - before, 0, n)  # positions of this tie group inside the top k
    # A relevant item at position j of a group of n (r relevant), after c items with R_b relevant,
    # has expected precision (R_b + 1 + (j−1)(r−1)/(n−1)) / (c + j); summing over j with
    # probability r/n per position gives the closed form below (H = harmonic numbers).
    b = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    a = rel_before + 1
    ci = before.astype(np.int64)
    mi = m.astype(np.int64)
    s = m * b + (a - b - b * before) * (harmonic[ci + mi] - harmonic[ci])
    contrib = np.where(r > 0, r / np.maximum(n, 1) * s, 0.0)
    return contrib.sum(axis=1) / np.maximum(np.minimum(n_rel, k), 1)


def _expected_precision(counts: np.ndarray, rel_counts: np.ndarray, k: int) -> np.ndarray:
    n = counts.astype(np.float64)
    before = np.cumsum(n, axis=1) - n
    m = np.clip(k - before, 0, n)
    return (m * rel_counts / np.maximum(n, 1)).sum(axis=1) / k


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be 'index' or 'expected', got {ties!r}")


# ------------------------------------------------------------------------------- public metrics


def average_precisions(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    ties: Ties = "index",
    top_k: int | None = None,
) -> np.ndarray:
    """Per-query AP (see the module docstring) as a float64 array."""
    _check_ties(ties)
    p = _Problem(query_codes, db_codes, query_labels, db_labels, group_by_class=ties == "expected")
    k = p.check_k(top_k)
    out = np.empty(p.nq, dtype=np.float64)
    if ties == "expected":
        harmonic = _harmonic(p.nd)
        for ch in p.scan(histogram=True, index_k=None):
            assert ch.counts is not None and ch.rel_counts is not None
            out[ch.start : ch.stop] = _expected_ap(ch.counts, ch.rel_counts, ch.n_rel, k, harmonic)
    else:
        for ch in p.scan(histogram=False, index_k=k):
            assert ch.hits is not None
            out[ch.start : ch.stop] = ch.hits.ap(ch.n_rel, k)
    return p.in_input_order(out)


def mean_average_precision(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    ties: Ties = "index",
    top_k: int | None = None,
) -> float:
    """MAP of Hamming ranking of ±1 codes (NumPy or torch); relevance = shares ≥ 1 label.

    ``ties="index"`` breaks equal distances by database index, ``ties="expected"`` gives the
    exact expectation over all orderings of tied items; ``top_k`` gives MAP@k.
    """
    return float(
        average_precisions(
            query_codes, db_codes, query_labels, db_labels, ties=ties, top_k=top_k
        ).mean()
    )


def precision_at_k(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    k: int,
    *,
    ties: Ties = "index",
) -> float:
    """Mean share of relevant items among the first ``k`` of the Hamming ranking."""
    _check_ties(ties)
    p = _Problem(query_codes, db_codes, query_labels, db_labels, group_by_class=ties == "expected")
    k = p.check_k(k, "k")
    total = 0.0
    for ch in p.scan(histogram=ties == "expected", index_k=k if ties == "index" else None):
        if ties == "expected":
            assert ch.counts is not None and ch.rel_counts is not None
            total += float(_expected_precision(ch.counts, ch.rel_counts, k).sum())
        else:
            assert ch.hits is not None
            total += float(ch.hits.precision(k).sum())
    return total / p.nq


class _PRAccumulator:
    """Sums over queries of precision and recall within each Hamming radius 0..L."""

    def __init__(self, bits: int) -> None:
        z = np.zeros(bits + 1, dtype=np.float64)
        self.p_sum, self.p_n = z.copy(), z.copy()
        self.r_sum, self.r_n = z.copy(), 0
        self.retrieved, self.rel_retrieved, self.relevant = z.copy(), z.copy(), 0.0

    def add(self, counts: np.ndarray, rel_counts: np.ndarray, n_rel: np.ndarray) -> None:
        got = np.cumsum(counts, axis=1).astype(np.float64)
        good = np.cumsum(rel_counts, axis=1).astype(np.float64)
        defined = got > 0
        self.p_sum += np.where(defined, good / np.maximum(got, 1), 0.0).sum(axis=0)
        self.p_n += defined.sum(axis=0)
        has_rel = n_rel > 0
        self.r_sum += (good[has_rel] / n_rel[has_rel, None]).sum(axis=0)
        self.r_n += int(has_rel.sum())
        self.retrieved += got.sum(axis=0)
        self.rel_retrieved += good.sum(axis=0)
        self.relevant += float(n_rel.sum())

    def result(self, bits: int, nq: int, nd: int) -> dict[str, Any]:
        def opt(num: np.ndarray, den: np.ndarray | float) -> list[float | None]:
            den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
            return [float(a / b) if b > 0 else None for a, b in zip(num, den, strict=True)]

        return {
            "radius": list(range(bits + 1)),
            "precision": opt(self.p_sum, self.p_n),
            "recall": opt(self.r_sum, float(self.r_n)),
            "precision_micro": opt(self.rel_retrieved, self.retrieved),
            "recall_micro": opt(self.rel_retrieved, self.relevant),
            "query_coverage": (self.p_n / nq).tolist(),
            "mean_retrieved": (self.retrieved / nq).tolist(),
            "bits": bits,
            "num_queries": nq,
            "num_database": nd,
        }


def precision_recall_curve(
    query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any
) -> dict[str, Any]:
    """Precision and recall of retrieving every item within Hamming radius ρ = 0..L.

    Returns a JSON-ready dict of lists indexed by radius:
    ``radius`` (0..L); ``precision``: mean over queries that retrieve ≥ 1 item of
    relevant-retrieved / retrieved (None where no query retrieves anything); ``recall``: mean over
    queries with ≥ 1 relevant item of relevant-retrieved / relevant (None when no query has a
    relevant item); ``precision_micro`` / ``recall_micro``: the same ratios of totals over all
    queries; ``query_coverage``: share of queries that retrieve ≥ 1 item; ``mean_retrieved``: mean
    number of items retrieved; plus ``bits``, ``num_queries``, ``num_database``.
    """
    p = _Problem(query_codes, db_codes, query_labels, db_labels, group_by_class=True)
    acc = _PRAccumulator(p.bits)
    for ch in p.scan(histogram=True, index_k=None):
        assert ch.counts is not None and ch.rel_counts is not None
        acc.add(ch.counts, ch.rel_counts, ch.n_rel)
    return acc.result(p.bits, p.nq, p.nd)


def retrieval_report(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    *,
    ks: Sequence[int] = (1, 10, 50, 100),
    index_ties: bool = True,
) -> dict[str, Any]:
    """Every metric of one query set against one database in one pass over the pairs.

    ``map`` (whole ranked list) and, per k in ``ks`` (cut to the database size), ``map_at_k``
    and ``precision_at_k``, each as ``{"index": ..., "expected": ...}``; ``pr_curve`` as
    :func:`precision_recall_curve`; ``queries_without_relevant``. With ``index_ties=False`` the
    sort is skipped and only the tie-aware numbers are computed.
    """
    p = _Problem(query_codes, db_codes, query_labels, db_labels, group_by_class=not index_ties)
    cut = sorted({min(int(k), p.nd) for k in ks if int(k) > 0})
    harmonic = _harmonic(p.nd)
    acc = _PRAccumulator(p.bits)
    sums: dict[tuple[str, str, int], float] = {}

    def add(key: tuple[str, str, int], v: np.ndarray) -> None:
        sums[key] = sums.get(key, 0.0) + float(v.sum())

    no_rel = 0
    for ch in p.scan(histogram=True, index_k=p.nd if index_ties else None):
        assert ch.counts is not None and ch.rel_counts is not None
        acc.add(ch.counts, ch.rel_counts, ch.n_rel)
        no_rel += int((ch.n_rel == 0).sum())
        add(
            ("full", "expected", 0),
            _expected_ap(ch.counts, ch.rel_counts, ch.n_rel, p.nd, harmonic),
        )
        for k in cut:
            add(
                ("map", "expected", k),
                _expected_ap(ch.counts, ch.rel_counts, ch.n_rel, k, harmonic),
            )
            add(("p", "expected", k), _expected_precision(ch.counts, ch.rel_counts, k))
        if ch.hits is not None:
            ih = ch.hits
            add(("full", "index", 0), ih.ap(ch.n_rel, p.nd))
            for k in cut:
                add(("map", "index", k), ih.ap(ch.n_rel, k))
                add(("p", "index", k), ih.precision(k))

    def get(kind: str, k: int) -> dict[str, float | None]:
        return {t: (sums[(kind, t, k)] / p.nq if (kind, t, k) in sums else None) for t in TIES}

    return {
        "map": get("full", 0),
        "map_at_k": {str(k): get("map", k) for k in cut},
        "precision_at_k": {str(k): get("p", k) for k in cut},
        "pr_curve": acc.result(p.bits, p.nq, p.nd),
        "num_queries": p.nq,
        "num_database": p.nd,
        "bits": p.bits,
        "queries_without_relevant": no_rel,
    }


def cross_modal_map(
    image_codes: Any, text_codes: Any, labels: Any, *, ties: Ties = "index"
) -> dict[str, float]:
    """Set-vs-itself cross-modal protocol: I2T, T2I and their mean."""
    i2t = mean_average_precision(image_codes, text_codes, labels, labels, ties=ties)
    t2i = mean_average_precision(text_codes, image_codes, labels, labels, ties=ties)
    return {"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2}


def query_database_map(
    query: tuple[Any, Any, Any],
    database: tuple[Any, Any, Any],
    *,
    ties: Ties = "index",
    top_k: int | None = None,
) -> dict[str, float]:
    """Query-vs-database cross-modal protocol (multi-label benchmarks).

    ``query`` and ``database`` are (image codes, text codes, labels); I2T ranks database texts
    for query images, T2I database images for query texts. ``top_k`` adds MAP@k keys.
    """
    (qi, qt, ql), (di, dt, dl) = query, database
    out: dict[str, float] = {}
    i2t = mean_average_precision(qi, dt, ql, dl, ties=ties)
    t2i = mean_average_precision(qt, di, ql, dl, ties=ties)
    out.update({"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2})
    if top_k:
        k = min(top_k, len(_as_numpy(dl)))
        i2t_k = mean_average_precision(qi, dt, ql, dl, ties=ties, top_k=k)
        t2i_k = mean_average_precision(qt, di, ql, dl, ties=ties, top_k=k)
        out.update({"i2t_at_k": i2t_k, "t2i_at_k": t2i_k, "mean_at_k": (i2t_k + t2i_k) / 2})
    return out


def cross_modal_pr_curves(image_codes: Any, text_codes: Any, labels: Any) -> dict[str, Any]:
    """Set-vs-itself PR curves by Hamming radius: ``{"i2t": ..., "t2i": ...}``."""
    return {
        "i2t": precision_recall_curve(image_codes, text_codes, labels, labels),
        "t2i": precision_recall_curve(text_codes, image_codes, labels, labels),
    }


# ------------------------------------------------------------------------------ noise detection


def noise_detection(weights: Any, is_noisy: Any) -> dict[str, float]:
    """Precision, recall and F1 of "SPL weight = 0" as a detector of corrupted labels."""
    flagged = _as_numpy(weights) <= 0.0
    noisy = _as_numpy(is_noisy).astype(bool)
    if flagged.shape != noisy.shape:
        raise ValueError(f"weights {flagged.shape} and is_noisy {noisy.shape} do not align")
    tp = float(np.sum(flagged & noisy))
    precision = tp / float(flagged.sum()) if flagged.any() else 0.0
    recall = tp / float(noisy.sum()) if noisy.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def roc_auc(scores: Any, positive: Any) -> float:
    """ROC AUC of ``scores`` for the ``positive`` items (Mann–Whitney U / (n₊ n₋), ties count ½).

    Average ranks make ties exact: AUC = P(s₊ > s₋) + ½ P(s₊ = s₋). NaN without both classes.
    """
    s = _as_numpy(scores).astype(np.float64).ravel()
    pos = _as_numpy(positive).astype(bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"scores {s.shape} and labels {pos.shape} do not align")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s, method="average")  # 1-based, tied scores share their mean rank
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def noise_detection_report(
    weights: Any, scores: Any, is_noisy: Any, threshold: float = 0.0
) -> dict[str, float]:
    """Noise detection of one epoch: the flagged set (weight ≤ ``threshold``) and the ranking.

    ``auc``: ROC AUC of ``scores`` (the pair loss ℓ_i, higher = more likely mislabeled) against
    ``is_noisy``; ``weight_auc``: the same for −weight; ``precision``/``recall``/``f1`` of the
    flagged set; the mean weight of clean and of noisy items; the share with weight 0 and flagged.
    """
    w = _as_numpy(weights).astype(np.float64).ravel()
    noisy = _as_numpy(is_noisy).astype(bool).ravel()
    flagged = noise_detection(w - threshold, noisy)

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if a.size else float("nan")

    return {
        "auc": roc_auc(scores, noisy),
        "weight_auc": roc_auc(-w, noisy),
        **flagged,
        "clean_mean_weight": mean(w[~noisy]),
        "noisy_mean_weight": mean(w[noisy]),
        "zero_weight_share": mean((w <= 0).astype(np.float64)),
        "flagged_share": mean((w <= threshold).astype(np.float64)),
    }


def weight_histogram(weights: Any, is_noisy: Any, bins: int = 20) -> dict[str, list[Any]]:
    """Histogram of SPL weights over [0, 1] for clean and for noisy items.

    Returns ``{"edges": bins+1 floats, "clean": bins counts, "noisy": bins counts}``; the last
    bin includes 1.0, weights outside [0, 1] are clipped into the end bins.
    """
    w = np.clip(_as_numpy(weights).astype(np.float64).ravel(), 0.0, 1.0)
    noisy = _as_numpy(is_noisy).astype(bool).ravel()
    if w.shape != noisy.shape:
        raise ValueError(f"weights {w.shape} and is_noisy {noisy.shape} do not align")
    edges = np.linspace(0.0, 1.0, bins + 1)
    clean_counts, _ = np.histogram(w[~noisy], bins=edges)
    noisy_counts, _ = np.histogram(w[noisy], bins=edges)
    return {
        "edges": edges.tolist(),
        "clean": clean_counts.astype(int).tolist(),
        "noisy": noisy_counts.astype(int).tolist(),
    }
