"""Shared fixtures: small datasets written by the project's own importers, and one Ray cluster."""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic_util import write_synthetic

S3_REGION = "us-east-1"
REPO = Path(__file__).resolve().parent.parent
WIKI_MAT = Path(
    os.environ.get("RSHNL_WIKI_MAT", REPO.parent / "shared" / "datasets" / "wikipedia" / "wiki.mat")
)


@pytest.fixture(scope="session")
def wiki_mat() -> Path:
    if not WIKI_MAT.is_file():
        pytest.skip(f"real Wikipedia file not present at {WIKI_MAT} (../shared is absent)")
    return WIKI_MAT


_TINY = {
    "num_classes": 6,
    "counts": {"train": 192, "valid": 48, "test": 48},
    "image_dim": 24,
    "text_dim": 16,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small noisy synthetic dataset (single-label, 6 classes)."""
    return write_synthetic(
        tmp_path_factory.mktemp("store"), "tiny", noise=("symmetric", 0.4, 1), seed=3, **_TINY
    )


@pytest.fixture(scope="session")
def tiny_clean(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small clean synthetic dataset (single-label, 6 classes) for making noisy copies of."""
    return write_synthetic(tmp_path_factory.mktemp("clean-store"), "clean", seed=4, **_TINY)


# the session's local Ray: logical CPUs above the worker count (Ray Data needs some)
SESSION_RAY = {
    "num_cpus": 4,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(**SESSION_RAY)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free local port with one IAM user whose key may use S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=S3_REGION,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="feature-store")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="feature-store", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="feature-store")["AccessKey"]
        # from now on every request must be signed with a known key
        req = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=30).read()
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_S3_REGION": S3_REGION,
        }
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> Iterator[tuple[str, object]]:
    """The AWS variables set for one test, and a fresh bucket; yields (bucket, boto3 client)."""
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_S3_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.items():
        monkeypatch.setenv(var, value)
    bucket = f"fs-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=S3_REGION)
    client.create_bucket(Bucket=bucket)
    yield bucket, client
