"""The MIRFlickr-25K importer (``jobs.ingest mirflickr``): the real LAll / YAll files and the three
published noisy-label files when ``../shared`` has them, and generated files of the same layout;
the standard protocol, the published noise as label overlays, synthetic image features recorded
as such, and bad input refused with exit 2 and one line before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io as sio

from feature_store import mirflickr as M
from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.noise import multilabel_noise
from feature_store.store import open_dataset
from feature_store.synthetic import modality_from_labels
from jobs._cli import run_main
from jobs.ingest import main

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mirflickr25k"
LALL, YALL = REAL / "mirflickr25k-lall.mat", REAL / "mirflickr25k-yall.mat"
NOISE = {r: REAL / f"mirflickr25k-lall-noise_{r}.h5" for r in ("0.2", "0.5", "0.8")}
SHA = {  # from the dataset's README
    "lall": "173eec1fb2603bb54c893467c127325556fbe5bc91dd7e647d136a8e4e9fd07d",
    "yall": "a53d2ba6a5f3672b5e747aaa8b76d4af6be568d300715c6910d8c67bdef55f7e",
    "0.2": "9b45b5beb112be3e68054c6b428d4aec32a33881f5a33917a60ff9fc7eaf9e4a",
    "0.5": "9d00abebf089f8a59d7dad71ebfe85aaa9aaffeb2ab2a61fb31979af91ba6598",
    "0.8": "b2b9626c71b17400ac9c40e74a886c35ea6421f61927dbbd4d94b7b4ac6fb4b0",
}
N, K, TAGS = 20015, 24, 20  # the generated layout: real row count, small tag width


def _ingest(capsys, *argv: str) -> list[str]:
    """Run the job; return the URIs it printed (one per line)."""
    capsys.readouterr()
    assert main(["mirflickr", *argv]) == 0
    return capsys.readouterr().out.strip().splitlines()


def _bad(caplog, *argv: str) -> str:
    """Run as ``python -m`` does; expect exit 2 and one error line, and return it."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        run_main(lambda: main(["mirflickr", *argv]))
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("bad input: ") and "\n" not in errors[0]
    return errors[0]


