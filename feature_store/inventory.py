"""What a store holds: versions per dataset with their summaries, unreadable manifests, stale
writes, and garbage collection of writes that never committed."""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.location import check_s3_access, resolve, s3_error
from feature_store.reading import _read_manifest
from feature_store.staging import (
    _NAME_RE,
    _TMP_RE,
    CLAIM,
    MANIFEST,
    _exists,
    _raise_write_error,
    _versions,
)

log = logging.getLogger(__name__)


DEFAULT_GC_HOURS = 24.0


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
