"""The store on S3, against a live S3-compatible server (moto in server mode) on 127.0.0.1.

The server enforces credentials: a user with an access key is created through its IAM API, then
authentication is switched on, so a wrong secret is rejected the way a real endpoint rejects it.
Endpoint, region and credentials reach the code only through the standard AWS variables.
"""

from __future__ import annotations

import numpy as np
import pytest

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.plan import GeneratedFeatures
from feature_store.store import list_versions, open_dataset, write_noisy_copy, write_version
from feature_store.synthetic import generate_plan
from jobs.ingest import main as ingest_main
from pipeline.training.data import ray_dataset

REGION = "us-east-1"


def _keys(client, bucket: str) -> list[str]:
    out = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in out)


def _plan(seed: int = 0):
    return generate_plan(
        num_classes=4,
        counts={"train": 50, "valid": 10, "test": 14},
        image_dim=5,
        text_dim=3,
        seed=seed,
    )


def test_write_open_read_and_list_on_s3(s3, tmp_path):
    bucket, client = s3
    uri = write_version(f"s3://{bucket}/store", "syn", _plan(), rows_per_group=16)
    assert uri == f"s3://{bucket}/store/syn/v1"
    assert _keys(client, bucket) == [
        f"store/syn/v1/{f}"
        for f in ("manifest.json", "test.parquet", "train.parquet", "valid.parquet")
    ]  # the claim object is gone after the commit
    ds = open_dataset(uri)
    assert ds.split_uri("train") == f"{uri}/train.parquet"
    local = open_dataset(write_version(str(tmp_path), "syn", _plan(), rows_per_group=16))
    for split in ("train", "test"):
        a = ds.read_arrays(split, [S.ITEM_ID, S.IMAGE, S.LABEL])
        b = local.read_arrays(split, [S.ITEM_ID, S.IMAGE, S.LABEL])
        for col in a:
            np.testing.assert_array_equal(a[col], b[col])
    assert ds.manifest["files"] == local.manifest["files"]  # byte-identical files
    assert [b.num_rows for b in ds.iter_batches("train", [S.IMAGE], None)] == [16, 16, 16, 2]
    rows = list_versions(f"s3://{bucket}/store")
    assert [(r["name"], r["version"], r["uri"]) for r in rows] == [("syn", 1, uri)]


def test_noisy_copy_on_s3_shares_the_features(s3):
    bucket, client = s3
    base = write_version(f"s3://{bucket}/st", "syn", _plan())
    copy = write_noisy_copy(base, mode="symmetric", rate=0.5, seed=1)
    assert copy == f"s3://{bucket}/st/syn/v2"
    assert [k for k in _keys(client, bucket) if k.startswith("st/syn/v2/")] == [
        "st/syn/v2/manifest.json",
        "st/syn/v2/train.labels.parquet",
    ]
    c = open_dataset(copy)
    assert c.split_uri("test") == f"{base}/test.parquet"
    arr = c.read_arrays("train", [S.IMAGE, S.LABEL, S.CLEAN_LABEL, S.IS_NOISY])
    np.testing.assert_array_equal(
        arr[S.IMAGE], open_dataset(base).read_arrays("train", [S.IMAGE])[S.IMAGE]
    )
    assert arr[S.IS_NOISY].sum() == c.manifest["noise"]["num_noisy"] > 0


def test_missing_bucket_is_one_clear_error(s3):
    _, client = s3
    before = sorted(b["Name"] for b in client.list_buckets()["Buckets"])
    with pytest.raises(
        FeatureStoreError, match=r"S3 bucket 'no-such-bucket-x' does not exist"
    ) as e:
        write_version("s3://no-such-bucket-x/store", "syn", _plan())
    assert "create the bucket or fix the URI" in str(e.value)
    with pytest.raises(FeatureStoreError, match="does not exist"):
        open_dataset("s3://no-such-bucket-x/store/syn/v1")
    assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == before


def test_rejected_credentials_are_one_clear_error(s3, monkeypatch):
    bucket, client = s3
    uri = write_version(f"s3://{bucket}/store", "syn", _plan())
    before = _keys(client, bucket)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(FeatureStoreError, match=r"rejected the credentials for bucket") as e:
        write_version(f"s3://{bucket}/store", "syn", _plan())
    assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(e.value)
    with pytest.raises(FeatureStoreError, match="rejected the credentials"):
        open_dataset(uri)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(FeatureStoreError, match="InvalidAccessKeyId"):
        list_versions(f"s3://{bucket}/store")
    assert _keys(client, bucket) == before


