"""Importers for every benchmark layout, each fed a small file the test writes in that layout.

MATLAB v5 files are written with SciPy; v7.3 files the way MATLAB writes them (HDF5 behind a
512-byte MATLAB header, every matrix stored transposed with a ``MATLAB_class`` attribute, cell
arrays as object references); the multi-label layout as Python code writes it with h5py.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io as sio

from feature_store import formats as F
from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.plain import plan_plain
from feature_store.store import open_dataset, write_version

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# Writers for the layouts (also used by tests/test_ingest.py)
# ----------------------------------------------------------------------------------------------


def _feats(n: int, d: int, offset: float) -> np.ndarray:
    """Rows whose first value encodes the row number, so tests can check alignment."""
    x = RNG.normal(size=(n, d))
    x[:, 0] = offset + np.arange(n)
    return x


def write_v73(path: Path, variables: dict[str, object]) -> None:
    """A MATLAB v7.3 file: HDF5 with MATLAB's header, matrices transposed, cells as references."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, value in variables.items():
            if isinstance(value, list):  # a 1×N cell array of matrices
                rs = []
                for i, el in enumerate(value):
                    ds = refs.create_dataset(f"{name}_{i}", data=np.asarray(el).T)
                    ds.attrs["MATLAB_class"] = np.bytes_("double")
                    rs.append(ds.ref)
                cell = f.create_dataset(name, data=np.array(rs, dtype=h5py.ref_dtype)[:, None])
                cell.attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                a = np.asarray(value)
                a = a.reshape(-1, 1) if a.ndim == 1 else a
                ds = f.create_dataset(name, data=a.T)
                ds.attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def write_mat(path: Path, variables: dict[str, object], v73: bool) -> Path:
    if v73:
        write_v73(path, variables)
    else:
        conv = {}
        for k, v in variables.items():
            if isinstance(v, list):
                cell = np.empty((1, len(v)), dtype=object)
                for i, el in enumerate(v):
                    cell[0, i] = el
                conv[k] = cell
            else:
                conv[k] = v
        sio.savemat(str(path), conv)
    return path


def wiki_deep_vars(n_train: int = 40, n_test: int = 30, k: int = 10) -> dict[str, object]:
    return {
        "train_imgs_deep": _feats(n_train, 12, 0),
        "train_texts_doc": _feats(n_train, 7, 1000),
        "train_imgs_labels": (np.arange(n_train) % k + 1).reshape(-1, 1),  # 1-based
        "test_imgs_deep": _feats(n_test, 12, 100),
        "test_texts_doc": _feats(n_test, 7, 1100),
        "test_imgs_labels": (np.arange(n_test) % k + 1).reshape(-1, 1),
    }


def xmedia_vars(n_train: int = 50, n_test: int = 30, k: int = 20) -> dict[str, object]:
    return {
        "I_tr_CNN": _feats(n_train, 16, 0),
        "I_te_CNN": _feats(n_test, 16, 100),
        "T_tr_BOW": _feats(n_train, 9, 1000),
        "T_te_BOW": _feats(n_test, 9, 1100),
        "trImgCat": (np.arange(n_train) % k + 1).reshape(-1, 1),
        "teImgCat": (np.arange(n_test) % k + 1).reshape(-1, 1),
    }


def inria_vars(k: int = 5) -> dict[str, object]:
    out: dict[str, object] = {}
    for p, n, off in (("tr", 30, 0), ("val", 10, 100), ("te", 12, 200)):
        out[f"{p}_img"] = _feats(n, 8, off)
        out[f"{p}_txt"] = _feats(n, 6, 1000 + off)
        out[f"{p}_img_lab"] = (np.arange(n) % k).reshape(1, -1)  # 0-based, 1×n
    return out


def xmedianet_vars(k: int = 8) -> dict[str, object]:
    out: dict[str, object] = {}
    for s, n, off in (("train", 32, 0), ("valid", 8, 100), ("test", 10, 200)):
        views = [_feats(n, 10, off), _feats(n, 6, 1000 + off), _feats(n, 3, 0)]
        out[s] = views  # image, text, and a third view the importer ignores
        out[f"{s}_labels"] = [
            (np.arange(n) % k).reshape(1, -1).astype(np.float64),
            (np.arange(n) % k).reshape(1, -1).astype(np.float64),
            (np.arange(n) % k).reshape(1, -1).astype(np.float64),
        ]
    return out


