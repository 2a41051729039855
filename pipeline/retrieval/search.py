"""A trained encoder against a feature-store dataset: encode splits or a query file, search top-k
by Hamming distance, mark relevant results and report the retrieval metrics (no Ray, no MLflow).

The encoder is anything with ``bits``, ``config``, ``dim(modality)`` and ``encode(x, modality)``
(a registered model from :mod:`pipeline.tracking.pull`). Which splits are the queries and which the
database by default comes from :func:`pipeline.retrieval.protocol.eval_splits`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion
from pipeline.retrieval.index import HammingIndex, IndexSpec, default_nprobe
from pipeline.retrieval.protocol import eval_splits

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")


class PullError(ValueError):
    """Bad input to a search or an evaluation with a registered model; the message says what
    and how to fix it."""


class CodeModel(Protocol):
    """What the search needs of a model: its code length, config, input widths and encoder."""

    config: dict[str, Any]

    @property
    def bits(self) -> int: ...

    def dim(self, modality: str) -> int: ...

    def encode(self, features: np.ndarray, modality: str) -> np.ndarray: ...


@dataclass
class Side:
    """One side of the search (database or queries): ids, codes and labels when known."""

    source: str
    modality: str
    ids: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None
    seconds: float


@dataclass
class SearchResult:
    """Top-k results: (nq, k) distances and database positions (−1 pads), the index used (its
    kind after ``"auto"`` and its parameters) and the timings."""

    distances: np.ndarray
    ids: np.ndarray
    ntotal: int
    build_seconds: float
    search_seconds: float
    index: dict[str, Any]
    cached: bool = False  # the index was read from the index cache, not built

    @property
    def short_queries(self) -> int:
        """Queries that got fewer than k results (a radius search finds only what it probes)."""
        return int((self.ids < 0).any(axis=1).sum())


def default_splits(ds: DatasetVersion) -> tuple[str, str]:
    """(query split, database split) of the test protocol (the same split twice: set vs itself)."""
    query, database = eval_splits(ds, "test")
    return query, database or query


def encode_split(
    model: CodeModel,
    ds: DatasetVersion,
    split: str,
    modality: str,
    *,
    label_column: str,
    limit: int | None = None,
) -> Side:
    """Encode ``modality`` features of a feature-store split (the first ``limit`` rows)."""
    have = int(ds.dims[modality])
    if have != model.dim(modality):
        raise PullError(
            f"dataset {ds.data_version} has {modality} features of dimension {have}, but the "
            f"model's {modality} head expects {model.dim(modality)}; use the dataset the model "
            f"was trained on ({model.config.get('data_version') or 'see the model config'})"
        )
    cols = [S.ITEM_ID, modality, label_column]
    a = ds.read_arrays(split, cols)
    if limit is not None:
        a = {k: v[:limit] for k, v in a.items()}
    t0 = time.perf_counter()
    x = a[modality].astype(np.float32, copy=False)
    codes = model.encode(x, modality) if len(x) else np.zeros((0, model.bits), dtype=np.int8)
    return Side(
        source=f"{ds.uri}:{split}",
        modality=modality,
        ids=a[S.ITEM_ID].astype(np.int64),
        codes=codes,
        labels=a[label_column],
        seconds=time.perf_counter() - t0,
    )


def load_query_file(path: str, dim: int, modality: str, limit: int | None) -> np.ndarray:
    """Query features from a .npy file: a non-empty (n, ``dim``) array of finite real numbers."""
    p = Path(path)
    if not p.is_file():
        raise PullError(f"--queries {path}: no such file")
    if p.stat().st_size == 0:
        raise PullError(f"--queries {path}: the file is empty (0 bytes), not a NumPy .npy array")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PullError(f"--queries {path}: not a NumPy .npy array ({e})") from e
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise PullError(f"--queries {path}: an .npz archive, expected one .npy array")
    if x.ndim != 2 or x.shape[1] != dim:
        raise PullError(
            f"--queries {path}: features of shape {x.shape}, but the model's {modality} head "
            f"expects (n, {dim})"
        )
    if x.dtype.kind not in "iuf":
        raise PullError(
            f"--queries {path}: dtype {x.dtype} is not real numbers (integer or float features)"
        )
    if x.shape[0] == 0:
        raise PullError(f"--queries {path}: holds no queries (shape {x.shape})")
    if limit is not None:
        x = x[:limit]
    with np.errstate(over="ignore"):  # reported below with its row and column
        x32 = x.astype(np.float32)
    for a, why in ((x, "query features must be finite"), (x32, "beyond the float32 range")):
        bad = ~np.isfinite(a)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise PullError(
                f"--queries {path}: row {row} column {col} is {x[row, col].item()!r}; {why}"
            )
    return x32


def encode_features(model: CodeModel, x: np.ndarray, source: str, modality: str) -> Side:
    """Encode checked query features (see :func:`load_query_file`)."""
    t0 = time.perf_counter()
    codes = model.encode(x, modality) if len(x) else x[:, :0]
    return Side(
        source=str(source),
        modality=modality,
        ids=np.arange(len(x), dtype=np.int64),
        codes=codes,
        labels=None,
        seconds=time.perf_counter() - t0,
    )


def cached_build(
    spec: IndexSpec, codes: np.ndarray, cache_dir: str | None
) -> tuple[HammingIndex, bool]:
    """``spec``'s index over the ±1 ``codes``, and whether it came from ``cache_dir``.

    Only IVF indexes are cached (their k-means training is what makes a build slow). The file name
    is a hash of the codes, their count and the parameters that shape the built index (nlist,
    train_size, seed; not nprobe, set after reading), so other codes or parameters never match.
    An unreadable file is rebuilt and replaced; files are written under a temporary name first.
    """
    kind = spec.resolved_kind(len(codes))
    if not cache_dir or kind != "ivf":
        return spec.build(codes), False
    bits = int(codes.shape[1])
    shape = {"format": 1, "bits": bits, "n": len(codes), "nlist": spec.nlist}
    shape.update(train_size=spec.train_size, seed=spec.seed)
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    h.update(np.packbits(np.asarray(codes) > 0, axis=1).tobytes())
    path = Path(cache_dir) / f"ivf-{h.hexdigest()[:32]}.faissbin"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        try:
            m = json.loads(meta.read_text())
            index = HammingIndex.load(
                str(path), kind="ivf", bits=bits, seed=m["seed"], train_used=m["train_size"]
            )
            if index.ntotal != len(codes):
                raise ValueError(f"{index.ntotal} codes, expected {len(codes)}")
            index.set_nprobe(spec.nprobe or default_nprobe(m["nlist"]))
            return index, True
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("index cache %s is unreadable (%s); building the index again", path, e)
    index = spec.build(codes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        index.save(str(tmp))
        os.replace(tmp, path)
        tmp = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**shape, **index.params}, sort_keys=True))
        os.replace(tmp, meta)
    except (OSError, RuntimeError) as e:
        log.warning("index cache %s: could not keep the index (%s)", cache_dir, e)
    return index, False


def search(
    queries: Side,
    db: Side,
    k: int,
    *,
    spec: IndexSpec | None = None,
    index_cache: str | None = None,
) -> SearchResult:
    """Top-``k`` database items of every query through the :class:`HammingIndex` of ``spec``
    (default: :class:`IndexSpec`, the exact scan below its ``exact_below`` codes, IVF above);
    an IVF index is kept in and read from ``index_cache`` when given (:func:`cached_build`)."""
    from pipeline.retrieval import metrics as E

    if len(queries.ids) == 0:
        raise PullError(f"the query set is empty ({queries.source}, --max-queries)")
    if len(db.ids) == 0:
        raise PullError(f"the database is empty ({db.source})")
    if k > len(db.ids):
        raise PullError(f"--k {k} is larger than the database ({len(db.ids)} items)")
    log.info("encoded %d %s queries in %.2fs", len(queries.ids), queries.modality, queries.seconds)

    E._faiss()  # load faiss outside the build timing
    t0 = time.perf_counter()
    index, cached = cached_build(spec or IndexSpec(), db.codes, index_cache)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    distances, ids = index.search(queries.codes, k)
    search_s = time.perf_counter() - t0
    log.info(
        "%s index over %d codes: %s in %.3fs; top-%d of %d queries in %.3fs",
        index.kind,
        index.ntotal,
        "read from the index cache" if cached else "built",
        build_s,
        k,
        len(queries.ids),
        search_s,
    )
    found = SearchResult(distances, ids, index.ntotal, build_s, search_s, index.params, cached)
    if found.short_queries:
        log.warning(
            "%s index %s: %d of %d queries got fewer than %d results (padded with -1); "
            "probe more (--nflip, --hash-bits, --mih-tables) or use --index flat",
            index.kind,
            {k: v for k, v in index.params.items() if k != "kind"},
            found.short_queries,
            len(queries.ids),
            k,
        )
    return found


def relevant_results(queries: Side, db: Side, ids: np.ndarray) -> np.ndarray | None:
    """(nq, k) bool: does result ``ids[i, j]`` share a label with query i (False for −1 pads)."""
    if queries.labels is None or db.labels is None:
        return None
    q = queries.labels[: len(ids)] > 0
    out = np.zeros(ids.shape, dtype=bool)
    for s in range(0, len(ids), 1024):
        got = db.labels[np.maximum(ids[s : s + 1024], 0)] > 0  # (b, k, K)
        out[s : s + 1024] = (got & q[s : s + 1024, None, :]).any(axis=2)
    return out & (ids >= 0)


def shown_results(queries: Side, db: Side, found: SearchResult, show: int) -> list[dict[str, Any]]:
    """The results of the first ``show`` queries: item ids, distances and relevance marks."""
    ids, distances = found.ids, found.distances
    rel = relevant_results(queries, db, ids[:show])
    shown = []
    for i in range(min(show, len(queries.ids))):
        hit = ids[i] >= 0
        shown.append(
            {
                "query_id": int(queries.ids[i]),
                "ids": db.ids[ids[i][hit]].tolist(),
                "distances": distances[i][hit].tolist(),
                "relevant": rel[i][hit].tolist() if rel is not None else None,
            }
        )
    return shown


def save_results(path: str, queries: Side, db: Side, found: SearchResult) -> None:
    """All results as .npz: query ids, database item ids (−1 pads) and distances."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    hit = found.ids >= 0
    np.savez_compressed(
        path,
        query_ids=queries.ids,
        ids=np.where(hit, db.ids[np.maximum(found.ids, 0)], -1),
        distances=found.distances,
    )


