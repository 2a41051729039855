"""Pull a registered RSHNL model, encode a database from the feature store and answer top-k queries.

Needs torch, mlflow, numpy and faiss-cpu only (no Ray). The model reference is NAME@ALIAS (e.g.
rshnl-demo@champion), NAME/VERSION, or any MLflow model URI (models:/..., runs:/.../model). By
default the database is the test split's text features of the dataset the model was trained on
and the queries are that split's images (cross-modal retrieval); results go to stdout, MAP and
precision are computed when the queries have labels, progress goes to the log (stderr).

Exit code 0 is success, 2 is bad input (named in one line on stderr), 1 is a failure.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared, busy machine spinning threads slow
# faiss searches down many times over. Set before faiss or torch load their OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs._cli import EXIT_BAD_INPUT, EXIT_OK, run_main, setup_logging, write_json_atomic

log = logging.getLogger("jobs.pull")

MODALITIES = ("image", "text")


class PullError(ValueError):
    """Bad input to the pull job; the message says what and how to fix it."""


@dataclass
class PulledModel:
    """A hash-code model loaded from the registry, with what it carries."""

    uri: str
    pyfunc: Any
    arch: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    run_tags: dict[str, str] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.arch["bits"])

    @property
    def dataset(self) -> str:
        """The dataset the model was trained on: its config, else its training run's tag."""
        return str(self.config.get("dataset") or self.run_tags.get("dataset_uri") or "")

    def dim(self, modality: str) -> int:
        return int(self.arch["image_dim" if modality == "image" else "text_dim"])

    def encode(self, features: np.ndarray, modality: str) -> np.ndarray:
        """±1 int8 codes through the model's pyfunc predict."""
        return np.asarray(self.pyfunc.predict(None, features, params={"modality": modality}))


def model_uri(ref: str) -> tuple[str, str | None, str | None, str | None]:
    """NAME@ALIAS | NAME/VERSION | MLflow URI → (uri, name, version, alias)."""
    ref = ref.strip()
    if not ref:
        raise PullError("--model is empty; use NAME@ALIAS, NAME/VERSION or an MLflow model URI")
    if "://" in ref or ref.startswith(("models:/", "runs:/")):
        rest = ref[len("models:/") :] if ref.startswith("models:/") else None
        if rest is None:
            return ref, None, None, None
        ref = rest
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return f"models:/{name}@{alias}", name, None, alias
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return f"models:/{name}/{version}", name, version, None
    raise PullError(
        f"--model '{ref}' is not NAME@ALIAS (e.g. rshnl-demo@champion), NAME/VERSION "
        "(e.g. rshnl-demo/3) or an MLflow model URI"
    )


def load_registered_model(ref: str, tracking_uri: str) -> PulledModel:
    """Resolve ``ref`` in the registry at ``tracking_uri`` and load its model (no Ray, no pickle:
    the model directory is downloaded and read by
    :func:`~pipeline.tracking.serving.load_model_dir`)."""
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.serving import load_model_dir

    uri, name, version, alias = model_uri(ref)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = None
    try:
        if name and alias:
            mv = client.get_model_version_by_alias(name, alias)
            version, run_id = str(mv.version), mv.run_id
        elif name and version:
            run_id = client.get_model_version(name, version).run_id
    except MlflowException as e:
        raise PullError(
            f"model '{ref}' not found in the registry at {tracking_uri}: {_first_line(e)}"
        ) from e
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        inner, mlmodel = load_model_dir(local)  # no pickle from the artifact store
    except (MlflowException, OSError, ValueError) as e:
        raise PullError(f"model '{ref}' could not be loaded from {uri}: {_first_line(e)}") from e
    run_id = run_id or mlmodel.get("run_id")
    run_tags: dict[str, str] = {}
    if run_id:
        try:
            run_tags = dict(client.get_run(run_id).data.tags)
        except MlflowException as e:
            log.debug("run %s of the model is not readable: %s", run_id, e)
    arch = getattr(inner, "arch", None)
    if not isinstance(arch, dict) or "bits" not in arch:
        raise PullError(f"model '{ref}' is not an RSHNL hash-code model (no architecture)")
    return PulledModel(
        uri=uri,
        pyfunc=inner,
        arch=dict(arch),
        config=dict(getattr(inner, "config", {}) or {}),
        manifest=dict(getattr(inner, "manifest", {}) or {}),
        metrics=dict(getattr(inner, "metrics", {}) or {}),
        name=name,
        version=version,
        alias=alias,
        run_id=run_id,
        run_tags=run_tags,
    )