def write_multilabel_h5(path: Path, k: int = 6, sizes=(40, 12, 30)) -> Path:
    """The multi-label layout as written by Python (h5py, items as rows, multi-hot labels)."""
    with h5py.File(path, "w") as f:
        for (names, off), n in zip(
            (
                (("ImgTrain", "TagTrain", "LabTrain"), 0),
                (("ImgQuery", "TagQuery", "LabQuery"), 100),
                (("ImgDataBase", "TagDataBase", "LabDataBase"), 200),
            ),
            sizes,
            strict=True,
        ):
            f.create_dataset(names[0], data=_feats(n, 14, off).astype(np.float32))
            f.create_dataset(names[1], data=_feats(n, 5, 1000 + off).astype(np.float32))
            lab = (RNG.random((n, k)) < 0.3).astype(np.float64)
            lab[np.arange(n), np.arange(n) % k] = 1  # at least one class per item
            f.create_dataset(names[2], data=lab)
    return path


# ----------------------------------------------------------------------------------------------
# Each layout, v5 and v7.3
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_wiki_deep(tmp_path, v73):
    v = wiki_deep_vars()
    path = write_mat(tmp_path / "wiki_deep.mat", v, v73)
    plan = F.plan_wiki_deep(path, valid_from_test=10)
    assert list(plan.splits) == ["train", "valid", "test"]
    assert {s: len(sp) for s, sp in plan.splits.items()} == {"train": 40, "valid": 10, "test": 20}
    assert plan.protocol["valid_from_test"] == 10 and plan.protocol["label_base"] == 1
    assert plan.source["container"] == ("hdf5" if v73 else "mat-v5")
    arrays = plan.to_arrays()
    # test item 13 is the 4th row of the test split (the first 10 went to valid)
    np.testing.assert_allclose(arrays["test"].image[3], v["test_imgs_deep"][13], rtol=1e-6)
    np.testing.assert_allclose(arrays["test"].text[3], v["test_texts_doc"][13], rtol=1e-6)
    assert arrays["test"].label[3].argmax() == 13 % 10  # label 14 (1-based) is class 3
    assert arrays["valid"].item_id.tolist() == list(range(40, 50))  # running ids after train


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_xmedia(tmp_path, v73):
    v = xmedia_vars()
    plan = F.plan_xmedia(write_mat(tmp_path / "XMediaFeatures.mat", v, v73), valid_from_test=12)
    a = plan.to_arrays()
    assert plan.num_classes == 20 and plan.dims == {"image": 16, "text": 9}
    assert {s: len(x) for s, x in a.items()} == {"train": 50, "valid": 12, "test": 18}
    np.testing.assert_allclose(a["train"].image[:, 0], np.arange(50))
    np.testing.assert_allclose(a["valid"].text[:, 0], 1100 + np.arange(12))
    assert (a["train"].label.argmax(1) == np.arange(50) % 20).all()


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_inria_keeps_its_own_validation_split(tmp_path, v73):
    plan = F.plan_inria(write_mat(tmp_path / "INRIA-Websearch.mat", inria_vars(), v73))
    a = plan.to_arrays()
    assert {s: len(x) for s, x in a.items()} == {"train": 30, "valid": 10, "test": 12}
    assert plan.protocol["label_base"] == 0 and plan.num_classes == 5
    np.testing.assert_allclose(a["valid"].image[:, 0], 100 + np.arange(10))
    assert (a["test"].label.argmax(1) == np.arange(12) % 5).all()


@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_xmedianet_cells(tmp_path, v73):
    plan = F.plan_xmedianet(write_mat(tmp_path / "XMediaNet5View.mat", xmedianet_vars(), v73))
    a = plan.to_arrays()
    assert plan.dims == {"image": 10, "text": 6} and plan.num_classes == 8
    assert {s: len(x) for s, x in a.items()} == {"train": 32, "valid": 8, "test": 10}
    np.testing.assert_allclose(a["test"].image[:, 0], 200 + np.arange(10))
    np.testing.assert_allclose(a["test"].text[:, 0], 1200 + np.arange(10))


