"""Writing versions: an import (:func:`write_version`, :func:`write_dataset`), a noisy copy
(:func:`write_noisy_copy`; :func:`write_label_copy` with labels given, e.g. published noisy ones)
and a cleaned copy (:func:`write_cleaned_copy`).

A noisy copy is a new version holding only a label overlay, ``train.labels.parquet`` (item_id,
label, clean_label, is_noisy in the base's row order); its manifest lists the base's feature files
by reference (``"ref": "NAME/vK/train.parquet"``, relative to the store root, with their
checksums), so features are never copied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.noise import check_noise, corrupt, default_mode
from feature_store.plan import ImportPlan
from feature_store.reading import DatasetVersion, open_dataset
from feature_store.staging import (
    FORMAT,
    _now,
    _Staging,
    check_target,
)

log = logging.getLogger(__name__)


TARGET_ROW_GROUP_BYTES = 64 << 20


def row_group_rows(image_dim: int, text_dim: int, num_classes: int) -> int:
    """Rows per Parquet row group: about 64 MiB of features, between 1,024 and 1,048,576 rows."""
    row_bytes = 4 * (image_dim + text_dim) + 2 * num_classes + 16
    return int(min(max(TARGET_ROW_GROUP_BYTES // row_bytes, 1024), 1 << 20))


def _write_split(
    staging: _Staging,
    split: str,
    plan: ImportPlan,
    schema: pa.Schema,
    rows_per_group: int,
) -> dict[str, Any]:
    """Stream one split's features into ``SPLIT.parquet``, one row group per chunk."""
    sp = plan.splits[split]
    n, where = len(sp), plan.label
    fname = f"{split}.parquet"
    sink = staging.open(fname)
    writer = pq.ParquetWriter(sink, schema)
    done = 0
    try:
        for img, txt in sp.features.chunks(rows_per_group):
            m = len(img)
            if len(txt) != m or done + m > n:
                raise FeatureStoreError(
                    f"{where}: split '{split}' yields more feature rows than its {n} labels "
                    f"({sp.features.where(S.IMAGE)}); every item needs exactly one label"
                )
            blocks = {}
            for col, block, d in (
                (S.IMAGE, img, plan.dims["image"]),
                (S.TEXT, txt, plan.dims["text"]),
            ):
                b32 = np.asarray(block, dtype=np.float32)
                S.check_features(
                    split,
                    col,
                    b32,
                    row_offset=done,
                    item_id=sp.item_id,
                    width=d,
                    source=sp.features.where(col),
                )
                blocks[col] = b32
            table = S.rows_table(
                split,
                sp.item_id[done : done + m],
                blocks[S.IMAGE],
                blocks[S.TEXT],
                sp.observed[done : done + m],
                sp.clean_label[done : done + m],
            )
            writer.write_table(table, row_group_size=rows_per_group)
            done += m
            del table, blocks, img, txt
        if done != n:
            raise FeatureStoreError(
                f"{where}: split '{split}' has {n} labels but only {done} feature rows "
                f"({sp.features.where(S.IMAGE)}); every item needs both"
            )
    finally:
        writer.close()
        sink.close()
    log.debug("wrote %s (%d rows, %d bytes)", fname, n, sink.size)
    return {"sha256": sink.hexdigest(), "bytes": sink.size, "rows": n}


def _write_labels(
    staging: _Staging, fname: str, item_id: np.ndarray, label: np.ndarray, clean: np.ndarray
) -> dict[str, Any]:
    table = pa.Table.from_arrays(
        [
            pa.array(item_id, type=pa.int64()),
            S.vectors(label, pa.uint8()),
            S.vectors(clean, pa.uint8()),
            pa.array(np.any(label != clean, axis=1), type=pa.bool_()),
        ],
        schema=S.label_schema(label.shape[1]),
    )
    sink = staging.open(fname)
    try:
        pq.write_table(table, sink, row_group_size=1 << 20)
    finally:
        sink.close()
    return {"sha256": sink.hexdigest(), "bytes": sink.size, "rows": int(item_id.shape[0])}


def write_version(
    store: str,
    name: str,
    plan: ImportPlan,
    *,
    version: int | None = None,
    rows_per_group: int | None = None,
) -> str:
    """Validate a plan and write it as a new immutable version; return the version's URI.

    Labels, ids and splits are checked before anything is written; feature chunks are checked
    as they stream into the temporary version. Any error removes the temporary version.
    """
    loc = check_target(store, name, version)
    plan.validate()
    dims, k = plan.dims, plan.num_classes
    rows = rows_per_group or row_group_rows(dims["image"], dims["text"], k)
    schema = S.arrow_schema(dims["image"], dims["text"], k)
    staging = _Staging(loc, name, version)
    with staging.writing():
        files = {
            f"{split}.parquet": _write_split(staging, split, plan, schema, rows)
            for split in plan.splits
        }
        manifest = _manifest(
            name,
            staging.number,
            plan.label_kind,
            list(plan.splits),
            {s: len(sp) for s, sp in plan.splits.items()},
            dims,
            k,
            schema,
            files=files,
            layout={s: {"features": f"{s}.parquet", "labels": None} for s in plan.splits},
            noise=plan.noise,
            protocol=plan.protocol,
            source=plan.source,
            class_names=plan.class_names,
            rows_per_group=rows,
        )
        uri = staging.commit(manifest)
    log.info("wrote dataset %s/v%d %s", name, staging.number, manifest["counts"])
    return uri


