"""Reading a version: the manifest and its checks, :class:`DatasetVersion` (tables, arrays,
batches and Parquet scans of a split, with a noisy copy's label overlay joined by item id), and
:func:`open_dataset`, which verifies every file against the manifest before any work."""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.location import Location, check_s3_access, resolve, s3_error
from feature_store.staging import _VERSION_RE, CLAIM, MANIFEST, READABLE_FORMATS, _exists, _versions

log = logging.getLogger(__name__)


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
