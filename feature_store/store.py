"""Versioned datasets in a local directory or under ``s3://bucket/prefix``.

Layout: ``STORE/NAME/vN/`` holds one Parquet file per split (``train.parquet``, ``valid.parquet``,
``test.parquet`` for single-label sets; ``train``/``query``/``database`` (+ ``valid``) for
multi-label sets; see :mod:`feature_store.schema`) and ``manifest.json``. The manifest records the
schema, dims, classes, label kind, ordered splits and per-split counts, the noise spec and seed,
the import protocol (e.g. the validation carve-out), the source file's checksum, and every file's
SHA-256, size and row count. :func:`open_dataset` verifies the files against it before any work.

Versions are immutable. Locally a version is written into ``NAME/.vN.tmp-XXXX/`` and renamed to
``vN`` only when complete (atomic on one filesystem). On S3, where there is no rename, the writer
first claims ``vN`` with a conditional PUT of ``vN/.writing``, writes the data files, and commits by
a conditional PUT of ``manifest.json`` (``If-None-Match: *``); a version without a manifest is not
a version, and any failure deletes what was written, so the store is left as it was.

A noisy copy (:func:`write_noisy_copy`) is a new version holding only a label overlay,
``train.labels.parquet`` (item_id, label, clean_label, is_noisy in the base's row order); its
manifest lists the base's feature files by reference (``"ref": "NAME/vK/train.parquet"``,
relative to the store root, with their checksums), so features are never copied. The reader
resolves references and joins the overlay's label columns onto the feature rows:
``read_table`` / ``read_arrays`` / ``iter_batches`` / ``parquet_scan`` work the same on both kinds
of version; ``split_uri`` gives a single file's URI and refuses a split that has an overlay.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.location import Location, check_s3_access, resolve, s3_client, s3_error
from feature_store.noise import check_noise, corrupt, default_mode
from feature_store.plan import ImportPlan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "rshnl-feature-store/2"
READABLE_FORMATS = ("rshnl-feature-store/1", FORMAT)
CLAIM = ".writing"
TARGET_ROW_GROUP_BYTES = 64 << 20
_VERSION_RE = re.compile(r"^v(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_RE = re.compile(r"^\.v\d+\.tmp-[0-9a-f]{8}$")  # a local write in progress (or a killed one)
DEFAULT_GC_HOURS = 24.0


def row_group_rows(image_dim: int, text_dim: int, num_classes: int) -> int:
    """Rows per Parquet row group: about 64 MiB of features, between 1,024 and 1,048,576 rows."""
    row_bytes = 4 * (image_dim + text_dim) + 2 * num_classes + 16
    return int(min(max(TARGET_ROW_GROUP_BYTES // row_bytes, 1024), 1 << 20))


def _is_s3_error(e: BaseException) -> bool:
    return type(e).__module__.startswith(("botocore", "boto3")) or "AWS Error" in str(e)


class _HashingSink:
    """A write-only file object that hashes and counts what passes through to ``raw``."""

    def __init__(self, raw: Any) -> None:
        self._raw, self._h, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._h.update(view)
        self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self.closed = True

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _versions(fs: pafs.FileSystem, dataset_path: str) -> dict[int, str]:
    """Version number → path of every ``vN`` entry (complete or not) under a dataset."""
    infos = fs.get_file_info(pafs.FileSelector(dataset_path, allow_not_found=True))
    out = {}
    for info in infos:
        m = _VERSION_RE.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            out[int(m.group(1))] = info.path
    return out


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def _raise_write_error(e: OSError, loc: Location) -> None:
    """Raise a one-line FeatureStoreError for a local store that cannot be written (else return)."""
    if loc.is_s3 or e.errno not in _NOT_WRITABLE:
        return
    where = f": '{e.filename}'" if e.filename else ""
    raise FeatureStoreError(
        f"store '{loc.uri}' is not writable ({os.strerror(e.errno)}{where}); pass a --store "
        "you may write to"
    ) from e


def _check_local_target(loc: Location, dataset_path: str) -> None:
    """Refuse a local dataset directory under a file or in a place that cannot be written."""
    probe = Path(dataset_path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FeatureStoreError(f"store '{loc.uri}': '{probe}' is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FeatureStoreError(
            f"store '{loc.uri}' is not writable (no write permission on '{probe}', or a "
            "read-only filesystem); pass a --store you may write to"
        )


def check_target(store: str, name: str, version: int | None = None) -> Location:
    """Refuse a bad dataset name, an unreachable store or an existing version, before any work."""
    if not _NAME_RE.match(name):
        raise FeatureStoreError(
            f"dataset name '{name}' must match {_NAME_RE.pattern} (letters, digits, _ . -)"
        )
    if version is not None and version < 1:
        raise FeatureStoreError(f"version {version} must be >= 1")
    loc = resolve(store)
    if loc.is_s3:
        check_s3_access(loc, "write to")
    else:
        _check_local_target(loc, loc.child(name).path)
    if version is not None:
        final = loc.child(name, f"v{version}")
        try:
            taken = _exists(loc.fs, final.path)
        except OSError as e:
            raise s3_error(e, loc, "list") from e
        if taken:
            raise FeatureStoreError(
                f"version {final.uri} already exists; versions are immutable, write a new one "
                "(omit --version) or choose another name"
            )
    return loc


class _Staging:
    """Writes one version: a temporary directory renamed into place, or an S3 claim + commit."""

    def __init__(self, store: Location, name: str, version: int | None) -> None:
        self.store, self.name = store, name
        self.fs = store.fs
        self.dataset = store.child(name)
        self._created: list[Path] = []
        self._written: list[str] = []
        try:
            taken = _versions(self.fs, self.dataset.path)
        except OSError as e:
            raise s3_error(e, store, "list") from e
        self.number = version if version is not None else max(taken, default=0) + 1
        self.final = self.dataset.child(f"v{self.number}")
        if self.number in taken:
            raise FeatureStoreError(
                f"version {self.final.uri} already exists; versions are immutable, write a new "
                "one (omit --version) or choose another name"
            )
        if store.is_s3:
            self.dir = self.final.path
            self._claim()
        else:
            tmp = f".v{self.number}.tmp-{uuid.uuid4().hex[:8]}"
            self.dir = self.dataset.child(tmp).path
            try:
                for p in reversed([Path(self.dataset.path), *Path(self.dataset.path).parents]):
                    if not p.exists():
                        p.mkdir()
                        self._created.append(p)
                os.mkdir(self.dir)
            except OSError as e:
                self.abort()
                _raise_write_error(e, store)
                raise

    def _key(self, fname: str) -> str:
        return posixpath.join(self.final.key, fname)

    def _claim(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = json.dumps({"writer": uuid.uuid4().hex, "at": _now()}).encode()
        try:
            s3_client().put_object(
                Bucket=self.store.bucket, Key=self._key(CLAIM), Body=body, IfNoneMatch="*"
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise FeatureStoreError(
                    f"version {self.final.uri} is being written by another writer; retry to get "
                    "the next version number"
                ) from e
            raise s3_error(e, self.store, "write to") from e
        except BotoCoreError as e:
            raise s3_error(e, self.store, "write to") from e
        self._written.append(self._key(CLAIM))

    def open(self, fname: str) -> _HashingSink:
        path = posixpath.join(self.dir, fname)
        if self.store.is_s3:
            self._written.append(self._key(fname))
        return _HashingSink(self.fs.open_output_stream(path))

    def commit(self, manifest: dict[str, Any]) -> str:
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if self.store.is_s3:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                client = s3_client()
                client.put_object(
                    Bucket=self.store.bucket,
                    Key=self._key(MANIFEST),
                    Body=body,
                    IfNoneMatch="*",
                    ContentType="application/json",
                )
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise FeatureStoreError(
                        f"version {self.final.uri} was committed by another writer meanwhile"
                    ) from e
                raise s3_error(e, self.store, "commit") from e
            except BotoCoreError as e:
                raise s3_error(e, self.store, "commit") from e
            self._written.clear()  # committed: from here on nothing may be rolled back
            try:
                client.delete_object(Bucket=self.store.bucket, Key=self._key(CLAIM))
            except Exception as e:  # a leftover claim next to a manifest is harmless
                log.warning(
                    "version %s committed, but its claim was not removed: %s", self.final.uri, e
                )
            return self.final.uri
        with open(posixpath.join(self.dir, MANIFEST), "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(self.dir, self.final.path)  # atomic; fails if another writer took the name
        except OSError as e:
            raise FeatureStoreError(
                f"version {self.final.uri} already exists (written by another writer "
                "meanwhile); versions are immutable, retry to get the next number"
            ) from e
        return self.final.uri

    def abort(self) -> None:
        """Remove everything this write created, so the store is as it was."""
        if self.store.is_s3:
            try:
                client = s3_client()
                for key in reversed(self._written):
                    client.delete_object(Bucket=self.store.bucket, Key=key)
            except Exception as e:  # cleanup must not hide the original error
                log.warning("could not remove the partial version %s: %s", self.final.uri, e)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        for p in reversed(self._created):
            try:
                p.rmdir()
            except OSError:
                break


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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
    try:
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
    except BaseException as e:
        staging.abort()
        if isinstance(e, OSError) and loc.is_s3 and _is_s3_error(e):
            raise s3_error(e, loc, "write to") from e
        if isinstance(e, OSError):
            _raise_write_error(e, loc)
        raise
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
    try:
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
    except BaseException as e:
        staging.abort()
        if isinstance(e, OSError) and loc.is_s3 and _is_s3_error(e):
            raise s3_error(e, loc, "write to") from e
        if isinstance(e, OSError):
            _raise_write_error(e, loc)
        raise
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

    def write_train(staging: _Staging, files: dict, layout: dict, counts: dict) -> None:
        overlay = "train.labels.parquet"
        files[overlay] = _write_labels(
            staging, overlay, train[S.ITEM_ID], noisy, train[S.CLEAN_LABEL]
        )
        layout["train"]["labels"] = overlay

    uri = _derived_copy(base, name, version, write_train, spec)
    log.info("wrote noisy copy %s of %s: %s", uri, base.data_version, spec)
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


def manifest_problem(m: Any) -> str | None:
    """Why a parsed manifest cannot describe a version (None when it can)."""
    if not isinstance(m, dict):
        return f"{MANIFEST} holds a JSON {type(m).__name__}, not an object"
    if m.get("format") not in READABLE_FORMATS:
        return f"format {m.get('format')!r}, expected one of {list(READABLE_FORMATS)}"
    for key, typ in (("files", dict), ("counts", dict), ("dims", dict), ("num_classes", int)):
        if not isinstance(m.get(key), typ):
            got = "missing" if key not in m else f"a {type(m[key]).__name__}"
            return f"key '{key}' is {got}, expected a {typ.__name__}"
    splits = m.get("splits") or list(m["counts"])
    unknown = [sp for sp in splits if sp not in m["counts"]]
    if unknown:
        return f"splits {unknown} have no count"
    return None


def _read_manifest(fs: pafs.FileSystem, mpath: str, shown: str | None = None) -> dict[str, Any]:
    """A version's manifest; FeatureStoreError (naming the file, as ``shown`` if given, and why)
    when it is unusable."""
    shown = shown or mpath
    with fs.open_input_stream(mpath) as f:
        raw = f.read()
    try:
        m = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureStoreError(f"{shown} is not valid JSON ({e})") from e
    problem = manifest_problem(m)
    if problem:
        raise FeatureStoreError(f"{shown}: {problem}")
    return m


def _stale_write(
    fs: pafs.FileSystem, info: pafs.FileInfo, uri: str, dataset: str, kind: str
) -> dict[str, Any]:
    """Size and last activity (newest mtime of anything inside) of an uncommitted write."""
    size, newest = 0, info.mtime.timestamp() if info.mtime else 0.0
    for f in fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
        if f.type == pafs.FileType.File:
            size += f.size or 0
        if f.mtime is not None:
            newest = max(newest, f.mtime.timestamp())
    age = max(dt.datetime.now(dt.UTC).timestamp() - newest, 0.0) if newest else None
    return {
        "name": dataset,
        "uri": uri,
        "path": info.path,
        "kind": kind,
        "bytes": size,
        "age_hours": None if age is None else age / 3600,
    }


@dataclass
class StoreScan:
    """What a store holds: readable versions, versions that cannot be read, unfinished writes."""

    versions: list[dict[str, Any]]
    unreadable: list[dict[str, Any]]
    stale: list[dict[str, Any]]


def _summary(ds: str, number: int, uri: str, m: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": ds,
        "version": number,
        "uri": uri,
        "label_kind": m.get("label_kind", S.SINGLE),
        "counts": {s: m["counts"][s] for s in (m.get("splits") or m.get("counts", {}))},
        "noise": {key: (m.get("noise") or {}).get(key) for key in ("mode", "rate", "seed")},
        "base": (m.get("base") or {}).get("data_version"),
        "created_at": m.get("created_at"),
    }


def scan_store(store: str, name: str | None = None) -> StoreScan:
    """Every version of a store (or of one dataset), oldest first, and the debris around them.

    ``unreadable``: versions whose manifest is missing or unusable (name, version, uri, reason).
    ``stale``: uncommitted writes that a killed writer left behind (name, uri, path, kind, bytes,
    age_hours): local ``NAME/.vN.tmp-*`` directories and S3 ``vN/`` prefixes holding a claim but
    no manifest. :func:`collect_garbage` removes the old ones.
    """
    loc = resolve(store)
    if loc.is_s3:
        check_s3_access(loc, "list")
    elif Path(loc.path).exists() and not Path(loc.path).is_dir():
        raise FeatureStoreError(f"store '{store}' is a file, not a directory")
    fs = loc.fs
    scan = StoreScan([], [], [])
    try:
        if name is not None:
            names = [name]
        else:
            infos = fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
            names = sorted(
                i.base_name
                for i in infos
                if i.type == pafs.FileType.Directory and _NAME_RE.match(i.base_name)
            )
        for ds in names:
            dpath = loc.child(ds).path
            entries = fs.get_file_info(pafs.FileSelector(dpath, allow_not_found=True))
            for info in sorted(entries, key=lambda i: i.base_name):
                if info.type == pafs.FileType.Directory and _TMP_RE.match(info.base_name):
                    uri = loc.child(ds, info.base_name).uri
                    scan.stale.append(_stale_write(fs, info, uri, ds, "temporary directory"))
            for number, path in sorted(_versions(fs, dpath).items()):
                uri = loc.child(ds, f"v{number}").uri
                mpath = posixpath.join(path, MANIFEST)
                if not _exists(fs, mpath):
                    if loc.is_s3 and _exists(fs, posixpath.join(path, CLAIM)):
                        info = fs.get_file_info(path)
                        scan.stale.append(_stale_write(fs, info, uri, ds, "uncommitted version"))
                        continue
                    reason = f"no {MANIFEST} (an incomplete write)"
                    scan.unreadable.append(
                        {"name": ds, "version": number, "uri": uri, "reason": reason}
                    )
                    continue
                try:
                    m = _read_manifest(fs, mpath)
                except FeatureStoreError as e:
                    reason = str(e).removeprefix(path + "/")
                    scan.unreadable.append(
                        {"name": ds, "version": number, "uri": uri, "reason": reason}
                    )
                    continue
                scan.versions.append(_summary(ds, number, uri, m))
    except OSError as e:
        raise s3_error(e, loc, "list") from e
    return scan


def list_versions(store: str, name: str | None = None) -> list[dict[str, Any]]:
    """Summaries of the readable versions in a store (or of one dataset), oldest first.

    Versions that cannot be read are skipped with a warning naming each and why.
    """
    scan = scan_store(store, name)
    for u in scan.unreadable:
        log.warning("%s/v%d cannot be read, skipped: %s", u["name"], u["version"], u["reason"])
    return scan.versions


def collect_garbage(
    store: str,
    *,
    older_than_hours: float = DEFAULT_GC_HOURS,
    dry_run: bool = False,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Remove uncommitted writes (see :func:`scan_store`) idle for longer than the grace period.

    Only the store's own leftovers are touched: ``.vN.tmp-*`` directories and, on S3, claimed
    ``vN/`` prefixes without a manifest. Versions, readable or not, are never removed. Returns
    the entries removed (or, with ``dry_run``, those that would be).
    """
    if not older_than_hours >= 0:
        raise FeatureStoreError(f"--older-than {older_than_hours} must be >= 0 hours")
    loc = resolve(store)
    removed = []
    for st in scan_store(store, name).stale:
        age = st["age_hours"]
        if age is None or age < older_than_hours:
            log.info("kept %s: idle %.1f h, under %.1f h", st["uri"], age or 0.0, older_than_hours)
            continue
        if not dry_run:
            try:
                loc.fs.delete_dir(st["path"])
            except OSError as e:
                if loc.is_s3:
                    raise s3_error(e, loc, "write to") from e
                _raise_write_error(e, loc)
                raise
        removed.append(st)
        log.info(
            "%s %s (%s, %d bytes, idle %.1f h)",
            "would remove" if dry_run else "removed",
            st["uri"],
            st["kind"],
            st["bytes"],
            age,
        )
    return removed