def _first_line(e: BaseException) -> str:
    msg = str(getattr(e, "message", None) or e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


@dataclass
class Side:
    """One side of the search (database or queries): ids, codes and labels when known."""

    source: str
    modality: str
    ids: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None
    seconds: float


def encode_split(
    model: PulledModel,
    ds: Any,
    split: str,
    modality: str,
    *,
    label_column: str,
    limit: int | None = None,
) -> Side:
    """Encode ``modality`` features of a feature-store split (the first ``limit`` rows)."""
    from feature_store import schema as S

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


def encode_features(model: PulledModel, x: np.ndarray, source: str, modality: str) -> Side:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.pull",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION or an MLflow model URI")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (else $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument(
        "--dataset", default="", help="feature-store version URI (default: the model's dataset)"
    )
    p.add_argument(
        "--db-split",
        default=None,
        help="split encoded as the database (default: 'database' when the dataset has one, "
        "as multi-label sets do, else 'test')",
    )
    p.add_argument("--db-modality", choices=MODALITIES, default="text")
    p.add_argument(
        "--query-split",
        default=None,
        help="split whose items query (default: 'query' when the dataset has one, else 'test')",
    )
    p.add_argument(
        "--query-modality",
        choices=MODALITIES,
        default=None,
        help="modality of the queries (default: the other one than --db-modality)",
    )
    p.add_argument(
        "--queries",
        default=None,
        help="a .npy (n, d) array of query features "
        "instead of --query-split (no labels, so no MAP)",
    )
    p.add_argument("--max-queries", type=int, default=None, help="use the first N queries")
    p.add_argument("--k", type=int, default=10, help="results per query (10)")
    p.add_argument(
        "--index",
        choices=("flat", "hash", "mih"),
        default="flat",
        help="flat: exact (faiss IndexBinaryFlat); hash: IndexBinaryHash; mih: multi-index "
        "hashing (both approximate, for large databases)",
    )
    p.add_argument("--hash-bits", type=int, default=None, help="bits hashed by --index hash")
    p.add_argument("--mih-tables", type=int, default=None, help="tables of --index mih")
    p.add_argument("--nflip", type=int, default=None, help="bit flips probed by hash/mih")
    p.add_argument(
        "--labels",
        choices=("label", "clean_label"),
        default="label",
        help="label column that defines relevance for MAP (label)",
    )
    p.add_argument("--show", type=int, default=5, help="print the results of N queries (5)")
    p.add_argument("--results", default=None, help="write all results to this .npz file")
    p.add_argument("--summary-json", help="write the summary here (JSON)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise PullError(f"--k must be at least 1, got {args.k}")
    if args.max_queries is not None and args.max_queries < 0:
        raise PullError(f"--max-queries must be ≥ 0, got {args.max_queries}")
    if args.show < 0:
        raise PullError(f"--show must be ≥ 0, got {args.show}")


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


def _print_results(
    queries: Side, db: Side, distances: np.ndarray, ids: np.ndarray, show: int, k: int
) -> list[dict[str, Any]]:
    shown = []
    rel = relevant_results(queries, db, ids[:show])
    if show:
        print(
            f"top-{k} {db.modality} items of {db.source} for {queries.modality} queries "
            f"(item_id:distance, * = shares a label)"
        )
    for i in range(min(show, len(queries.ids))):
        found = ids[i] >= 0
        pos, dist = ids[i][found], distances[i][found]
        items = db.ids[pos]
        marks = rel[i][found] if rel is not None else np.zeros(len(pos), dtype=bool)
        cells = " ".join(
            f"{it}:{d}{'*' if m else ''}" for it, d, m in zip(items, dist, marks, strict=True)
        )
        print(f"query {queries.ids[i]}: {cells}")
        shown.append(
            {
                "query_id": int(queries.ids[i]),
                "ids": items.tolist(),
                "distances": dist.tolist(),
                "relevant": marks.tolist() if rel is not None else None,
            }
        )
    return shown


def run_pull(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the job does; returns the summary."""
    from feature_store.store import open_dataset
    from pipeline.retrieval import metrics as evaluate
    from pipeline.retrieval.index import HammingIndex
    from pipeline.tracking.runs import resolve_tracking_uri

    _check_args(args)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    t0 = time.perf_counter()
    model = load_registered_model(args.model, tracking_uri)
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %s (%s%s, %d bits) in %.2fs",
        args.model,
        model.uri,
        f", version {model.version}" if model.version else "",
        model.bits,
        load_s,
    )
    dataset = args.dataset or model.dataset
    if not dataset:
        raise PullError("the model names no dataset (config or run tag); pass --dataset URI")
    ds = open_dataset(dataset)
    q_mod = args.query_modality or ("image" if args.db_modality == "text" else "text")
    splits = set(ds.manifest.get("counts", {}))
    db_split = args.db_split or ("database" if "database" in splits else "test")
    query_split = args.query_split or ("query" if "query" in splits else "test")

    query_x = None
    if args.queries:  # checked before any encoding
        query_x = load_query_file(args.queries, model.dim(q_mod), q_mod, args.max_queries)
    db = encode_split(model, ds, db_split, args.db_modality, label_column=args.labels)
    log.info("encoded %d %s items of %s in %.2fs", len(db.ids), db.modality, db.source, db.seconds)
    if query_x is not None:
        queries = encode_features(model, query_x, args.queries, q_mod)
    else:
        queries = encode_split(
            model, ds, query_split, q_mod, label_column=args.labels, limit=args.max_queries
        )
    if len(queries.ids) == 0:
        raise PullError(f"the query set is empty ({queries.source}, --max-queries)")
    if len(db.ids) == 0:
        raise PullError(f"the database is empty ({db.source})")
    if args.k > len(db.ids):
        raise PullError(f"--k {args.k} is larger than the database ({len(db.ids)} items)")
    log.info("encoded %d %s queries in %.2fs", len(queries.ids), q_mod, queries.seconds)

    evaluate._faiss()  # load faiss outside the build timing
    t0 = time.perf_counter()
    index = HammingIndex(
        db.codes,
        kind=args.index,
        hash_bits=args.hash_bits,
        tables=args.mih_tables,
        nflip=args.nflip,
    )
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    distances, ids = index.search(queries.codes, args.k)
    search_s = time.perf_counter() - t0
    log.info(
        "%s index over %d codes: built in %.3fs; top-%d of %d queries in %.3fs",
        args.index,
        index.ntotal,
        build_s,
        args.k,
        len(queries.ids),
        search_s,
    )
    shown = _print_results(queries, db, distances, ids, args.show, args.k)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        found = ids >= 0
        np.savez_compressed(
            args.results,
            query_ids=queries.ids,
            ids=np.where(found, db.ids[np.maximum(ids, 0)], -1),
            distances=distances,
        )

    metrics = None
    if queries.labels is not None and db.labels is not None:
        t0 = time.perf_counter()
        report = evaluate.retrieval_report(
            queries.codes, db.codes, queries.labels, db.labels, ks=sorted({args.k, 1, 10, 100})
        )
        rel_top = relevant_results(queries, db, ids)
        assert rel_top is not None
        metrics = {
            **report,
            "search_precision_at_k": float(rel_top.mean()),
            "seconds": time.perf_counter() - t0,
        }
        m = report["map"]
        print(
            f"MAP {q_mod}→{db.modality}, {len(queries.ids)} queries × {len(db.ids)} items, "
            f"{model.bits} bits: {m['index']:.4f} (ties by index), {m['expected']:.4f} (tie-aware)"
        )
        at = report["map_at_k"][str(args.k)]
        pk = report["precision_at_k"][str(args.k)]
        print(
            f"MAP@{args.k}: {at['index']:.4f} (ties by index), {at['expected']:.4f} (tie-aware); "
            f"P@{args.k}: {pk['index']:.4f} (ties by index), {pk['expected']:.4f} (tie-aware); "
            f"P@{args.k} of the {args.index} index results: {metrics['search_precision_at_k']:.4f}"
        )
    else:
        log.info("queries have no labels: no MAP")
    return {
        "model": {
            "ref": args.model,
            "uri": model.uri,
            "name": model.name,
            "version": model.version,
            "alias": model.alias,
            "run_id": model.run_id,
            "bits": model.bits,
            "data_version": model.config.get("data_version"),
            "valid_map": model.metrics.get("best_valid_map"),
        },
        "tracking_uri": tracking_uri,
        "dataset": ds.uri,
        "database": {"source": db.source, "modality": db.modality, "size": len(db.ids)},
        "queries": {
            "source": queries.source,
            "modality": queries.modality,
            "count": len(queries.ids),
        },
        "k": args.k,
        "index": {"kind": args.index, "ntotal": index.ntotal},
        "seconds": {
            "load_model": load_s,
            "encode_database": db.seconds,
            "encode_queries": queries.seconds,
            "build_index": build_s,
            "search": search_s,
        },
        "metrics": metrics,
        "results": shown,
        "results_file": args.results,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        summary = run_pull(args)
    except PullError as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
