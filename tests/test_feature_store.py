"""Feature store: the Wikipedia importer on the real file, versions, manifests and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.formats import read_wiki_mat
from feature_store.noise import apply_noise, symmetric_noise
from feature_store.store import open_dataset, write_dataset
from feature_store.synthetic import generate


def _write(store: Path, name: str = "d", **gen) -> str:
    splits, meta = generate(
        num_classes=4, counts={"train": 40, "valid": 10, "test": 10}, image_dim=6, text_dim=5, **gen
    )
    noise = apply_noise(splits["train"], "symmetric", 0.5, seed=0)
    return write_dataset(str(store), name, splits, source=meta["source"], noise=noise)


def test_wiki_importer_on_real_file(wiki_mat, tmp_path):
    splits, meta = read_wiki_mat(wiki_mat)
    assert {s: len(splits[s]) for s in S.SPLITS} == {"train": 2173, "valid": 231, "test": 462}
    raw = sio.loadmat(str(wiki_mat))["data"][0, 0]
    first_test = int(raw["split"][0, 0]["ind_test"].ravel()[0]) - 1
    assert splits["valid"].item_id[0] == first_test  # first 231 test items are the validation split
    np.testing.assert_allclose(splits["valid"].image[0], raw["X1"][:, first_test], rtol=1e-6)
    assert splits["train"].image.shape[1] == 128 and splits["train"].text.shape[1] == 100
    assert splits["train"].label.shape[1] == 10
    assert (splits["train"].label.sum(axis=1) == 1).all()
    noise = apply_noise(splits["train"], "symmetric", 0.4, seed=7)
    uri = write_dataset(
        str(tmp_path), "wiki", splits, source=meta["source"], noise=noise, protocol=meta["protocol"]
    )
    ds = open_dataset(uri)
    m = ds.manifest
    assert m["counts"] == {"train": 2173, "valid": 231, "test": 462}
    assert m["dims"] == {"image": 128, "text": 100} and m["num_classes"] == 10
    assert m["source"]["sha256"] == (
        "e417067eb501fbb41375b4461469089c9f0332ff9cdaf3b5f6570bbf0078d97c"
    )
    assert m["protocol"]["valid_from_test"] == 231
    assert m["noise"]["num_resampled"] == round(0.4 * 2173)
    flags = ds.read_arrays("train", [S.IS_NOISY, S.LABEL, S.CLEAN_LABEL])
    assert flags[S.IS_NOISY].sum() == m["noise"]["num_noisy"]
    assert (flags[S.IS_NOISY] == (flags[S.LABEL] != flags[S.CLEAN_LABEL]).any(axis=1)).all()
    # the realised share of wrong labels is close to rate·(K−1)/K
    assert abs(flags[S.IS_NOISY].mean() - 0.4 * 0.9) < 0.03


def test_symmetric_noise_is_seeded_and_recorded():
    clean = np.eye(5, dtype=np.uint8)[np.arange(1000) % 5]
    a, spec_a = symmetric_noise(clean, 0.6, seed=3)
    b, _ = symmetric_noise(clean, 0.6, seed=3)
    c, _ = symmetric_noise(clean, 0.6, seed=4)
    assert (a == b).all() and not (a == c).all()
    assert spec_a["num_resampled"] == 600
    assert spec_a["num_noisy"] == int((a != clean).any(axis=1).sum())
    assert (a.sum(axis=1) == 1).all()
    with pytest.raises(FeatureStoreError, match="outside"):
        symmetric_noise(clean, 1.5, seed=0)


def test_versions_are_immutable_and_numbered(tmp_path):
    u1 = _write(tmp_path)
    u2 = _write(tmp_path)
    assert u1.endswith("/d/v1") and u2.endswith("/d/v2")
    splits, meta = generate(num_classes=3, counts={"train": 5, "valid": 5, "test": 5})
    with pytest.raises(FeatureStoreError, match="already exists"):
        write_dataset(str(tmp_path), "d", splits, source=meta["source"], noise={}, version=1)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["v1", "v2"]


def test_reader_refuses_modified_files(tmp_path):
    uri = _write(tmp_path)
    ds = open_dataset(uri)
    assert ds.data_version.startswith("d/v1@")
    f = Path(uri) / "valid.parquet"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError, match="checksum mismatch"):
        open_dataset(uri)
    with pytest.raises(FeatureStoreError, match=r"no manifest\.json"):
        open_dataset(str(tmp_path / "d"))


def test_training_columns_exclude_measurement_columns():
    assert not set(S.TRAINING_COLUMNS) & set(S.MEASUREMENT_COLUMNS)


def _assert_no_partial(store: Path):
    leftovers = [p for p in store.rglob("*") if p.name.startswith(".v") or p.name.startswith("v")]
    assert leftovers == []


def test_nan_features_are_refused_without_partial_version(tmp_path):
    splits, meta = generate(num_classes=3, counts={"train": 20, "valid": 5, "test": 5})
    splits["train"].text[7, 2] = np.nan
    with pytest.raises(FeatureStoreError, match=r"'text'.*NaN/Inf.*row 7"):
        write_dataset(str(tmp_path), "bad", splits, source=meta["source"], noise={})
    _assert_no_partial(tmp_path)


def test_bad_labels_duplicates_and_empty_splits_are_refused(tmp_path):
    splits, meta = generate(num_classes=3, counts={"train": 20, "valid": 5, "test": 5})
    splits["train"].label[3] = 0
    with pytest.raises(FeatureStoreError, match=r"row 3.*0 labels"):
        write_dataset(str(tmp_path), "bad", splits, source=meta["source"], noise={})
    splits, meta = generate(num_classes=3, counts={"train": 20, "valid": 5, "test": 5})
    splits["valid"].item_id[0] = splits["train"].item_id[0]
    with pytest.raises(FeatureStoreError, match="duplicate item_id"):
        write_dataset(str(tmp_path), "bad", splits, source=meta["source"], noise={})
    splits, meta = generate(num_classes=3, counts={"train": 20, "valid": 0, "test": 5})
    with pytest.raises(FeatureStoreError, match="'valid' is empty"):
        write_dataset(str(tmp_path), "bad", splits, source=meta["source"], noise={})
    _assert_no_partial(tmp_path)


def test_missing_file_and_wrong_mat_layout(tmp_path):
    with pytest.raises(FeatureStoreError, match="does not exist"):
        read_wiki_mat(tmp_path / "nope.mat")
    other = tmp_path / "other.mat"
    sio.savemat(str(other), {"features": np.zeros((3, 3))})
    with pytest.raises(FeatureStoreError, match=r"no variable 'data'.*features"):
        read_wiki_mat(other)
    partial = tmp_path / "partial.mat"
    sio.savemat(str(partial), {"data": {"X1": np.zeros((4, 3)), "Y": np.eye(3)}})
    with pytest.raises(FeatureStoreError, match=r"lacks field\(s\) \['X2', 'split'\]"):
        read_wiki_mat(partial)
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(FeatureStoreError, match="not a readable MATLAB"):
        read_wiki_mat(garbage)


def test_manifest_records_everything(tmp_path):
    uri = _write(tmp_path, seed=5, class_sep=1.0)
    m = json.loads((Path(uri) / "manifest.json").read_text())
    assert m["noise"]["mode"] == "symmetric" and m["noise"]["seed"] == 0
    assert m["source"]["params"]["seed"] == 5 and m["source"]["params"]["class_sep"] == 1.0
    assert set(m["files"]) == {"train.parquet", "valid.parquet", "test.parquet"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert m["schema"][S.LABEL].startswith("fixed_size_list<item: uint8>[4]")


def test_synthetic_is_deterministic_and_class_structured():
    a, _ = generate(seed=1, counts={"train": 300, "valid": 10, "test": 10})
    b, _ = generate(seed=1, counts={"train": 300, "valid": 10, "test": 10})
    assert np.array_equal(a["train"].image, b["train"].image)
    # nearest class mean classifies most training items: the classes carry signal
    x, y = a["train"].image, a["train"].clean_label.argmax(1)
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y).mean() > 0.6