@dataclass
class DatasetVersion:
    """A verified, read-only dataset version (local or S3; a base version or a noisy copy)."""

    uri: str
    manifest: dict[str, Any]
    _fs: pafs.FileSystem
    _path: str

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest["dims"])

    @property
    def label_kind(self) -> str:
        return str(self.manifest.get("label_kind", S.SINGLE))

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits in protocol order (train/valid/test or train/[valid/]query/database)."""
        if self.manifest.get("splits"):
            return tuple(self.manifest["splits"])
        known = S.allowed_splits(self.label_kind)
        counts = self.manifest["counts"]  # JSON key order is not the protocol order
        return tuple(sorted(counts, key=lambda s: known.index(s) if s in known else len(known)))

    @property
    def layout(self) -> dict[str, dict[str, str | None]]:
        """Per split: its feature file and its label overlay file (None without one)."""
        return self.manifest.get("layout") or {
            s: {"features": f"{s}.parquet", "labels": None} for s in self.splits
        }

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    @property
    def store_location(self) -> Location:
        """The store this version belongs to (two levels above the version)."""
        return resolve(self.uri).parent().parent()

    @property
    def data_version(self) -> str:
        """Short stable identifier: name, version and a digest of the file checksums."""
        digest = hashlib.sha256(
            json.dumps(self.manifest["files"], sort_keys=True).encode()
        ).hexdigest()[:12]
        return f"{self.manifest['name']}/v{self.manifest['version']}@{digest}"

    def file_path(self, fname: str) -> str:
        """Filesystem path of a manifest file, following a reference into another version."""
        ref = self.manifest["files"].get(fname, {}).get("ref")
        if not ref:
            return f"{self._path}/{fname}"
        store = posixpath.dirname(posixpath.dirname(self._path))
        return posixpath.normpath(posixpath.join(store, ref))

    def _uri_of(self, path: str) -> str:
        return f"s3://{path}" if self.uri.startswith("s3://") else path

    def split_uri(self, split: str) -> str:
        """URI of the one Parquet file that holds a split (refused for a label overlay)."""
        lay = self._layout(split)
        if lay.get("labels"):
            raise FeatureStoreError(
                f"{self.uri}: split '{split}' is a label overlay on shared feature files (a "
                "noisy copy); read it with DatasetVersion.parquet_scan / read_table / "
                "iter_batches, which join the labels onto the features"
            )
        return self._uri_of(self.file_path(str(lay["features"])))

    def _layout(self, split: str) -> dict[str, str | None]:
        if split not in self.splits:
            hint = ""
            if self.label_kind == S.MULTI and split == "test":
                hint = "; a multi-label version is evaluated query against database"
            raise FeatureStoreError(
                f"{self.uri}: no split '{split}' (has {list(self.splits)}){hint}"
            )
        return self.layout[split]

    def _columns(self, split: str, columns: Any) -> tuple[list[str], list[str], str | None]:
        cols = list(S.ALL_COLUMNS if columns is None else columns)
        unknown = [c for c in cols if c not in S.ALL_COLUMNS]
        if unknown:
            raise FeatureStoreError(
                f"{self.uri}: unknown column(s) {unknown}; see feature_store.schema"
            )
        overlay = self._layout(split).get("labels")
        label_cols = [c for c in cols if overlay and c in S.LABEL_COLUMNS]
        return cols, label_cols, overlay

    def _parquet(self, fname: str) -> pq.ParquetFile:
        try:
            # no pre-buffering: it would cache whole column chunks beyond the row group being read
            return pq.ParquetFile(self._fs.open_input_file(self.file_path(fname)), pre_buffer=False)
        except OSError as e:
            if self.uri.startswith("s3://"):
                raise s3_error(e, resolve(self.uri), "read") from e
            raise FeatureStoreError(f"{self.uri}: cannot read {fname}: {e}") from e

    def _overlay_table(self, overlay: str, label_cols: list[str]) -> pa.Table:
        return self._parquet(overlay).read(columns=[S.ITEM_ID, *label_cols])

    def read_table(
        self, split: str, columns: list[str] | tuple[str, ...] | None = None
    ) -> pa.Table:
        """Columns of one split as an Arrow table (a noisy copy's labels joined on)."""
        cols, label_cols, overlay = self._columns(split, columns)
        feat_cols = [c for c in cols if c not in label_cols]
        lay = self._layout(split)
        need = list(dict.fromkeys(feat_cols + ([S.ITEM_ID] if label_cols else [])))
        t = self._parquet(str(lay["features"])).read(columns=need or [S.ITEM_ID])
        if not label_cols:
            return t.select(cols)
        lt = self._overlay_table(str(overlay), label_cols)
        if not t.column(S.ITEM_ID).equals(lt.column(S.ITEM_ID)):
            raise FeatureStoreError(
                f"{self.uri}: the label overlay of split '{split}' is not aligned with its "
                "feature file; the store was modified, re-create the noisy copy"
            )
        data = {c: (lt.column(c) if c in label_cols else t.column(c)) for c in cols}
        return pa.table(data)

    def read_arrays(
        self, split: str, columns: list[str] | tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Columns of one split as NumPy arrays (vectors as 2-D arrays)."""
        table = self.read_table(split, columns)
        out: dict[str, np.ndarray] = {}
        for col in columns:
            arr = table.column(col).combine_chunks()
            if pa.types.is_fixed_size_list(arr.type):
                out[col] = S.to_matrix(arr)
            else:
                out[col] = arr.to_numpy(zero_copy_only=False)
        return out

    def iter_batches(
        self,
        split: str,
        columns: list[str] | tuple[str, ...] | None = None,
        batch_rows: int | None = None,
    ) -> Iterator[pa.Table]:
        """Stream a split in row-group-sized tables (one row group of features at a time)."""
        cols, label_cols, overlay = self._columns(split, columns)
        feat_cols = [c for c in cols if c not in label_cols]
        need = list(dict.fromkeys(feat_cols + ([S.ITEM_ID] if label_cols else []))) or [S.ITEM_ID]
        pf = self._parquet(str(self._layout(split)["features"]))
        labels = self._overlay_table(str(overlay), label_cols) if label_cols else None
        pos = 0
        for t in self._row_groups(pf, need, batch_rows):
            if labels is not None:
                part = labels.slice(pos, t.num_rows)
                if not t.column(S.ITEM_ID).equals(part.column(S.ITEM_ID)):
                    raise FeatureStoreError(
                        f"{self.uri}: the label overlay of split '{split}' is not aligned with "
                        "its feature file; re-create the noisy copy"
                    )
                t = pa.table(
                    {c: (part.column(c) if c in label_cols else t.column(c)) for c in cols}
                )
            pos += t.num_rows
            yield t.select(cols)

    @staticmethod
    def _row_groups(pf: pq.ParquetFile, columns: list[str], rows: int | None) -> Iterator[pa.Table]:
        """One row group at a time (optionally cut into ``rows``-row tables)."""
        for i in range(pf.num_row_groups):
            group = pf.read_row_group(i, columns=columns, use_threads=False)
            step = rows or max(group.num_rows, 1)
            for a in range(0, group.num_rows, step):
                yield group.slice(a, step)
            del group

    def parquet_scan(
        self, split: str, columns: list[str] | tuple[str, ...] = S.TRAINING_COLUMNS
    ) -> ParquetScan:
        """How to read one split's columns with a Parquet reader (e.g. Ray Data's).

        For a noisy copy the scan reads the shared feature file and ``join`` puts the copy's
        label columns onto each block by item id, so readers see the copy's labels without a
        copy of the features.
        """
        cols, label_cols, overlay = self._columns(split, columns)
        path = self.file_path(str(self._layout(split)["features"]))
        if not label_cols:
            return ParquetScan(path, self._fs, list(cols), None)
        feat_cols = [c for c in cols if c not in label_cols]
        need = list(dict.fromkeys([S.ITEM_ID, *feat_cols]))
        lt = self._overlay_table(str(overlay), label_cols)
        ids = lt.column(S.ITEM_ID).to_numpy()
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        label_arrays = {c: lt.column(c).combine_chunks() for c in label_cols}

        def join(batch: pa.Table) -> pa.Table:
            bid = batch.column(S.ITEM_ID).to_numpy()
            pos = np.searchsorted(sorted_ids, bid)
            if pos.size and (pos.max() >= sorted_ids.size or (sorted_ids[pos] != bid).any()):
                raise FeatureStoreError("label overlay lacks some item ids of the feature file")
            take = pa.array(order[pos])
            data = {
                c: (label_arrays[c].take(take) if c in label_cols else batch.column(c))
                for c in cols
            }
            return pa.table(data)

        return ParquetScan(path, self._fs, need, join)


@dataclass(frozen=True)
class ParquetScan:
    """A split's Parquet file, its filesystem, the columns to read, and the per-block label join
    of a noisy copy (``None`` for a version that owns its labels)."""

    path: str
    filesystem: pafs.FileSystem
    columns: list[str]
    join: Callable[[pa.Table], pa.Table] | None


def _dataset_hint(fs: pafs.FileSystem, path: str, uri: str) -> str:
    """Why a URI has no manifest: a dataset directory, an incomplete write, or nothing."""
    try:
        versions = _versions(fs, path)
        if versions:
            names = ", ".join(f"v{n}" for n in sorted(versions))
            latest = f"{uri}/v{max(versions)}"
            return f"; it is a dataset directory with versions {names}: pass one, e.g. {latest}"
        if _exists(fs, posixpath.join(path, CLAIM)) or (
            _VERSION_RE.match(posixpath.basename(path)) and _exists(fs, path)
        ):
            return "; the version is incomplete (a write in progress or one that failed)"
    except OSError:
        pass
    return (
        "; pass the URI of a version directory (e.g. STORE/NAME/v1) as printed by "
        "`python -m jobs.ingest`"
    )


def open_dataset(uri: str, *, verify: bool = True) -> DatasetVersion:
    """Open a dataset version and (by default) verify every file against its manifest checksum."""
    loc = resolve(uri)
    if loc.is_s3:
        check_s3_access(loc, "read")
    fs, path = loc.fs, loc.path
    try:
        info = fs.get_file_info(f"{path}/{MANIFEST}")
    except OSError as e:
        raise s3_error(e, loc, "read") from e
    if info.type != pafs.FileType.File:
        raise FeatureStoreError(
            f"dataset '{uri}' has no {MANIFEST}" + _dataset_hint(fs, path, loc.uri)
        )
    manifest = _read_manifest(fs, f"{path}/{MANIFEST}", f"{uri}/{MANIFEST}")
    ds = DatasetVersion(uri=loc.uri, manifest=manifest, _fs=fs, _path=path)
    for fname, meta in manifest["files"].items():
        fpath = ds.file_path(fname)
        shown = fname if not meta.get("ref") else f"{fname} (shared: {meta['ref']})"
        try:
            finfo = fs.get_file_info(fpath)
        except OSError as e:
            raise s3_error(e, loc, "read") from e
        if finfo.type != pafs.FileType.File:
            raise FeatureStoreError(
                f"{uri}: file {shown} listed in the manifest is missing; restore it or re-import"
            )
        if finfo.size != meta["bytes"]:
            raise FeatureStoreError(
                f"{uri}: {shown} has {finfo.size} bytes, manifest says {meta['bytes']}; "
                "the version was modified after it was written, re-import it"
            )
        if verify:
            h = hashlib.sha256()
            with fs.open_input_stream(fpath) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise FeatureStoreError(
                    f"{uri}: {shown} checksum mismatch against {MANIFEST}; "
                    "the version was modified after it was written, re-import it"
                )
    return ds
