"""A registered model pulled from the MLflow registry: resolve a reference, load the model without
unpickling, and use it to answer top-k queries or to evaluate it on a feature-store dataset.

Needs torch, mlflow, numpy and faiss-cpu only (no Ray). A reference is NAME@ALIAS (e.g.
rshnl-demo@champion), NAME/VERSION, or any MLflow model URI (models:/..., runs:/.../model).
Bad input raises :class:`~pipeline.retrieval.search.PullError` with a one-line message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion
from pipeline.retrieval.index import IndexSpec
from pipeline.retrieval.search import (
    PullError,
    Side,
    cross_modal_report,
    default_splits,
    encode_features,
    encode_split,
    load_query_file,
    save_results,
    search,
    search_metrics,
    shown_results,
)

log = logging.getLogger(__name__)
__all__ = [
    "PullError",
    "PulledModel",
    "evaluate_registered_model",
    "load_registered_model",
    "model_uri",
    "run_pull",
]


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
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return int(self.arch["bits"])

    @property
    def index_spec(self) -> IndexSpec:
        """The search index recorded with the model (the default spec when none was)."""
        try:
            return IndexSpec.from_dict(self.index)
        except ValueError as e:
            raise PullError(f"model {self.uri} records a bad search index ({e})") from e

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
        index=dict(getattr(inner, "index", {}) or {}),
    )


def _first_line(e: BaseException) -> str:
    msg = str(getattr(e, "message", None) or e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def model_dataset(model: PulledModel, dataset: str = "") -> DatasetVersion:
    """``dataset``, else the dataset the model was trained on, opened and verified."""
    from feature_store.store import open_dataset

    dataset = dataset or model.dataset
    if not dataset:
        raise PullError("the model names no dataset (config or run tag); pass --dataset URI")
    return open_dataset(dataset)


def run_pull(
    ref: str,
    *,
    tracking_uri: str = "",
    dataset: str = "",
    db_split: str | None = None,
    db_modality: str = "text",
    query_split: str | None = None,
    query_modality: str | None = None,
    queries: str | None = None,
    max_queries: int | None = None,
    k: int = 10,
    index: str | None = None,
    hash_bits: int | None = None,
    mih_tables: int | None = None,
    nflip: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    exact_below: int | None = None,
    labels: str = S.LABEL,
    show: int = 5,
    results: str | None = None,
    index_cache: str | None = None,
) -> dict[str, Any]:
    """Load model ``ref``, encode a database and queries, search top-``k``; returns the summary.

    The database is ``db_split``'s ``db_modality`` features, the queries ``query_split``'s
    features of the other modality (or the .npy file ``queries``); the default splits are the
    test protocol's. MAP and precision are computed when the queries have labels. The index is
    the one recorded with the model (:attr:`PulledModel.index_spec`) with any of ``index``,
    ``hash_bits``, ``mih_tables``, ``nflip``, ``nlist``, ``nprobe``, ``exact_below`` that is
    given replacing its value. With ``index_cache`` an IVF index is read from that folder when
    the same database codes were indexed there with the same parameters, else built and kept.
    """
    from pipeline.tracking.runs import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri)
    t0 = time.perf_counter()
    model = load_registered_model(ref, tracking_uri)
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %s (%s%s, %d bits) in %.2fs",
        ref,
        model.uri,
        f", version {model.version}" if model.version else "",
        model.bits,
        load_s,
    )
    recorded = model.index_spec
    try:
        spec = recorded.replace(
            kind=index,
            hash_bits=hash_bits,
            tables=mih_tables,
            nflip=nflip,
            nlist=nlist,
            nprobe=nprobe,
            exact_below=exact_below,
        )
    except ValueError as e:
        raise PullError(str(e)) from e
    ds = model_dataset(model, dataset)
    q_mod = query_modality or ("image" if db_modality == "text" else "text")
    default_query, default_db = default_splits(ds)
    db_split = db_split or default_db
    query_split = query_split or default_query

    query_x = None
    if queries:  # checked before any encoding
        query_x = load_query_file(queries, model.dim(q_mod), q_mod, max_queries)
    db = encode_split(model, ds, db_split, db_modality, label_column=labels)
    log.info("encoded %d %s items of %s in %.2fs", len(db.ids), db.modality, db.source, db.seconds)
    q: Side
    if query_x is not None:
        q = encode_features(model, query_x, str(queries), q_mod)
    else:
        q = encode_split(model, ds, query_split, q_mod, label_column=labels, limit=max_queries)
    found = search(q, db, k, spec=spec, index_cache=index_cache)
    shown = shown_results(q, db, found, show)
    if results:
        save_results(results, q, db, found)
    metrics = search_metrics(q, db, found, k)
    return {
        "model": {
            "ref": ref,
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
        "queries": {"source": q.source, "modality": q.modality, "count": len(q.ids)},
        "k": k,
        "index": {
            "kind": found.index["kind"],
            "ntotal": found.ntotal,
            "short_queries": found.short_queries,
            "cached": found.cached,
            "params": found.index,
            "spec": spec.to_dict(),
            "recorded": recorded.to_dict(),
        },
        "seconds": {
            "load_model": load_s,
            "encode_database": db.seconds,
            "encode_queries": q.seconds,
            "build_index": found.build_seconds,
            "search": found.search_seconds,
        },
        "metrics": metrics,
        "results": shown,
        "results_file": results,
    }


def evaluate_registered_model(
    ref: str,
    *,
    tracking_uri: str = "",
    dataset: str = "",
    split: str | None = None,
    labels: str = S.LABEL,
    ks: Sequence[int] = (1, 10, 50, 100),
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Cross-modal evaluation of model ``ref`` on the test protocol's splits (or ``split``
    against itself), with the PR-curve plot in ``out_dir``; returns the summary."""
    from pipeline.tracking.runs import resolve_tracking_uri

    model = load_registered_model(ref, resolve_tracking_uri(tracking_uri))
    ds = model_dataset(model, dataset)
    query_split, db_split, report = cross_modal_report(
        model, ds, split=split, label_column=labels, ks=ks
    )
    if out_dir:
        from pipeline.tracking.plots import PR_PNG, plot_pr_curves

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_pr_curves({d: r["pr_curve"] for d, r in report.items()}, out / PR_PNG)
        log.info("wrote %s", out / PR_PNG)
    return {
        "model": {"ref": ref, "uri": model.uri, "version": model.version},
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "query_split": query_split,
        "database_split": db_split,
        "labels": labels,
        "bits": model.bits,
        "report": report,
    }