def test_existing_version_and_failed_write_leave_the_bucket_as_it_was(s3):
    bucket, client = s3
    write_version(f"s3://{bucket}/store", "syn", _plan())
    before = _keys(client, bucket)
    with pytest.raises(FeatureStoreError, match="already exists; versions are immutable"):
        write_version(f"s3://{bucket}/store", "syn", _plan(), version=1)
    plan = _plan(seed=1)
    good = plan.splits["test"].features

    def make(a: int, b: int):
        img, txt = next(good.slice(a, b).chunks(b - a))
        if a <= 9 < b:
            txt = txt.copy()
            txt[9 - a, 0] = np.nan
        return img, txt

    plan.splits["test"].features = GeneratedFeatures(make, 14, 5, 3)
    with pytest.raises(FeatureStoreError, match=r"column 'text' has a NaN/Inf value at row 9"):
        write_version(f"s3://{bucket}/store", "syn", plan, rows_per_group=4)
    assert _keys(client, bucket) == before  # train/valid objects and the claim were removed


def test_ingest_cli_writes_to_s3(s3, capsys):
    bucket, _ = s3
    code = ingest_main(
        [
            "synthetic",
            "--store",
            f"s3://{bucket}/cli",
            "--name",
            "demo",
            "--train",
            "40",
            "--valid",
            "8",
            "--test",
            "8",
            "--noise-rate",
            "0.25",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[-1] == f"s3://{bucket}/cli/demo/v1"
    assert ingest_main(["list", f"s3://{bucket}/cli"]) == 0
    listed = capsys.readouterr().out
    assert "demo/v1\tsingle\ttrain=40 valid=8 test=8\tsymmetric@0.25 seed 0" in listed


@pytest.mark.slow
@pytest.mark.ray
def test_ray_reads_a_noisy_copy_from_s3(s3):
    """Ray Data reads through the version's own filesystem (workers need no AWS variables)."""
    import ray

    bucket, _ = s3
    base = write_version(f"s3://{bucket}/st", "syn", _plan())
    copy = open_dataset(write_noisy_copy(base, mode="symmetric", rate=0.5, seed=1))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = ray_dataset(copy, "train", S.TRAINING_COLUMNS).take_all()
    finally:
        if started:
            ray.shutdown()
    assert sorted(rows[0]) == sorted(S.TRAINING_COLUMNS)
    expect = copy.read_arrays("train", [S.ITEM_ID, S.LABEL])
    got = {int(r[S.ITEM_ID]): np.asarray(r[S.LABEL]) for r in rows}
    assert len(got) == 50
    for i, lab in zip(expect[S.ITEM_ID], expect[S.LABEL], strict=True):
        assert (got[int(i)] == lab).all()


def test_an_uncommitted_version_is_listed_and_collected(s3):
    """A writer killed after its claim and one data file: no manifest, no version; gc removes it."""
    from feature_store.store import collect_garbage, scan_store

    bucket, client = s3
    write_version(f"s3://{bucket}/store", "syn", _plan())
    committed = _keys(client, bucket)
    client.put_object(Bucket=bucket, Key="store/syn/v2/.writing", Body=b"{}")
    client.put_object(Bucket=bucket, Key="store/syn/v2/train.parquet", Body=b"x" * 100)
    scan = scan_store(f"s3://{bucket}/store")
    assert [v["version"] for v in scan.versions] == [1] and scan.unreadable == []
    assert [(s["uri"], s["kind"], s["bytes"]) for s in scan.stale] == [
        (f"s3://{bucket}/store/syn/v2", "uncommitted version", 102)
    ]
    assert collect_garbage(f"s3://{bucket}/store") == []  # active within the grace period
    removed = collect_garbage(f"s3://{bucket}/store", older_than_hours=0)
    assert [r["uri"] for r in removed] == [f"s3://{bucket}/store/syn/v2"]
    # pyarrow keeps the parent "directory" as an empty marker object
    assert [k for k in _keys(client, bucket) if not k.endswith("/")] == committed
    assert [v["version"] for v in scan_store(f"s3://{bucket}/store").versions] == [1]