def _manifest(
    name: str,
    number: int,
    label_kind: str,
    splits: list[str],
    counts: dict[str, int],
    dims: dict[str, int],
    k: int,
    schema: pa.Schema,
    **extra: Any,
) -> dict[str, Any]:
    m = {
        "format": FORMAT,
        "name": name,
        "version": number,
        "created_at": _now(),
        "schema": {f.name: str(f.type) for f in schema},
        "dims": {"image": int(dims["image"]), "text": int(dims["text"])},
        "num_classes": int(k),
        "label_kind": label_kind,
        "splits": splits,
        "counts": counts,
        "base": None,
    }
    m.update(extra)
    return m


def write_dataset(
    store: str,
    name: str,
    splits: dict[str, S.SplitArrays],
    *,
    source: dict[str, Any],
    noise: dict[str, Any],
    label_kind: str = S.SINGLE,
    protocol: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    version: int | None = None,
) -> str:
    """Write in-memory splits (observed labels already final) as a new version; return its URI."""
    S.validate_splits(splits, source=str(source.get("path", name)), label_kind=label_kind)
    plan = ImportPlan.from_arrays(
        splits,
        label_kind=label_kind,
        source=source,
        protocol=protocol,
        class_names=class_names,
        noise=noise,
    )
    return write_version(store, name, plan, version=version)


