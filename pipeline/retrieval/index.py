"""k-nearest-neighbour search over binary hash codes by Hamming distance (no Ray, no MLflow).

``HammingIndex(db_codes).search(query_codes, k)`` returns ``(distances, ids)``, both (nq, k), rows
sorted by distance with ties broken by database index (the ``ties="index"`` convention of
:mod:`pipeline.retrieval.metrics`). Codes are ±1 arrays (NumPy or torch) or, with
``packed=True``, bytes from :func:`pipeline.retrieval.metrics.pack_codes`.

Kinds: ``"flat"`` is exact (faiss ``IndexBinaryFlat``; a chunked NumPy search when faiss is not
installed); ``"hash"`` (faiss ``IndexBinaryHash``) and ``"mih"`` (multi-index hashing, faiss
``IndexBinaryMultiHash``) look only into buckets near the query's code, which is much faster on
large databases but approximate: a query may get fewer than k results (id −1, distance −1 pad).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from pipeline.retrieval.metrics import (
    CHUNK_PAIRS,
    _faiss,
    code_bits,
    hamming_distances,
    unpack_codes,
)

IndexKind = Literal["flat", "hash", "mih"]
KINDS: tuple[str, ...] = ("flat", "hash", "mih")


class HammingIndex:
    """Binary codes searchable by Hamming distance.

    ``kind="hash"`` indexes the first ``hash_bits`` bits (default min(L, 24)) and probes buckets
    up to ``nflip`` bit flips away (default 2); ``kind="mih"`` splits codes into ``tables``
    substrings (default L // 16, at least 2) of ⌊L/tables⌋ bits each and probes up to ``nflip``
    flips per table (default 1).
    """

    def __init__(
        self,
        db_codes: Any = None,
        *,
        kind: IndexKind = "flat",
        packed: bool = False,
        bits: int | None = None,
        hash_bits: int | None = None,
        tables: int | None = None,
        nflip: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if packed and not bits:
            raise ValueError("packed codes need bits=L")
        self.kind = kind
        self.packed_input = packed
        self._bits = bits
        self._hash_bits, self._tables, self._nflip = hash_bits, tables, nflip
        self._index: Any = None
        self._codes = np.zeros((0, 0), dtype=np.uint8)  # packed, for the NumPy search
        if db_codes is not None:
            self.add(db_codes)

    # --------------------------------------------------------------------------- properties

    @property
    def bits(self) -> int | None:
        """Code length L (None until the first codes are added)."""
        return self._bits

    @property
    def ntotal(self) -> int:
        """Number of database codes."""
        if self._index is not None:
            return int(self._index.ntotal)
        return int(self._codes.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    # ------------------------------------------------------------------------------- codes

    def _pack(self, codes: Any, name: str) -> np.ndarray:
        if self.packed_input:
            p = np.asarray(codes)
            assert self._bits is not None
            width = (self._bits + 7) // 8
            if p.ndim != 2 or p.dtype != np.uint8 or p.shape[1] != width:
                raise ValueError(
                    f"packed {name} must be a (n, {width}) uint8 array for {self._bits}-bit "
                    f"codes, got {p.dtype} {p.shape}"
                )
            return np.ascontiguousarray(p)
        b = code_bits(codes, name)
        if self._bits is None:
            if b.shape[1] == 0:
                raise ValueError(f"{name} have no bits")
            self._bits = int(b.shape[1])
        elif b.shape[1] != self._bits:
            raise ValueError(
                f"{name} have {b.shape[1]} bits, the index holds {self._bits}-bit codes"
            )
        return np.ascontiguousarray(np.packbits(b, axis=1))

    def _build(self) -> Any:
        f = _faiss()
        L = self._bits
        assert L is not None
        if self.kind != "flat" and f is None:
            raise RuntimeError(f"index kind {self.kind!r} needs faiss (pip install faiss-cpu)")
        if f is None:
            return None
        if self.kind == "flat":
            # packed codes are zero-padded to whole bytes, which adds nothing to any distance
            return f.IndexBinaryFlat(8 * ((L + 7) // 8))
        if self.kind == "hash":
            b = self._hash_bits or min(L, 24)
            if not 0 < b <= min(L, 64):
                raise ValueError(f"hash_bits must be in [1, {min(L, 64)}], got {b}")
            index = f.IndexBinaryHash(8 * ((L + 7) // 8), b)
            index.nflip = 2 if self._nflip is None else self._nflip
            return index
        tables = self._tables or max(2, L // 16)
        if not 1 <= tables <= L or L // tables > 64:
            raise ValueError(f"tables={tables} does not split {L} bits into 1..64-bit substrings")
        index = f.IndexBinaryMultiHash(8 * ((L + 7) // 8), tables, L // tables)
        index.nflip = 1 if self._nflip is None else self._nflip
        return index

    def add(self, codes: Any) -> None:
        """Append database codes; their ids continue from the current size."""
        p = self._pack(codes, "db_codes")
        if p.shape[0] == 0:
            return
        if self._index is None and self.ntotal == 0:
            self._index = self._build()
        if self._index is not None:
            self._index.add(p)
        else:
            self._codes = p if self._codes.size == 0 else np.concatenate([self._codes, p])

    # ------------------------------------------------------------------------------ search

    def search(self, query_codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest database codes of each query: ``(distances int32, ids int64)`` (nq, k)."""
        n = self.ntotal
        if n == 0:
            raise ValueError("the index is empty; add database codes first")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > n:
            raise ValueError(f"k={k} is larger than the database ({n} codes)")
        q = self._pack(query_codes, "query_codes")
        if q.shape[0] == 0:
            raise ValueError("the query set is empty")
        if self._index is not None:
            distances, ids = self._index.search(q, int(k))
            distances = distances.astype(np.int32, copy=False)
            ids = ids.astype(np.int64, copy=False)
            if self.kind != "flat":
                distances[ids < 0] = -1
            return distances, ids
        return self._numpy_search(q, int(k))

    def _numpy_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        L = self._bits
        assert L is not None
        db = unpack_codes(self._codes, L)
        n = db.shape[0]
        out_d = np.empty((q.shape[0], k), dtype=np.int32)
        out_i = np.empty((q.shape[0], k), dtype=np.int64)
        step = max(1, CHUNK_PAIRS // n)
        for s in range(0, q.shape[0], step):
            e = min(s + step, q.shape[0])
            dist = hamming_distances(unpack_codes(q[s:e], L), db).astype(np.int64)
            keys = dist * n + np.arange(n)  # unique: distance, then index
            if k < n:
                keys = np.partition(keys, k - 1, axis=1)[:, :k]
            keys.sort(axis=1)
            out_d[s:e] = keys // n
            out_i[s:e] = keys % n
        return out_d, out_i