def _one_off_one_on(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Per row: exactly one 1 → 0 and exactly one 0 → 1."""
    off = ((clean == 1) & (noisy == 0)).sum(axis=1)
    on = ((clean == 0) & (noisy == 1)).sum(axis=1)
    return (off == 1) & (on == 1)


# ------------------------------------------------------------------------------------------
# The real files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real labels and tags (synthetic images of width 8) and the three published noises."""
    if not (LALL.is_file() and YALL.is_file() and all(p.is_file() for p in NOISE.values())):
        pytest.skip(f"real MIRFlickr-25K files not present under {REAL} (../shared is absent)")
    store = tmp_path_factory.mktemp("mir-store")
    argv = ["--labels", str(LALL), "--tags", str(YALL), "--image-features", "synthetic"]
    argv += ["--synthetic-dim", "8", "--store", str(store), "--name", "mir"]
    for p in NOISE.values():
        argv += ["--noise-file", str(p)]
    assert main(["mirflickr", *argv]) == 0
    uris = [str(store / "mir" / f"v{i}") for i in (1, 2, 3, 4)]
    lall = sio.loadmat(LALL)["LAll"]
    return uris, lall


def test_real_protocol_splits_and_relevance(real):
    uris, lall = real
    ds = open_dataset(uris[0])
    m = ds.manifest
    assert m["label_kind"] == S.MULTI and m["num_classes"] == 24
    assert m["counts"] == {"train": 10000, "valid": 2000, "query": 2000, "database": 18015}
    assert m["dims"] == {"image": 8, "text": 1386}
    ids = {s: ds.read_arrays(s, [S.ITEM_ID])[S.ITEM_ID] for s in ds.splits}
    assert np.array_equal(ids["query"], np.arange(0, 2000))
    assert np.array_equal(ids["train"], np.arange(2000, 12000))
    assert np.array_equal(ids["database"], np.arange(2000, 20015))  # all but the query
    assert np.isin(ids["train"], ids["database"]).all()
    valid = ids["valid"]
    assert valid.min() >= 12000 and np.unique(valid).size == 2000  # not train, not query
    assert not np.isin(valid, ids["query"]).any() and not np.isin(valid, ids["train"]).any()
    for s in ds.splits:  # every split's labels are the LAll rows of its item ids
        assert np.array_equal(ds.read_arrays(s, [S.LABEL])[S.LABEL], lall[ids[s]])
    db = ds.read_arrays("database", [S.IMAGE, S.TEXT])
    tr = ds.read_arrays("train", [S.IMAGE, S.TEXT])
    assert np.array_equal(db[S.IMAGE][:10000], tr[S.IMAGE])  # an item is one vector everywhere
    assert np.array_equal(db[S.TEXT][:10000], tr[S.TEXT])
    assert m["source"]["sha256"] == SHA["lall"] and m["source"]["text"]["sha256"] == SHA["yall"]
    assert m["source"]["image"]["real"] is False and m["source"]["synthetic"] == ["image"]
    assert "SYNTHETIC" in m["source"]["note"] and m["noise"]["mode"] == "none"
    assert m["protocol"]["rows"] == {
        "query": [0, 2000],
        "train": [2000, 12000],
        "database": [2000, 20015],
    }


def test_real_published_noise_overlays(real):
    uris, lall = real
    clean = lall[2000:12000]
    expected = (("0.2", 2000), ("0.5", 5000), ("0.8", 8000))
    for uri, (rate, changed) in zip(uris[1:], expected, strict=True):
        ds = open_dataset(uri)
        m = ds.manifest
        noise = m["noise"]
        assert noise["mode"] == "published" and noise["rate"] == float(rate)
        assert noise["num_noisy"] == changed and noise["seed"] is None
        src = noise["source"]
        assert src["file"] == NOISE[rate].name and src["sha256"] == SHA[rate]
        assert src["published_as"].startswith("LonganWANG-cs/NRCH")
        assert m["base"]["uri"] == uris[0]
        assert "train.labels.parquet" in m["files"] and "ref" in m["files"]["train.parquet"]
        train = ds.read_arrays("train", [S.ITEM_ID, S.LABEL, S.CLEAN_LABEL, S.IS_NOISY])
        assert np.array_equal(train[S.ITEM_ID], np.arange(2000, 12000))
        assert np.array_equal(train[S.CLEAN_LABEL], clean)
        with h5py.File(NOISE[rate], "r") as f:
            assert np.array_equal(train[S.LABEL], f["result"][()].astype(np.uint8))
        noisy = train[S.IS_NOISY]
        assert noisy.sum() == changed
        assert np.array_equal(train[S.LABEL][~noisy], clean[~noisy])  # unchanged rows = LAll
        assert _one_off_one_on(clean[noisy], train[S.LABEL][noisy]).all()
        assert noise["flips"] == {
            "labels_off": changed,
            "labels_on": changed,
            "rows_one_off_one_on": changed,
        }


# ------------------------------------------------------------------------------------------
# Generated files of the same layout
# ------------------------------------------------------------------------------------------


def _labels(n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = (rng.random((n, k)) < 0.15).astype(np.uint8)
    lab[np.arange(n), rng.integers(0, k, n)] = 1  # every item has a label
    return lab


def _layout(tmp_path: Path, **override) -> dict[str, Path]:
    """LAll / YAll / XAll .mat files and a noise file (rate 0.3, the project's multilabel noise)
    written like the distributed ones; ``override`` replaces a variable's array."""
    lab = _labels()
    rng = np.random.default_rng(1)
    arrays = {
        "LAll": lab.astype(np.float64),
        "YAll": (rng.random((N, TAGS)) < 0.2).astype(np.float64),
        "XAll": rng.normal(size=(N, 6)).astype(np.float32),
    }
    true = lab[2000:12000].astype(np.float64)
    result = multilabel_noise(lab[2000:12000], 0.3, 5)[0].astype(np.float64)
    arrays |= {"True": true, "result": result}
    arrays |= override
    out = {}
    for var, fname in (("LAll", "lall.mat"), ("YAll", "yall.mat"), ("XAll", "xall.mat")):
        out[var] = tmp_path / fname
        sio.savemat(out[var], {var: arrays[var]})
    out["noise"] = tmp_path / "noise_0.3.h5"
    with h5py.File(out["noise"], "w") as f:
        for var in ("True", "result"):
            if arrays[var] is not None:
                f[var] = arrays[var]
    return out


def _args(files: dict[str, Path], store: Path, *extra: str) -> list[str]:
    return [
        "--labels",
        str(files["LAll"]),
        "--tags",
        str(files["YAll"]),
        "--image-features",
        str(files["XAll"]),
        "--store",
        str(store),
        "--name",
        "g",
        *extra,
    ]


def test_generated_layout_with_real_features_and_a_noise_file(tmp_path, capsys):
    files = _layout(tmp_path)
    uris = _ingest(capsys, *_args(files, tmp_path / "st", "--noise-file", str(files["noise"])))
    assert uris == [str(tmp_path / "st" / "g" / "v1"), str(tmp_path / "st" / "g" / "v2")]
    base, copy = open_dataset(uris[0]), open_dataset(uris[1])
    x = sio.loadmat(files["XAll"])["XAll"]
    y = sio.loadmat(files["YAll"])["YAll"]
    for s in base.splits:
        a = base.read_arrays(s, [S.ITEM_ID, S.IMAGE, S.TEXT])
        assert np.array_equal(a[S.IMAGE], x[a[S.ITEM_ID]]) and np.array_equal(
            a[S.TEXT], y[a[S.ITEM_ID]]
        )
    src = base.manifest["source"]
    assert src["image"]["real"] is True and src["image"]["variable"] == "XAll"
    assert src["synthetic"] == [] and "note" not in src
    with h5py.File(files["noise"], "r") as f:
        result = f["result"][()]
    train = copy.read_arrays("train", [S.LABEL, S.IS_NOISY])
    assert np.array_equal(train[S.LABEL], result)
    noise = copy.manifest["noise"]
    assert noise["num_noisy"] == 3000 and noise["rate"] == 0.3
    assert noise["source"]["rate_in_name"] == "0.3" and noise["source"]["published_as"] is None
    assert train[S.IS_NOISY].sum() == 3000
    # the base stays clean and the copy's other splits are the base's files
    assert base.read_arrays("train", [S.IS_NOISY])[S.IS_NOISY].sum() == 0
    assert copy.manifest["files"]["database.parquet"]["ref"] == "g/v1/database.parquet"


def test_seeded_noise_of_the_published_kind(tmp_path, capsys):
    files = _layout(tmp_path)
    extra = ("--noise-rate", "0.4", "--noise-seed", "3", "--valid-from-database", "0")
    (uri,) = _ingest(capsys, *_args(files, tmp_path / "st", *extra))
    ds = open_dataset(uri)
    assert ds.splits == ("train", "query", "database")
    t = ds.read_arrays("train", [S.LABEL, S.CLEAN_LABEL, S.IS_NOISY])
    noisy = t[S.IS_NOISY]
    assert noisy.sum() == 4000 and ds.manifest["noise"]["mode"] == "multilabel"
    assert ds.manifest["noise"]["seed"] == 3
    assert _one_off_one_on(t[S.CLEAN_LABEL][noisy], t[S.LABEL][noisy]).all()
    assert (t[S.LABEL].sum(axis=1) >= 1).all()


def test_multilabel_noise_by_hand():
    """One positive off, one negative on: with one of each the result is forced."""
    clean = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.uint8)
    noisy, spec = multilabel_noise(clean, 1.0, 0)
    assert noisy.tolist() == [[0, 1], [1, 0], [0, 1]] and spec["num_noisy"] == 3
    # two positives, one negative: the negative goes on and one of the two goes off
    clean = np.array([[1, 1, 0]] * 8 + [[0, 1, 1]] * 2, dtype=np.uint8)
    noisy, spec = multilabel_noise(clean, 0.5, 7)
    changed = np.any(noisy != clean, axis=1)
    assert changed.sum() == 5 and spec["num_noisy"] == 5
    for a, b in zip(clean[changed].tolist(), noisy[changed].tolist(), strict=True):
        assert b in ([[0, 1, 1], [1, 0, 1]] if a == [1, 1, 0] else [[1, 1, 0], [1, 0, 1]])


def test_protocol_rows_and_synthetic_images_by_hand(tmp_path):
    rows = M.protocol_rows(30, query=4, train=10, valid_from_database=5, valid_seed=2)
    assert list(rows) == ["train", "valid", "query", "database"]
    assert rows["query"].tolist() == [0, 1, 2, 3] and rows["train"].tolist() == list(range(4, 14))
    assert rows["database"].tolist() == list(range(4, 30))
    assert set(rows["valid"]) <= set(range(14, 30)) and len(set(rows["valid"])) == 5
    again = M.protocol_rows(30, query=4, train=10, valid_from_database=5, valid_seed=2)
    assert np.array_equal(rows["valid"], again["valid"])  # seeded
    with pytest.raises(FeatureStoreError, match=r"valid_from_database=16 must be in \[0, 16\)"):
        M.protocol_rows(30, query=4, train=10, valid_from_database=16)
    # synthetic rows depend on the row, not on how they are asked for
    lab = _labels(3000, 5)
    make, params = modality_from_labels(lab, dim=7, difficulty=0.2, seed=4)
    whole = make(np.arange(3000))
    assert whole.shape == (3000, 7) and whole.dtype == np.float32
    assert np.array_equal(make(np.array([2999, 5, 1500])), whole[[2999, 5, 1500]])
    assert params["class_sep"] == pytest.approx(1.28)
    assert params["modality_gap"] == pytest.approx(0.6)
    # an easy setting separates the classes: same-label rows are closer than other rows
    one = np.zeros((400, 2), dtype=np.uint8)
    one[:200, 0] = one[200:, 1] = 1
    x = modality_from_labels(one, dim=16, difficulty=0.0, seed=1)[0](np.arange(400))
    c0, c1 = x[:200].mean(0), x[200:].mean(0)
    nearer = np.linalg.norm(x[:200] - c0, axis=1) < np.linalg.norm(x[:200] - c1, axis=1)
    assert nearer.mean() > 0.9


def test_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["mirflickr", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--labels", "--tags", "--image-features", "--noise-file", "--valid-from-database"):
        assert flag in out
    assert "synthetic" in out


# ------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming file, variable and value; nothing written
# ------------------------------------------------------------------------------------------


def _refused(tmp_path, caplog, files, *extra) -> str:
    store = tmp_path / "st"
    msg = _bad(caplog, *_args(files, store, "--noise-file", str(files["noise"]), *extra))
    assert not store.exists()
    return msg


def test_bad_row_counts(tmp_path, caplog):
    y = (np.random.default_rng(0).random((N - 1, TAGS)) < 0.2).astype(np.float64)
    files = _layout(tmp_path, YAll=y)
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['YAll']}' variable 'YAll' has shape ({N - 1}, {TAGS})" in msg
    assert f"'{files['LAll']}' variable 'LAll' has {N} rows" in msg


def test_bad_image_row_count(tmp_path, caplog):
    files = _layout(tmp_path, XAll=np.zeros((N - 15, 6), dtype=np.float32))
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['XAll']}' variable 'XAll' has shape ({N - 15}, 6)" in msg
    assert f"but '{files['LAll']}' variable 'LAll' has {N} rows" in msg


