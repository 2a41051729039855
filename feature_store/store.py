"""Versioned datasets: ``<store>/<name>/v<N>/{train,valid,test}.parquet`` + ``manifest.json``.

A version is written under a temporary name and renamed into place only when complete, so a
failed or interrupted write never leaves a partial version behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from feature_store import schema as S
from feature_store.errors import FeatureStoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "rshnl-feature-store/1"
_VERSION_RE = re.compile(r"^v(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        return None
    return Path(uri)


def _next_version(dataset_dir: Path) -> int:
    versions = [
        int(m.group(1))
        for p in (dataset_dir.iterdir() if dataset_dir.exists() else [])
        if (m := _VERSION_RE.match(p.name))
    ]
    return max(versions, default=0) + 1


def write_dataset(
    store: str,
    name: str,
    splits: dict[str, S.SplitArrays],
    *,
    source: dict[str, Any],
    noise: dict[str, Any],
    label_kind: str = "single",
    protocol: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    version: int | None = None,
) -> str:
    """Validate and write a new immutable version; return its URI (an absolute path)."""
    root = _local_path(store)
    if root is None:
        raise FeatureStoreError(f"store '{store}': only local stores can be written to for now")
    if not _NAME_RE.match(name):
        raise FeatureStoreError(f"dataset name '{name}' must match {_NAME_RE.pattern}")
    S.validate_splits(splits, source=str(source.get("path", name)), label_kind=label_kind)

    dataset_dir = root.resolve() / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    number = version if version is not None else _next_version(dataset_dir)
    final = dataset_dir / f"v{number}"
    if final.exists():
        raise FeatureStoreError(
            f"version {final} already exists; versions are immutable, write a new one "
            "(omit --version) or choose another name"
        )
    tmp = dataset_dir / f".v{number}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, Any] = {}
        for split in S.SPLITS:
            fname = f"{split}.parquet"
            table = splits[split].to_table(split)
            pq.write_table(table, tmp / fname, row_group_size=65536)
            files[fname] = {
                "sha256": _sha256_file(tmp / fname),
                "bytes": (tmp / fname).stat().st_size,
                "rows": table.num_rows,
            }
        train = splits["train"]
        manifest = {
            "format": FORMAT,
            "name": name,
            "version": number,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "schema": {f.name: str(f.type) for f in splits["train"].to_table("train").schema},
            "dims": {"image": int(train.image.shape[1]), "text": int(train.text.shape[1])},
            "num_classes": int(train.label.shape[1]),
            "class_names": class_names,
            "label_kind": label_kind,
            "counts": {s: len(splits[s]) for s in S.SPLITS},
            "noise": noise,
            "protocol": protocol or {},
            "source": source,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(tmp, final)  # atomic on one filesystem; fails if another writer took the name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote dataset %s/v%d (%s)", name, number, manifest["counts"])
    return str(final)


@dataclass
class DatasetVersion:
    """A verified, read-only dataset version."""

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
    def data_version(self) -> str:
        """Short stable identifier: name, version and a digest of the file checksums."""
        digest = hashlib.sha256(
            json.dumps(self.manifest["files"], sort_keys=True).encode()
        ).hexdigest()[:12]
        return f"{self.manifest['name']}/v{self.manifest['version']}@{digest}"

    def split_uri(self, split: str) -> str:
        self._check_split(split)
        return self.uri.rstrip("/") + f"/{split}.parquet"

    def read_table(self, split: str, columns: list[str] | tuple[str, ...]) -> pa.Table:
        self._check_split(split)
        with self._fs.open_input_file(f"{self._path}/{split}.parquet") as f:
            return pq.read_table(f, columns=list(columns))

    def read_arrays(
        self, split: str, columns: list[str] | tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Columns of one split as NumPy arrays (vectors as 2-D arrays)."""
        table = self.read_table(split, columns)
        out: dict[str, np.ndarray] = {}
        for col in columns:
            arr = table.column(col).combine_chunks()
            if pa.types.is_fixed_size_list(arr.type):
                out[col] = arr.values.to_numpy(zero_copy_only=False).reshape(
                    len(arr), arr.type.list_size
                )
            else:
                out[col] = arr.to_numpy(zero_copy_only=False)
        return out

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["counts"]:
            raise FeatureStoreError(
                f"{self.uri}: no split '{split}' (has {sorted(self.manifest['counts'])})"
            )


def open_dataset(uri: str, *, verify: bool = True) -> DatasetVersion:
    """Open a dataset version and (by default) verify every file against its manifest checksum."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
    except (pa.ArrowInvalid, OSError) as e:
        raise FeatureStoreError(f"dataset URI '{uri}' cannot be opened: {e}") from e
    path = path.rstrip("/")
    info = fs.get_file_info(f"{path}/{MANIFEST}")
    if info.type != pafs.FileType.File:
        raise FeatureStoreError(
            f"dataset '{uri}' has no {MANIFEST}; pass the URI of a version directory "
            "(e.g. STORE/NAME/v1) as printed by `python -m jobs.ingest`"
        )
    with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
        try:
            manifest = json.loads(f.read().decode())
        except json.JSONDecodeError as e:
            raise FeatureStoreError(f"{uri}/{MANIFEST} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise FeatureStoreError(
            f"{uri}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    for fname, meta in manifest["files"].items():
        finfo = fs.get_file_info(f"{path}/{fname}")
        if finfo.type != pafs.FileType.File:
            raise FeatureStoreError(f"{uri}: file {fname} listed in the manifest is missing")
        if finfo.size != meta["bytes"]:
            raise FeatureStoreError(
                f"{uri}: {fname} has {finfo.size} bytes, manifest says {meta['bytes']}; "
                "the version was modified after it was written, re-import it"
            )
        if verify:
            h = hashlib.sha256()
            with fs.open_input_stream(f"{path}/{fname}") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise FeatureStoreError(
                    f"{uri}: {fname} checksum mismatch against {MANIFEST}; "
                    "the version was modified after it was written, re-import it"
                )
    display = uri if "://" in uri else os.path.abspath(uri)
    return DatasetVersion(uri=display, manifest=manifest, _fs=fs, _path=path)
