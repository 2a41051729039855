"""Where a store lives: a local directory or an ``s3://bucket/prefix``, behind a pyarrow filesystem.

S3 settings come from the standard AWS environment, so MinIO or any S3-compatible endpoint works:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for the endpoint, ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` for the region, and the usual credential chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ...) resolved through boto3.
The pyarrow filesystem is built with the endpoint, region and static keys spelled out, so it
pickles with them to Ray workers that were started before the variables were set; credentials
that expire (instance roles, SSO, assumed roles) are left to pyarrow's own refreshing chain.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from feature_store.errors import FeatureStoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    """A store root, dataset or version: ``path`` is what the filesystem expects (no scheme)."""

    uri: str  # what users see: an absolute local path or s3://bucket/key
    path: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """The object key prefix inside the bucket (S3 only)."""
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @cached_property
    def fs(self) -> pafs.FileSystem:
        return s3_filesystem() if self.is_s3 else pafs.LocalFileSystem()

    def child(self, *parts: str) -> Location:
        """A location below this one."""
        path = posixpath.join(self.path, *parts)
        if self.is_s3:
            return Location(uri=f"s3://{path}", path=path)
        return Location(uri=path, path=path)

    def parent(self) -> Location:
        path = posixpath.dirname(self.path.rstrip("/"))
        return Location(uri=f"s3://{path}" if self.is_s3 else path, path=path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))


def resolve(uri: str) -> Location:
    """A local path, ``file://`` URI or ``s3://bucket/prefix`` as a Location."""
    if not uri:
        raise FeatureStoreError(
            "empty store/dataset URI; pass a local directory or s3://bucket/..."
        )
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise FeatureStoreError(f"'{uri}' names no bucket; use s3://BUCKET/PREFIX")
        path = (parsed.netloc + "/" + parsed.path.strip("/")).rstrip("/")
        return Location(uri=f"s3://{path}", path=path)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise FeatureStoreError(
            f"'{uri}': scheme '{scheme}' is not supported; use a local path or s3://BUCKET/PREFIX"
        )
    path = str(Path(uri).expanduser().resolve())
    return Location(uri=path, path=path)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region(session: Any) -> str:
    return (
        os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or session.region_name
        or "us-east-1"
    )


_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


_STATIC_CREDENTIALS = ("env", "explicit", "shared-credentials-file", "config-file")


def _env_key() -> tuple[str | None, ...]:
    return tuple(os.environ.get(k) for k in _ENV_KEYS)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the AWS environment (values spelled out)."""
    return _s3_filesystem(_env_key())


def s3_client() -> Any:
    """A boto3 S3 client configured from the same environment."""
    return _s3_client(_env_key())


@lru_cache(maxsize=8)
def _s3_filesystem(_env: tuple[str | None, ...]) -> pafs.S3FileSystem:
    import boto3

    session = boto3.session.Session()
    creds = session.get_credentials()
    kwargs: dict[str, Any] = {"region": _region(session)}
    # static keys are spelled out (so the filesystem pickles with them to Ray workers); keys
    # that expire (instance roles, SSO, assumed roles) are left to pyarrow's own refreshing chain
    if creds is not None and getattr(creds, "method", "") in _STATIC_CREDENTIALS:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=8)
def _s3_client(_env: tuple[str | None, ...]) -> Any:
    import boto3

    session = boto3.session.Session()
    return session.client("s3", region_name=_region(session), endpoint_url=_endpoint())


def s3_error(e: Exception, loc: Location, action: str) -> FeatureStoreError:
    """A boto3 or pyarrow S3 failure as one clear error saying what to do."""
    code, status = "", 0
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    text = f"{code} {e}"
    endpoint = _endpoint() or "the default AWS endpoint"
    if code in ("NoSuchBucket", "404") or "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return FeatureStoreError(
            f"S3 bucket '{loc.bucket}' does not exist at {endpoint} ({action} {loc.uri}); "
            "create the bucket or fix the URI / AWS_ENDPOINT_URL"
        )
    if (
        code
        in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken")
        or status == 403
        or "ACCESS_DENIED" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
    ):
        return FeatureStoreError(
            f"S3 at {endpoint} rejected the credentials for bucket '{loc.bucket}' ({action} "
            f"{loc.uri}: {code or 'access denied'}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy"
        )
    return FeatureStoreError(
        f"S3 request failed while trying to {action} {loc.uri} at {endpoint}: {e}; check the "
        "endpoint (AWS_ENDPOINT_URL), region and network"
    )


def check_s3_access(loc: Location, action: str) -> None:
    """Fail fast, before any work, when the bucket is missing or the credentials are refused."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
    except (ClientError, BotoCoreError) as e:
        raise s3_error(e, loc, action) from e