def test_noise_file_for_other_labels(tmp_path, caplog):
    true = _labels()[2000:12000].astype(np.float64)
    true[17, 3] = 1 - true[17, 3]
    true[40, 0] = 1 - true[40, 0]
    files = _layout(tmp_path, **{"True": true})
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['noise']}' variable 'True' row 17 differs from" in msg
    assert f"'{files['LAll'].resolve()}' variable 'LAll' row 2017 at class 3" in msg
    assert "2 rows differ" in msg


def test_noise_rows_do_not_match_true(tmp_path, caplog):
    result = _labels()[2000:11999].astype(np.float64)
    files = _layout(tmp_path, result=result)
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['noise']}' variable 'result' has shape (9999, 24)" in msg
    assert "'True' has (10000, 24)" in msg


def test_noise_true_of_other_rows(tmp_path, caplog):
    files = _layout(tmp_path, **{"True": _labels()[2000:11000].astype(np.float64)})
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['noise']}' variable 'True' has shape (9000, 24)" in msg
    assert "rows 2000..11999, shape (10000, 24)" in msg


@pytest.mark.parametrize("missing", ["True", "result"])
def test_noise_file_missing_a_key(tmp_path, caplog, missing):
    files = _layout(tmp_path, **{missing: None})
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['noise']}' lacks variable(s) ['{missing}']" in msg


