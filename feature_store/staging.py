"""Staging and committing a version: the target check, the version number, the temporary
directory or S3 claim, checksummed file writes, and the commit.

Versions are immutable. Locally a version is written into ``NAME/.vN.tmp-XXXX/`` and renamed to
``vN`` only when complete (atomic on one filesystem). On S3, where there is no rename, the writer
first claims ``vN`` with a conditional PUT of ``vN/.writing``, writes the data files, and commits by
a conditional PUT of ``manifest.json`` (``If-None-Match: *``); a version without a manifest is not
a version, and any failure deletes what was written, so the store is left as it was.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from feature_store.errors import FeatureStoreError
from feature_store.location import Location, check_s3_access, resolve, s3_client, s3_error

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


FORMAT = "rshnl-feature-store/2"


READABLE_FORMATS = ("rshnl-feature-store/1", FORMAT)


CLAIM = ".writing"


_VERSION_RE = re.compile(r"^v(\d+)$")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


_TMP_RE = re.compile(r"^\.v\d+\.tmp-[0-9a-f]{8}$")  # a local write in progress (or a killed one)


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

    @contextmanager
    def writing(self) -> Iterator[_Staging]:
        """Any error inside removes the version being written; storage errors become one line."""
        try:
            yield self
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and self.store.is_s3 and _is_s3_error(e):
                raise s3_error(e, self.store, "write to") from e
            if isinstance(e, OSError):
                _raise_write_error(e, self.store)
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