def test_multilabel_h5_streams_into_a_query_database_version(tmp_path):
    path = write_multilabel_h5(tmp_path / "mirflickr.h5")
    plan = F.plan_multilabel_h5(path, valid_from_query=4)
    assert plan.label_kind == S.MULTI
    assert list(plan.splits) == ["train", "valid", "query", "database"]
    uri = write_version(str(tmp_path / "store"), "mir", plan, rows_per_group=16)
    ds = open_dataset(uri)
    assert ds.splits == ("train", "valid", "query", "database")
    assert ds.manifest["counts"] == {"train": 40, "valid": 4, "query": 8, "database": 30}
    assert ds.manifest["protocol"]["valid_from_query"] == 4
    db = ds.read_arrays("database", [S.IMAGE, S.LABEL])
    with h5py.File(path) as f:
        np.testing.assert_allclose(db[S.IMAGE], f["ImgDataBase"][:], rtol=1e-6)
        assert (db[S.LABEL] == f["LabDataBase"][:]).all()
    assert (db[S.LABEL].sum(1) >= 1).all() and (db[S.LABEL].sum(1) > 1).any()
    # 40 train rows at 16 rows per group: three row groups, streamed one at a time
    assert pq.ParquetFile(ds.file_path("train.parquet")).num_row_groups == 3
    assert [b.num_rows for b in ds.iter_batches("train", [S.ITEM_ID, S.IMAGE])] == [16, 16, 8]
    with pytest.raises(FeatureStoreError, match="evaluated query against database"):
        ds.read_arrays("test", [S.LABEL])


# ----------------------------------------------------------------------------------------------
# Bad input in the layouts: one clear error naming the file and variable
# ----------------------------------------------------------------------------------------------