def test_label_file_missing_its_key(tmp_path, caplog):
    files = _layout(tmp_path)
    sio.savemat(files["LAll"], {"L": _labels().astype(np.float64)})
    msg = _refused(tmp_path, caplog, files)
    assert f"'{files['LAll']}' lacks variable(s) ['LAll']" in msg and "found ['L']" in msg


@pytest.mark.parametrize(
    ("var", "value", "what"),
    [("LAll", 2.0, "labels"), ("YAll", 0.5, "tags"), ("result", 3.0, "labels")],
)
def test_non_binary_values(tmp_path, caplog, var, value, what):
    arrays = {
        "LAll": _labels().astype(np.float64),
        "YAll": (np.random.default_rng(1).random((N, TAGS)) < 0.2).astype(np.float64),
        "result": _labels()[2000:12000].astype(np.float64),
    }
    arrays[var][5, 3] = value
    files = _layout(tmp_path, **{var: arrays[var]})
    msg = _refused(tmp_path, caplog, files)
    where = files["noise"] if var == "result" else files[var]
    assert f"'{where}' variable '{var}' row 5 column 3 is {value!r}; {what} must be 0 or 1" in msg


def test_all_zero_noisy_row(tmp_path, caplog):
    result = _labels()[2000:12000].astype(np.float64)
    result[9] = 0
    files = _layout(tmp_path, result=result)
    assert f"'{files['noise']}' variable 'result' row 9 has no label" in _refused(
        tmp_path, caplog, files
    )


def test_a_manifest_round_trip_through_show(tmp_path, capsys):
    files = _layout(tmp_path)
    (uri,) = _ingest(capsys, *_args(files, tmp_path / "st"))
    assert main(["show", uri]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["protocol"]["valid_from_database"] == 2000 and m["source"]["kind"] == "mirflickr"
