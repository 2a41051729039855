"""k-nearest-neighbour search over binary hash codes by Hamming distance (no Ray, no MLflow).

``HammingIndex(db_codes).search(query_codes, k)`` returns ``(distances, ids)``, both (nq, k), rows
sorted by distance with ties broken by database index (the ``ties="index"`` convention of
:mod:`pipeline.retrieval.metrics`). Codes are ±1 arrays (NumPy or torch) or, with
``packed=True``, bytes from :func:`pipeline.retrieval.metrics.pack_codes`.

Kinds: ``"flat"`` is exact (faiss ``IndexBinaryFlat``; a chunked NumPy search when faiss is not
installed); ``"hash"`` (faiss ``IndexBinaryHash``) and ``"mih"`` (multi-index hashing, faiss
``IndexBinaryMultiHash``) look only into buckets near the query's code, and ``"ivf"`` (faiss
``IndexBinaryIVF``: k-means cells trained on a seeded sample, ``nprobe`` cells searched per query)
only into the cells nearest to it; all three are much faster on large databases but approximate:
a query may get fewer than k results (id −1, distance −1 pad). ``"ivf"`` rows are sorted by
distance, then database index; with ``nprobe = nlist`` it scans everything and returns the exact
distances (ids equal to the flat scan's up to ties at the k-th distance).

``"auto"`` is the flat scan for databases below ``exact_below`` codes (:data:`EXACT_BELOW`) and
``"ivf"`` above; :class:`IndexSpec` holds a kind with its parameters (what a registered model
records, see :mod:`pipeline.tracking.serving`), :func:`choose_kind` the automatic choice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.retrieval.metrics import (
    CHUNK_PAIRS,
    _faiss,
    code_bits,
    hamming_distances,
    unpack_codes,
)

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hash", "mih", "ivf", "auto"]
KINDS: tuple[str, ...] = ("flat", "hash", "mih", "ivf", "auto")

# Below this many database codes "auto" keeps the exact scan (docs/results/scale/search-10m.md).
EXACT_BELOW = 1_000_000
IVF_TRAIN_PER_LIST = 40  # training sample: this many codes per list (at most the database)
IVF_NITER = 10  # k-means iterations of the IVF training


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` codes: the power of two nearest √n, at least 1 and at most n."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return max(1, min(n, 1 << max(0, round(np.log2(np.sqrt(n))))))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: nlist / 64, at least 8 (all of them when nlist ≤ 8)."""
    return min(nlist, max(8, nlist // 64))


def choose_kind(n: int, exact_below: int = EXACT_BELOW) -> str:
    """``"flat"`` (exact) for fewer than ``exact_below`` database codes, else ``"ivf"``."""
    return "flat" if n < exact_below else "ivf"


def _opt_int(d: dict[str, Any], key: str, low: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
        raise ValueError(f"index '{key}' must be an integer ≥ {low}, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class IndexSpec:
    """An index kind and its parameters (None: the kind's default for the database size)."""

    kind: str = "auto"
    exact_below: int = EXACT_BELOW
    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    seed: int = 0
    hash_bits: int | None = None
    tables: int | None = None
    nflip: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IndexSpec:
        """A checked spec from a mapping (unknown keys and bad values raise ValueError)."""
        d = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown index key(s) {unknown}; known: {sorted(known)}")
        kind = d.get("kind", "auto")
        if kind not in KINDS:
            raise ValueError(f"index 'kind' must be one of {KINDS}, got {kind!r}")
        exact_below = _opt_int(d, "exact_below", 0)
        seed = _opt_int(d, "seed", 0)
        return cls(
            kind=str(kind),
            exact_below=EXACT_BELOW if exact_below is None else exact_below,
            nlist=_opt_int(d, "nlist", 1),
            nprobe=_opt_int(d, "nprobe", 1),
            train_size=_opt_int(d, "train_size", 1),
            seed=0 if seed is None else seed,
            hash_bits=_opt_int(d, "hash_bits", 1),
            tables=_opt_int(d, "tables", 1),
            nflip=_opt_int(d, "nflip", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready mapping (every field, None for defaults)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> IndexSpec:
        """A copy with the non-None ``changes`` applied, checked."""
        return IndexSpec.from_dict(
            {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        )

    def resolved_kind(self, n: int) -> str:
        """The concrete kind for a database of ``n`` codes (``"auto"`` resolved)."""
        return choose_kind(n, self.exact_below) if self.kind == "auto" else self.kind

    def build(self, db_codes: Any = None, **kw: Any) -> HammingIndex:
        """A :class:`HammingIndex` of this spec (``"auto"`` resolved on the first codes)."""
        return HammingIndex(
            db_codes,
            kind=self.kind,  # type: ignore[arg-type]
            exact_below=self.exact_below,
            nlist=self.nlist,
            nprobe=self.nprobe,
            train_size=self.train_size,
            seed=self.seed,
            hash_bits=self.hash_bits,
            tables=self.tables,
            nflip=self.nflip,
            **kw,
        )


class HammingIndex:
    """Binary codes searchable by Hamming distance.

    ``kind="hash"`` indexes the first ``hash_bits`` bits (default min(L, 24)) and probes buckets
    up to ``nflip`` bit flips away (default 2); ``kind="mih"`` splits codes into ``tables``
    substrings (default L // 16, at least 2) of ⌊L/tables⌋ bits each and probes up to ``nflip``
    flips per table (default 1). ``kind="ivf"`` trains ``nlist`` k-means cells (default
    :func:`default_nlist`, at most the first batch's size) on a sample of ``train_size`` codes
    (default 40 per list) of the first batch added, drawn with ``seed``, and searches ``nprobe``
    cells per query (default :func:`default_nprobe`). ``kind="auto"`` becomes ``"flat"`` or
    ``"ivf"`` by the size of the first batch added (:func:`choose_kind` with ``exact_below``).
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
        nlist: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        exact_below: int = EXACT_BELOW,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        if packed and not bits:
            raise ValueError("packed codes need bits=L")
        for name, v in (("nlist", nlist), ("nprobe", nprobe), ("train_size", train_size)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        self.kind: str = kind
        self.packed_input = packed
        self._bits = bits
        self._hash_bits, self._tables, self._nflip = hash_bits, tables, nflip
        self._nlist, self._nprobe, self._train_size = nlist, nprobe, train_size
        self._seed, self._exact_below = int(seed), int(exact_below)
        self._index: Any = None
        self._quantizer: Any = None
        self._train_used = 0
        self.train_seconds = 0.0  # IVF k-means training time of the build
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

    @property
    def params(self) -> dict[str, Any]:
        """The kind and the parameters in use (after the first codes were added)."""
        out: dict[str, Any] = {"kind": self.kind}
        ix = self._index
        if ix is None:
            return out
        if self.kind == "ivf":
            out.update(nlist=int(ix.nlist), nprobe=int(ix.nprobe))
            out.update(train_size=self._train_used, seed=self._seed)
        elif self.kind == "hash":
            out.update(hash_bits=int(ix.b), nflip=int(ix.nflip))
        elif self.kind == "mih":
            out.update(tables=int(ix.nhash), nflip=int(ix.nflip))
        return out

    def save(self, path: str) -> None:
        """Write a built faiss index to ``path`` (faiss's own binary format, not a pickle)."""
        if self._index is None:
            raise ValueError(f"a {self.kind!r} index without faiss has nothing to save")
        _faiss().write_index_binary(self._index, str(path))

    @classmethod
    def load(
        cls, path: str, *, kind: str, bits: int, seed: int = 0, train_used: int = 0
    ) -> HammingIndex:
        """An index read back from :meth:`save`'s file, with the parameters it was built with."""
        f = _faiss()
        if f is None:
            raise RuntimeError("reading a saved index needs faiss (pip install faiss-cpu)")
        out = cls(kind=kind, bits=bits, seed=seed)  # type: ignore[arg-type]
        index = f.read_index_binary(str(path))
        if int(index.d) != 8 * ((bits + 7) // 8):
            raise ValueError(f"{path}: index of {index.d}-bit codes, expected {bits} bits")
        if kind == "ivf" and not isinstance(index, f.IndexBinaryIVF):
            raise ValueError(f"{path}: not an IVF index")
        out._index, out._train_used = index, int(train_used)
        return out

    def set_nprobe(self, nprobe: int) -> None:
        """Cells an IVF index searches per query from now on (at most nlist)."""
        if self.kind != "ivf" or self._index is None:
            raise ValueError(f"nprobe applies to a built 'ivf' index, not {self.kind!r}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be ≥ 1, got {nprobe}")
        self._index.nprobe = min(int(nprobe), int(self._index.nlist))

    def _build(self, first: np.ndarray) -> Any:
        f = _faiss()
        L = self._bits
        assert L is not None
        if self.kind == "auto":
            self.kind = choose_kind(first.shape[0], self._exact_below)
            log.info("index kind auto: %s for %d codes", self.kind, first.shape[0])
        if self.kind == "ivf":
            return self._build_ivf(f, first)
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

    def _build_ivf(self, f: Any, first: np.ndarray) -> Any:
        if f is None:
            raise RuntimeError("index kind 'ivf' needs faiss (pip install faiss-cpu)")
        n = first.shape[0]
        nlist = min(self._nlist or default_nlist(n), n)
        nprobe = min(self._nprobe or default_nprobe(nlist), nlist)
        m = min(n, max(nlist, self._train_size or IVF_TRAIN_PER_LIST * nlist))
        rng = np.random.default_rng(self._seed)
        sample = first if m == n else first[np.sort(rng.choice(n, m, replace=False))]
        d = 8 * first.shape[1]
        quantizer = f.IndexBinaryFlat(d)
        index = f.IndexBinaryIVF(quantizer, d, nlist)
        index.cp.seed = self._seed
        index.cp.niter = IVF_NITER
        index.cp.max_points_per_centroid = max(1, -(-m // nlist))  # no faiss resampling
        t0 = time.perf_counter()
        index.train(np.ascontiguousarray(sample))
        self.train_seconds = time.perf_counter() - t0
        index.nprobe = nprobe
        self._quantizer = quantizer  # the IVF index keeps a pointer, not a reference
        self._train_used = int(m)
        return index

    def add(self, codes: Any) -> None:
        """Append database codes; their ids continue from the current size."""
        p = self._pack(codes, "db_codes")
        if p.shape[0] == 0:
            return
        if self._index is None and self.ntotal == 0:
            self._index = self._build(p)
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
            if self.kind == "ivf":
                distances, ids = _sort_by_distance_then_id(distances, ids, n)
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


def _sort_by_distance_then_id(
    distances: np.ndarray, ids: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows reordered by (distance, id) with −1 pads last."""
    pad = ids < 0
    keys = np.where(pad, np.iinfo(np.int64).max, distances.astype(np.int64) * (n + 1) + ids)
    order = np.argsort(keys, axis=1, kind="stable")
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)
