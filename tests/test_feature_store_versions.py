"""Noise models, noisy copies that share features, versions, streaming writes and listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.noise import asymmetric_noise, check_noise, multilabel_noise, parse_flip_map
from feature_store.plan import GeneratedFeatures
from feature_store.store import list_versions, open_dataset, write_noisy_copy, write_version
from feature_store.synthetic import generate, generate_plan

REPO = Path(__file__).resolve().parent.parent


def _small(label_kind: str = S.SINGLE, **kw):
    counts = (
        {"train": 60, "valid": 12, "test": 20}
        if label_kind == S.SINGLE
        else {"train": 60, "query": 12, "database": 30}
    )
    return generate_plan(
        num_classes=5, counts=counts, image_dim=6, text_dim=4, label_kind=label_kind, **kw
    )


# ----------------------------------------------------------------------------------------------
# Noise models
# ----------------------------------------------------------------------------------------------


def test_asymmetric_noise_flips_to_the_next_class_by_default():
    clean = np.eye(4, dtype=np.uint8)[np.arange(400) % 4]
    noisy, spec = asymmetric_noise(clean, 0.3, seed=2)
    changed = np.flatnonzero((noisy != clean).any(axis=1))
    assert spec["num_corrupted"] == 120 and spec["num_noisy"] == 120 == changed.size
    assert (noisy[changed].argmax(1) == (clean[changed].argmax(1) + 1) % 4).all()
    assert spec["flip_map"] == {"0": 1, "1": 2, "2": 3, "3": 0}
    again, _ = asymmetric_noise(clean, 0.3, seed=2)
    other, _ = asymmetric_noise(clean, 0.3, seed=3)
    assert (again == noisy).all() and not (other == noisy).all()


def test_asymmetric_noise_with_a_custom_map():
    clean = np.eye(3, dtype=np.uint8)[np.arange(300) % 3]
    noisy, spec = asymmetric_noise(clean, 1.0, seed=0, flip_map=parse_flip_map("0:2,1:0", 3))
    # class 2 is unmapped, so it keeps its label: only two thirds of the items change
    assert spec["num_corrupted"] == 300 and spec["num_noisy"] == 200
    assert (noisy[clean[:, 0] == 1].argmax(1) == 2).all()
    assert (noisy[clean[:, 2] == 1].argmax(1) == 2).all()
    with pytest.raises(FeatureStoreError, match=r"flip map entry '0:7'"):
        parse_flip_map("0:7", 3)
    with pytest.raises(FeatureStoreError, match="names class 1 twice"):
        parse_flip_map("1:0,1:2", 3)


def test_multilabel_noise_corrupts_exactly_the_rate_share():
    rng = np.random.default_rng(0)
    clean = (rng.random((500, 8)) < 0.3).astype(np.uint8)
    clean[np.arange(500), np.arange(500) % 8] = 1
    noisy, spec = multilabel_noise(clean, 0.4, seed=5)
    noisy_rows = (noisy != clean).any(axis=1)
    assert spec["num_corrupted"] == 200 == int(noisy_rows.sum()) == spec["num_noisy"]
    assert (noisy.sum(1) >= 1).all()
    assert (noisy.sum(1) == clean.sum(1)).all()  # one class swapped for another
    assert ((noisy != clean).sum(1)[noisy_rows] == 2).all()


def test_noise_requests_that_do_not_fit_the_data():
    with pytest.raises(FeatureStoreError, match="single-label data only; use --noise-mode multi"):
        check_noise("symmetric", 0.2, label_kind=S.MULTI, num_classes=5)
    with pytest.raises(FeatureStoreError, match="multilabel noise is for multi-label data"):
        check_noise("multilabel", 0.2, label_kind=S.SINGLE, num_classes=5)
    with pytest.raises(FeatureStoreError, match="outside"):
        check_noise("symmetric", -0.1, label_kind=S.SINGLE, num_classes=5)
    with pytest.raises(FeatureStoreError, match="only applies to --noise-mode asymmetric"):
        check_noise("symmetric", 0.1, label_kind=S.SINGLE, num_classes=5, flip_map={0: 1})


# ----------------------------------------------------------------------------------------------
# Noisy copies share the feature files
# ----------------------------------------------------------------------------------------------


def test_noisy_copy_points_at_the_same_feature_files(tmp_path):
    base_uri = write_version(str(tmp_path), "syn", _small(seed=1))
    copy_uri = write_noisy_copy(base_uri, mode="asymmetric", rate=0.5, seed=3)
    assert copy_uri == str(tmp_path / "syn" / "v2")
    # the copy holds its labels and manifest only: no feature file was copied
    assert sorted(p.name for p in Path(copy_uri).iterdir()) == [
        "manifest.json",
        "train.labels.parquet",
    ]
    base, copy = open_dataset(base_uri), open_dataset(copy_uri)
    assert copy.manifest["files"]["train.parquet"]["ref"] == "syn/v1/train.parquet"
    assert copy.manifest["base"]["data_version"] == base.data_version
    assert copy.data_version != base.data_version
    assert copy.manifest["noise"]["mode"] == "asymmetric" and copy.manifest["noise"]["rate"] == 0.5

    b = base.read_arrays("train", list(S.ALL_COLUMNS))
    c = copy.read_arrays("train", list(S.ALL_COLUMNS))
    np.testing.assert_array_equal(c[S.IMAGE], b[S.IMAGE])
    assert (c[S.ITEM_ID] == b[S.ITEM_ID]).all() and (c[S.CLEAN_LABEL] == b[S.CLEAN_LABEL]).all()
    assert c[S.IS_NOISY].sum() == 30 == copy.manifest["noise"]["num_noisy"]
    assert (c[S.IS_NOISY] == (c[S.LABEL] != c[S.CLEAN_LABEL]).any(axis=1)).all()
    assert not b[S.IS_NOISY].any()  # the base is untouched

    # streaming reads join the overlay the same way
    streamed = np.concatenate(
        [S.to_matrix(t.column(S.LABEL)) for t in copy.iter_batches("train", [S.LABEL], 16)]
    )
    assert (streamed == c[S.LABEL]).all()
    # a Parquet reader (Ray Data's) reads the shared file; the scan's join puts the copy's labels on
    scan = copy.parquet_scan("train", S.TRAINING_COLUMNS)
    assert scan.path.endswith("syn/v1/train.parquet") and scan.join is not None
    t = pq.read_table(scan.path, columns=scan.columns)
    joined = pa.concat_tables([scan.join(b) for b in t.slice(7).to_batches(max_chunksize=5)])
    assert joined.column_names == list(S.TRAINING_COLUMNS)
    assert (S.to_matrix(joined.column(S.LABEL)) == c[S.LABEL][7:]).all()
    assert (joined.column(S.ITEM_ID).to_numpy() == c[S.ITEM_ID][7:]).all()
    assert base.parquet_scan("train", S.TRAINING_COLUMNS).join is None
    # evaluation splits resolve to the base's files; the train split has no single file
    assert copy.split_uri("valid") == str(tmp_path / "syn" / "v1" / "valid.parquet")
    with pytest.raises(FeatureStoreError, match="label overlay on shared feature files"):
        copy.split_uri("train")


def test_copy_of_a_copy_draws_from_clean_labels_and_references_the_original(tmp_path):
    base_uri = write_version(str(tmp_path), "syn", _small(seed=1))
    c1 = write_noisy_copy(base_uri, mode="symmetric", rate=0.6, seed=0)
    c2 = write_noisy_copy(c1, mode="symmetric", rate=0.2, seed=0, name="syn-low")
    assert c2 == str(tmp_path / "syn-low" / "v1")
    m = open_dataset(c2).manifest
    assert m["files"]["train.parquet"]["ref"] == "syn/v1/train.parquet"
    assert "train.labels.parquet" in m["files"] and "ref" not in m["files"]["train.labels.parquet"]
    direct = write_noisy_copy(base_uri, mode="symmetric", rate=0.2, seed=0)
    a = open_dataset(c2).read_arrays("train", [S.LABEL])[S.LABEL]
    b = open_dataset(direct).read_arrays("train", [S.LABEL])[S.LABEL]
    assert (a == b).all()  # same noise as a copy made from the clean base: nothing compounds


def test_a_modified_base_makes_its_copies_unreadable(tmp_path):
    base_uri = write_version(str(tmp_path), "syn", _small(seed=1))
    copy_uri = write_noisy_copy(base_uri, mode=None, rate=0.3, seed=0)
    f = Path(base_uri) / "train.parquet"
    data = bytearray(f.read_bytes())
    data[200] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError, match=r"train.parquet \(shared: syn/v1/train.parquet\)"):
        open_dataset(copy_uri)


def test_multilabel_copy(tmp_path):
    base_uri = write_version(str(tmp_path), "ml", _small(S.MULTI, seed=4, max_labels=3))
    copy = open_dataset(write_noisy_copy(base_uri, mode=None, rate=0.25, seed=1))
    assert copy.manifest["noise"]["mode"] == "multilabel"
    assert copy.splits == ("train", "query", "database")
    flags = copy.read_arrays("train", [S.IS_NOISY])[S.IS_NOISY]
    assert flags.sum() == 15


# ----------------------------------------------------------------------------------------------
# Versions, manifests and streaming
# ----------------------------------------------------------------------------------------------


def test_failure_while_streaming_leaves_the_store_as_it_was(tmp_path):
    write_version(str(tmp_path), "syn", _small(seed=0))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    plan = _small(seed=0)
    good = plan.splits["test"].features

    def make(a: int, b: int):
        img, txt = next(good.slice(a, b).chunks(b - a))
        if a <= 13 < b:
            img = img.copy()
            img[13 - a, 2] = np.inf
        return img, txt

    plan.splits["test"].features = GeneratedFeatures(make, 20, 6, 4)
    with pytest.raises(
        FeatureStoreError, match=r"split 'test' column 'image' .*row 13 .*dimension 2"
    ):
        write_version(str(tmp_path), "syn", plan, rows_per_group=5)
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before  # the train and valid files already written were removed


def test_row_groups_bound_what_a_write_holds(tmp_path):
    uri = write_version(str(tmp_path), "syn", _small(seed=0), rows_per_group=7)
    ds = open_dataset(uri)
    meta = pq.ParquetFile(ds.file_path("train.parquet")).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [7] * 8 + [4]
    assert ds.manifest["rows_per_group"] == 7


def test_synthetic_data_does_not_depend_on_the_row_group_size(tmp_path):
    a = open_dataset(write_version(str(tmp_path), "a", _small(seed=9), rows_per_group=5))
    b = open_dataset(write_version(str(tmp_path), "b", _small(seed=9), rows_per_group=1000))
    for split in ("train", "test"):
        x = a.read_arrays(split, [S.IMAGE, S.TEXT, S.LABEL])
        y = b.read_arrays(split, [S.IMAGE, S.TEXT, S.LABEL])
        for col in x:
            np.testing.assert_array_equal(x[col], y[col])


def _nearest_mean_accuracy(x: np.ndarray, y: np.ndarray, k: int) -> float:
    means = np.stack([x[y == c].mean(0) for c in range(k)])
    return float((((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1) == y).mean())


def test_difficulty_knob_and_multi_label_mode():
    counts = {"train": 600, "valid": 10, "test": 10}
    easy, _ = generate(difficulty=0.1, counts=counts, seed=2)
    hard, meta = generate(difficulty=0.9, counts=counts, seed=2)
    assert meta["source"]["params"]["class_sep"] == pytest.approx(0.16)
    assert meta["source"]["params"]["modality_gap"] == pytest.approx(2.7)
    acc = {
        name: _nearest_mean_accuracy(d["train"].image, d["train"].clean_label.argmax(1), 10)
        for name, d in (("easy", easy), ("hard", hard))
    }
    assert acc["easy"] > 0.9 and acc["hard"] < 0.5
    multi, _ = generate(
        label_kind=S.MULTI, counts={"train": 300, "query": 20, "database": 50}, max_labels=4
    )
    n_labels = multi["train"].clean_label.sum(1)
    assert set(np.unique(n_labels)) == {1, 2, 3, 4}
    with pytest.raises(FeatureStoreError, match=r"difficulty 1\.5 is outside"):
        generate(difficulty=1.5)


def test_listing_versions_and_incomplete_writes(tmp_path):
    write_version(str(tmp_path), "syn", _small(seed=0))
    write_noisy_copy(str(tmp_path / "syn" / "v1"), mode="symmetric", rate=0.4, seed=7)
    write_version(str(tmp_path), "ml", _small(S.MULTI, seed=0))
    (tmp_path / "syn" / "v3").mkdir()  # a crashed writer's leftovers: no manifest
    rows = list_versions(str(tmp_path))
    assert [(r["name"], r["version"]) for r in rows] == [("ml", 1), ("syn", 1), ("syn", 2)]
    assert rows[2]["noise"] == {"mode": "symmetric", "rate": 0.4, "seed": 7}
    assert rows[2]["base"].startswith("syn/v1@") and rows[0]["label_kind"] == S.MULTI
    with pytest.raises(FeatureStoreError, match=r"dataset directory with versions v1, v2, v3"):
        open_dataset(str(tmp_path / "syn"))
    with pytest.raises(FeatureStoreError, match="incomplete"):
        open_dataset(str(tmp_path / "syn" / "v3"))
    # the next write skips the number the crashed writer took
    assert write_version(str(tmp_path), "syn", _small(seed=0)).endswith("/syn/v4")


def test_versions_written_before_split_layouts_are_still_readable(tmp_path):
    uri = write_version(str(tmp_path), "old", _small(seed=0))
    mpath = Path(uri) / "manifest.json"
    m = json.loads(mpath.read_text())
    for key in ("splits", "layout", "base", "rows_per_group"):
        m.pop(key)
    m["format"] = "rshnl-feature-store/1"
    mpath.write_text(json.dumps(m))
    ds = open_dataset(uri)
    assert ds.splits == ("train", "valid", "test")
    assert ds.read_arrays("valid", [S.LABEL])[S.LABEL].shape == (12, 5)


def test_unknown_columns_and_splits_are_named(tmp_path):
    ds = open_dataset(write_version(str(tmp_path), "syn", _small(seed=0)))
    with pytest.raises(FeatureStoreError, match=r"unknown column\(s\) \['labels'\]"):
        ds.read_table("train", ["labels"])
    with pytest.raises(
        FeatureStoreError, match=r"no split 'query' \(has \['train', 'valid', 'test'\]\)"
    ):
        ds.read_table("query", [S.LABEL])


PEAK_SCRIPT = r"""
import resource, sys
from feature_store.store import write_version, open_dataset
from feature_store.synthetic import generate_plan
from feature_store import schema as S
n, d, rows = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
plan = generate_plan(counts={"train": n, "valid": 500, "test": 500}, image_dim=d, text_dim=d)
uri = write_version(sys.argv[1], "big", plan, rows_per_group=rows)
write_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
total = sum(t.num_rows for t in open_dataset(uri).iter_batches("train", [S.IMAGE, S.TEXT]))
assert total == n
print(write_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_streaming_import_memory_stays_flat(tmp_path):
    """200,000 × 256-d (about 400 MB of features) imports and reads in well under that much RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), "200000", "256", "8192"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    write_peak, read_peak = (int(x) for x in r.stdout.split())
    features_mb = 200_000 * 512 * 4 / 2**20
    assert write_peak < features_mb and read_peak < features_mb, (write_peak, read_peak)