def _derived_copy(
    base: DatasetVersion,
    name: str,
    version: int | None,
    write_train: Callable[[_Staging, dict[str, Any], dict[str, Any], dict[str, int]], None],
    noise: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """A new version of ``name`` in the base's store that references the base's files except
    what ``write_train(staging, files, layout, counts)`` writes or replaces for the train split."""
    store = base.store_location
    loc = check_target(store.uri, name, version)
    files: dict[str, Any] = {}
    for fname, meta in base.manifest["files"].items():
        if fname.endswith(".labels.parquet"):
            continue  # superseded by this copy's overlay
        ref = meta.get("ref") or f"{base.manifest['name']}/v{base.manifest['version']}/{fname}"
        files[fname] = {k_: v for k_, v in meta.items() if k_ != "ref"} | {"ref": ref}
    layout = {s_: dict(v) for s_, v in base.layout.items()}
    m = base.manifest
    counts = dict(m["counts"])
    staging = _Staging(loc, name, version)
    with staging.writing():
        write_train(staging, files, layout, counts)
        k = base.num_classes
        manifest = _manifest(
            name,
            staging.number,
            base.label_kind,
            list(base.splits),
            counts,
            base.dims,
            k,
            S.arrow_schema(base.dims["image"], base.dims["text"], k),
            files=files,
            layout=layout,
            noise=noise,
            protocol=m.get("protocol", {}),
            source=m.get("source", {}),
            class_names=m.get("class_names"),
            rows_per_group=m.get("rows_per_group"),
            **(extra or {}),
        )
        manifest["base"] = {
            "name": m["name"],
            "version": m["version"],
            "data_version": base.data_version,
            "uri": base.uri,
        }
        uri = staging.commit(manifest)
    return uri


def write_noisy_copy(
    base_uri: str,
    *,
    mode: str | None,
    rate: float,
    seed: int,
    flip_map: dict[int, int] | None = None,
    name: str | None = None,
    version: int | None = None,
) -> str:
    """A new version with noisy train labels that shares the base version's feature files.

    Noise is drawn from the base's clean labels (so copies of copies do not compound). The new
    version lives in the same store, as the next version of ``name`` (default: the base's name).
    """
    base = open_dataset(base_uri)
    kind, k = base.label_kind, base.num_classes
    mode = mode or default_mode(kind)
    check_noise(mode, rate, label_kind=kind, num_classes=k, flip_map=flip_map)
    name = name or base.manifest["name"]
    check_target(base.store_location.uri, name, version)
    train = base.read_arrays("train", [S.ITEM_ID, S.CLEAN_LABEL])
    noisy, spec = corrupt(
        train[S.CLEAN_LABEL], mode, rate, seed, label_kind=kind, flip_map=flip_map
    )

    return _label_overlay_copy(base, name, version, train, noisy, spec, "noisy copy")


def write_label_copy(
    base_uri: str,
    label: np.ndarray,
    noise: dict[str, Any],
    *,
    name: str | None = None,
    version: int | None = None,
) -> str:
    """A new version whose observed train labels are ``label`` (one row per row of the base's
    train split, in its order), sharing the base's features and clean labels; ``noise`` is its
    noise record (e.g. published noisy labels: which file, its checksum, the changed share).
    """
    base = open_dataset(base_uri)
    name = name or base.manifest["name"]
    check_target(base.store_location.uri, name, version)
    train = base.read_arrays("train", [S.ITEM_ID, S.CLEAN_LABEL])
    label = np.asarray(label)
    S.check_labels(
        "train",
        train[S.ITEM_ID],
        {S.LABEL: label},
        label_kind=base.label_kind,
        num_classes=base.num_classes,
        source=f"labels for a copy of {base.uri}",
    )

    return _label_overlay_copy(
        base, name, version, train, label.astype(np.uint8), noise, "label copy"
    )


def _label_overlay_copy(
    base: DatasetVersion,
    name: str,
    version: int | None,
    train: dict[str, np.ndarray],
    label: np.ndarray,
    noise: dict[str, Any],
    what: str,
) -> str:
    """A derived version whose train split is a label overlay (``label`` in the base's row
    order, the base's clean labels) on the base's feature file."""

    def write_train(staging: _Staging, files: dict, layout: dict, counts: dict) -> None:
        overlay = "train.labels.parquet"
        files[overlay] = _write_labels(
            staging, overlay, train[S.ITEM_ID], label, train[S.CLEAN_LABEL]
        )
        layout["train"]["labels"] = overlay

    uri = _derived_copy(base, name, version, write_train, noise)
    log.info("wrote %s %s of %s: %s", what, uri, base.data_version, noise)
    return uri


def write_cleaned_copy(
    base_uri: str,
    *,
    drop: np.ndarray | None = None,
    relabel: dict[int, int] | None = None,
    cleaning: dict[str, Any],
    name: str | None = None,
    version: int | None = None,
) -> str:
    """A new version of the base without the train items ``drop`` (their rows are rewritten,
    the other splits referenced) or with ``relabel`` (item id → class; a label overlay).

    ``cleaning`` (what selected the items, from which run) goes into the manifest; the noise
    record gains the share of wrong labels left, measured against the kept clean labels.
    """
    if (drop is None) == (relabel is None):
        raise FeatureStoreError("cleaning: give either the item ids to drop or a relabel map")
    base = open_dataset(base_uri)
    name = name or base.manifest["name"]
    check_target(base.store_location.uri, name, version)
    cols = [S.ITEM_ID, S.LABEL, S.CLEAN_LABEL]
    train = base.read_arrays("train", cols)
    ids = train[S.ITEM_ID]
    chosen = np.asarray(drop if drop is not None else list(relabel or {}), dtype=np.int64)
    unknown = np.setdiff1d(chosen, ids)
    if unknown.size:
        raise FeatureStoreError(
            f"cleaning: {unknown.size} item id(s) are not in the train split of {base.uri} "
            f"(first: {int(unknown[0])})"
        )
    if relabel is not None and base.label_kind != S.SINGLE:
        raise FeatureStoreError(f"cleaning: relabelling needs single-label data ({base.uri})")
    k = base.num_classes
    labels = train[S.LABEL].copy()
    keep = ~np.isin(ids, chosen) if drop is not None else np.ones(ids.size, dtype=bool)
    if relabel is not None:
        bad = [c for c in relabel.values() if not 0 <= int(c) < k]
        if bad:
            raise FeatureStoreError(f"cleaning: class {bad[0]} is outside 0..{k - 1}")
        order = np.argsort(ids)
        rows = order[np.searchsorted(ids[order], chosen)]
        labels[rows] = 0
        labels[rows, [int(relabel[int(i)]) for i in chosen]] = 1
    wrong = np.any(labels[keep] != train[S.CLEAN_LABEL][keep], axis=1)
    noise = dict(base.manifest.get("noise", {})) | {
        "after_cleaning": {"train_items": int(keep.sum()), "wrong_share": float(wrong.mean())}
    }

    def write_train(staging: _Staging, files: dict, layout: dict, counts: dict) -> None:
        if relabel is not None:
            overlay = "train.labels.parquet"
            files[overlay] = _write_labels(staging, overlay, ids, labels, train[S.CLEAN_LABEL])
            layout["train"]["labels"] = overlay
            return
        table = base.read_table("train", S.ALL_COLUMNS).filter(pa.array(keep))
        sink = staging.open("train.parquet")
        try:
            pq.write_table(
                table.cast(S.arrow_schema(base.dims["image"], base.dims["text"], k)),
                sink,
                row_group_size=base.manifest.get("rows_per_group") or 1 << 16,
            )
        finally:
            sink.close()
        files["train.parquet"] = {
            "sha256": sink.hexdigest(),
            "bytes": sink.size,
            "rows": int(table.num_rows),
        }
        layout["train"] = {"features": "train.parquet", "labels": None}
        counts["train"] = int(table.num_rows)

    uri = _derived_copy(base, name, version, write_train, noise, {"cleaning": cleaning})
    log.info("wrote cleaned copy %s of %s: %s", uri, base.data_version, cleaning)
    return uri