LAYOUTS = {
    "wiki-deep": (F.plan_wiki_deep, wiki_deep_vars, "test_texts_doc"),
    "xmedia": (F.plan_xmedia, xmedia_vars, "T_te_BOW"),
    "inria": (F.plan_inria, inria_vars, "val_img_lab"),
    "xmedianet": (F.plan_xmedianet, xmedianet_vars, "valid_labels"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("v73", [False, True], ids=["v5", "v7.3"])
def test_known_layout_with_one_missing_variable(tmp_path, layout, v73):
    plan, make, drop = LAYOUTS[layout]
    v = make()
    del v[drop]
    path = write_mat(tmp_path / f"{layout}.mat", v, v73)
    with pytest.raises(FeatureStoreError, match=rf"lacks variable\(s\) \['{drop}'\]") as e:
        plan(path)
    assert str(path) in str(e.value) and "export the complete file" in str(e.value)


def test_multilabel_h5_missing_variable(tmp_path):
    path = write_multilabel_h5(tmp_path / "nus.h5")
    with h5py.File(path, "a") as f:
        del f["TagQuery"]
    with pytest.raises(FeatureStoreError, match=r"lacks variable\(s\) \['TagQuery'\]"):
        F.plan_multilabel_h5(path)


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_hdf5_is_refused(tmp_path, cut):
    path = write_multilabel_h5(tmp_path / "coco.h5", sizes=(400, 50, 300))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(FeatureStoreError, match="truncated or damaged") as e:
        F.plan_multilabel_h5(path)
    assert str(path) in str(e.value) and "re-download or re-export" in str(e.value)


def test_truncated_v73_mat_is_refused(tmp_path):
    path = write_mat(tmp_path / "x.mat", xmedia_vars(400, 100), v73=True)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(FeatureStoreError, match="truncated or damaged"):
        F.plan_xmedia(path)


def test_labels_outside_the_class_range(tmp_path):
    v = xmedia_vars()
    v["teImgCat"] = v["teImgCat"].copy()
    v["teImgCat"][7] = 0  # 1-based categories: 0 is below the range
    path = write_mat(tmp_path / "x.mat", v, False)
    with pytest.raises(
        FeatureStoreError, match=r"variable 'teImgCat' row 7 has label 0, outside \[1, 20\]"
    ):
        F.plan_xmedia(path, label_base=1)
    v = inria_vars()
    path = write_mat(tmp_path / "i.mat", v, False)
    with pytest.raises(
        FeatureStoreError, match=r"'tr_img_lab' row 4 has label 4, outside \[0, 3\]"
    ):
        F.plan_inria(path, num_classes=4)
    v["te_img_lab"] = v["te_img_lab"].astype(np.float64)
    v["te_img_lab"][0, 2] = 1.5
    with pytest.raises(FeatureStoreError, match=r"'te_img_lab' row 2 has label 1.5, not a whole"):
        F.plan_inria(write_mat(tmp_path / "j.mat", v, False))


def test_feature_and_label_counts_must_agree(tmp_path):
    v = xmedia_vars()
    v["T_tr_BOW"] = v["T_tr_BOW"][:-1]
    with pytest.raises(FeatureStoreError, match=r"'I_tr_CNN' has 50 rows but .*'T_tr_BOW' has 49"):
        F.plan_xmedia(write_mat(tmp_path / "x.mat", v, False))
    v = xmedia_vars()
    v["trImgCat"] = v["trImgCat"][:-3]
    with pytest.raises(FeatureStoreError, match=r"'trImgCat' has 47 labels but the split has 50"):
        F.plan_xmedia(write_mat(tmp_path / "y.mat", v, False))


def test_not_a_mat_file(tmp_path):
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"\x00" * 300)
    with pytest.raises(FeatureStoreError, match="not a readable MATLAB"):
        F.plan_xmedia(bad)


# ----------------------------------------------------------------------------------------------
# Plain Parquet / CSV / NumPy inputs
# ----------------------------------------------------------------------------------------------


def _plain_table(n: int = 30, d_img: int = 6, d_txt: int = 4) -> dict[str, object]:
    split = np.array(["train"] * (n - 10) + ["valid"] * 4 + ["test"] * 6)
    return {
        "pid": np.arange(1000, 1000 + n),
        "part": split,
        "img": _feats(n, d_img, 0).astype(np.float32),
        "txt": _feats(n, d_txt, 500).astype(np.float32),
        "y": np.arange(n) % 3,
    }


def _to_parquet(path: Path, t: dict[str, object], *, vector_type: str = "fixed") -> Path:
    cols = {}
    for k, v in t.items():
        a = np.asarray(v)
        if a.ndim == 2:
            lists = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
            cols[k] = lists if vector_type == "fixed" else pa.array(a.tolist())
        else:
            cols[k] = pa.array(a.tolist())
    pq.write_table(pa.table(cols), path, row_group_size=7)
    return path


def test_plain_parquet_with_a_split_column(tmp_path):
    t = _plain_table()
    path = _to_parquet(tmp_path / "f.parquet", t)
    plan = plan_plain(
        [str(path)], image_col="img", text_col="txt", label_col="y", id_col="pid", split_col="part"
    )
    assert plan.label_kind == S.SINGLE and plan.num_classes == 3
    uri = write_version(str(tmp_path / "store"), "mine", plan, rows_per_group=8)
    ds = open_dataset(uri)
    test = ds.read_arrays("test", [S.ITEM_ID, S.IMAGE, S.TEXT, S.LABEL])
    assert test[S.ITEM_ID].tolist() == list(range(1024, 1030))
    np.testing.assert_allclose(test[S.IMAGE], t["img"][24:])
    np.testing.assert_allclose(test[S.TEXT], t["txt"][24:])
    assert (test[S.LABEL].argmax(1) == np.arange(24, 30) % 3).all()


def test_plain_csv_with_text_vectors_and_column_globs(tmp_path):
    t = _plain_table(n=20)
    lines = ["part,y," + ",".join(f"txt_{j}" for j in range(4)) + ",img"]
    for i in range(20):
        img = " ".join(f"{x:.6f}" for x in t["img"][i])
        txt = ",".join(f"{x:.6f}" for x in t["txt"][i])
        lines.append(f"{t['part'][i]},{t['y'][i]},{txt},[{img}]")
    path = tmp_path / "f.csv"
    path.write_text("\n".join(lines) + "\n")
    plan = plan_plain(
        [str(path)], image_col="img", text_col="txt_*", label_col="y", split_col="part"
    )
    a = plan.to_arrays()
    assert plan.dims == {"image": 6, "text": 4}
    np.testing.assert_allclose(a["train"].image, t["img"][:10], atol=1e-5)
    np.testing.assert_allclose(a["test"].text, t["txt"][14:], atol=1e-5)
    assert a["valid"].item_id.tolist() == [10, 11, 12, 13]  # row numbers of the file


def test_plain_multi_label_indices_and_one_file_per_split(tmp_path):
    files = []
    for split, n in (("train", 12), ("query", 4), ("database", 9)):
        labels = [" ".join(str(c) for c in sorted({i % 5, (i * 2 + 1) % 5})) for i in range(n)]
        t = {"image": _feats(n, 3, 0), "text": _feats(n, 2, 0), "tags": np.array(labels)}
        files.append(f"{split}={_to_parquet(tmp_path / f'{split}.parquet', t)}")
    plan = plan_plain(files, label_col="tags", label_format="indices")
    assert plan.label_kind == S.MULTI and list(plan.splits) == ["train", "query", "database"]
    lab = plan.splits["train"].clean_label
    assert lab.shape == (12, 5) and lab[0].tolist() == [1, 1, 0, 0, 0]
    assert plan.splits["database"].item_id[0] == 16  # numbered across files in input order


def test_plain_npz_and_npy_directory(tmp_path):
    n = 15
    arrays = {
        "image": _feats(n, 4, 0),
        "text": _feats(n, 3, 0),
        "label": np.eye(3, dtype=np.uint8)[np.arange(n) % 3],
        "split": np.array(["train"] * 9 + ["valid"] * 3 + ["test"] * 3),
    }
    np.savez(tmp_path / "d.npz", **arrays)
    a = plan_plain([str(tmp_path / "d.npz")]).to_arrays()
    np.testing.assert_allclose(a["valid"].image, arrays["image"][9:12], rtol=1e-6)
    d = tmp_path / "npy"
    d.mkdir()
    for k, v in arrays.items():
        np.save(d / f"{k}.npy", v)
    b = plan_plain([str(d)]).to_arrays()
    assert (b["test"].label == arrays["label"][12:]).all()


def test_plain_rows_with_different_vector_lengths(tmp_path):
    t = _plain_table()
    rows = t["img"].tolist()
    rows[17] = rows[17][:-1]  # one short vector
    t2 = dict(t)
    path = tmp_path / "ragged.parquet"
    pq.write_table(
        pa.table(
            {
                "part": pa.array(t2["part"].tolist()),
                "img": pa.array(rows),
                "txt": pa.array(t2["txt"].tolist()),
                "y": pa.array(t2["y"].tolist()),
            }
        ),
        path,
    )
    plan = plan_plain([str(path)], image_col="img", text_col="txt", label_col="y", split_col="part")
    store = tmp_path / "store"
    with pytest.raises(FeatureStoreError, match=r"column 'img' .*row 17 has 5 values, expected 6"):
        write_version(str(store), "r", plan)
    assert not store.exists()  # nothing left behind, not even the store directory


def test_plain_bad_inputs(tmp_path):
    t = _plain_table()
    path = _to_parquet(tmp_path / "f.parquet", t)
    kw = {"image_col": "img", "text_col": "txt", "label_col": "y", "split_col": "part"}
    with pytest.raises(FeatureStoreError, match=r"no column matching 'image'.*--image-col"):
        plan_plain([str(path)], **{**kw, "image_col": "image"})
    with pytest.raises(FeatureStoreError, match="no split column 'split'"):
        plan_plain([str(path)], **{**kw, "split_col": "split"})
    t2 = dict(t)
    t2["part"] = t["part"].copy()
    t2["part"][3] = "dev"
    with pytest.raises(FeatureStoreError, match=r"split value\(s\) \['dev'\]"):
        plan_plain([str(_to_parquet(tmp_path / "g.parquet", t2))], **kw)
    with pytest.raises(FeatureStoreError, match="need a split each"):
        plan_plain([str(path), str(path)], **kw)


def test_in_memory_features_are_checked_before_anything_is_written(tmp_path):
    v = xmedia_vars()
    v["I_te_CNN"] = v["I_te_CNN"].copy()
    v["I_te_CNN"][20, 3] = np.nan  # test row 20 is row 8 of the test split after the carve-out
    plan = F.plan_xmedia(write_mat(tmp_path / "x.mat", v, False), valid_from_test=12)
    with pytest.raises(FeatureStoreError, match=r"split 'test' column 'image' has a NaN/Inf value "
                       r"at row 8 \(item_id 70, dimension 3, value nan\)") as e:  # fmt: skip
        plan.validate()  # the check write_version runs before it creates anything
    assert "variable 'I_te_CNN'" in str(e.value)
    store = tmp_path / "store"
    with pytest.raises(FeatureStoreError, match="NaN/Inf"):
        write_version(str(store), "x", plan)
    assert not store.exists()