def search_metrics(queries: Side, db: Side, found: SearchResult, k: int) -> dict[str, Any] | None:
    """MAP, MAP@k, P@k and the PR curve of the codes, and P@k of the index's results (None
    when the queries or the database have no labels)."""
    from pipeline.retrieval import metrics as E

    if queries.labels is None or db.labels is None:
        log.info("queries have no labels: no MAP")
        return None
    t0 = time.perf_counter()
    report = E.retrieval_report(
        queries.codes, db.codes, queries.labels, db.labels, ks=sorted({k, 1, 10, 100})
    )
    rel_top = relevant_results(queries, db, found.ids)
    assert rel_top is not None
    return {
        **report,
        "search_precision_at_k": float(rel_top.mean()),
        "seconds": time.perf_counter() - t0,
    }


def check_dims(model: CodeModel, ds: DatasetVersion) -> None:
    """Both modalities' feature widths of ``ds`` match the model's heads."""
    for m in MODALITIES:
        if int(ds.dims[m]) != model.dim(m):
            raise PullError(
                f"dataset {ds.data_version} has {m} features of dimension {ds.dims[m]}, but the "
                f"model's {m} head expects {model.dim(m)}"
            )


def cross_modal_report(
    model: CodeModel,
    ds: DatasetVersion,
    *,
    split: str | None = None,
    label_column: str = S.LABEL,
    ks: Sequence[int] = (1, 10, 50, 100),
) -> tuple[str, str, dict[str, Any]]:
    """(query split, database split, ``{"i2t": ..., "t2i": ...}`` retrieval reports).

    ``split`` is evaluated against itself; without it the test protocol's splits are used.
    """
    from pipeline.retrieval import metrics as E

    check_dims(model, ds)
    query_split, db_split = (split, split) if split else default_splits(ds)

    def codes(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = ds.read_arrays(name, [S.IMAGE, S.TEXT, label_column])
        if len(a[S.IMAGE]) == 0:
            raise PullError(f"split '{name}' of {ds.uri} is empty")
        img = model.encode(a[S.IMAGE].astype(np.float32), "image")
        return img, model.encode(a[S.TEXT].astype(np.float32), "text"), a[label_column]

    q_img, q_txt, q_lab = codes(query_split)
    d_img, d_txt, d_lab = (q_img, q_txt, q_lab) if db_split == query_split else codes(db_split)
    cut = sorted({min(k, len(d_lab)) for k in ks})
    report = {
        "i2t": E.retrieval_report(q_img, d_txt, q_lab, d_lab, ks=cut),
        "t2i": E.retrieval_report(q_txt, d_img, q_lab, d_lab, ks=cut),
    }
    return query_split, db_split, report
