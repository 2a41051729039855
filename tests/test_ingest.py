"""``python -m jobs.ingest``: every importer, noisy copies, list/show, and bad input → exit 2.

Most cases call the entry point in-process (the job's ``main`` under ``run_main``, exactly what
``python -m`` runs); one case runs the real command to check the process contract.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_feature_store_layouts import (
    inria_vars,
    wiki_deep_vars,
    write_mat,
    write_multilabel_h5,
    xmedia_vars,
    xmedianet_vars,
)

from feature_store import schema as S
from feature_store.store import open_dataset
from jobs._cli import run_main
from jobs.ingest import main

REPO = Path(__file__).resolve().parent.parent


def _ingest(capsys, *argv: str) -> str:
    """Run the job; return the last stdout line (the version URI)."""
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _bad(caplog, *argv: str) -> str:
    """Run the job as ``python -m`` does; expect exit code 2 and return the one error line."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as e:
        run_main(lambda: main(list(argv)))
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("bad input: ") and "\n" not in errors[0]
    return errors[0]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    ("command", "make", "extra", "counts"),
    [
        ("wiki-deep", wiki_deep_vars, ["--valid-from-test", "5"], [40, 5, 25]),
        ("xmedia", xmedia_vars, ["--valid-from-test", "10"], [50, 10, 20]),
        ("inria", inria_vars, [], [30, 10, 12]),
        ("xmedianet", xmedianet_vars, [], [32, 8, 10]),
    ],
)
def test_single_label_layouts(tmp_path, capsys, command, make, extra, counts):
    path = write_mat(tmp_path / f"{command}.mat", make(), v73=command == "wiki-deep")
    store = tmp_path / "store"
    uri = _ingest(
        capsys, command, "--input", str(path), "--store", str(store), "--name", command, *extra,
        "--noise-rate", "0.5", "--noise-seed", "3",
    )  # fmt: skip
    assert uri == str(store / command / "v1")
    m = open_dataset(uri).manifest
    assert m["splits"] == ["train", "valid", "test"]
    assert [m["counts"][s] for s in m["splits"]] == counts
    assert m["label_kind"] == S.SINGLE and m["noise"]["mode"] == "symmetric"
    assert m["noise"]["num_corrupted"] == round(0.5 * counts[0])
    assert m["source"]["kind"] == command and len(m["source"]["sha256"]) == 64


def test_multilabel_h5_with_carve_out_and_default_noise(tmp_path, capsys):
    path = write_multilabel_h5(tmp_path / "nus.h5")
    uri = _ingest(
        capsys, "multilabel-h5", "--input", str(path), "--store", str(tmp_path / "s"), "--name",
        "nus", "--valid-from-query", "3", "--noise-rate", "0.25",
    )  # fmt: skip
    ds = open_dataset(uri)
    assert ds.splits == ("train", "valid", "query", "database")
    assert ds.manifest["noise"]["mode"] == "multilabel"
    assert ds.read_arrays("train", [S.IS_NOISY])[S.IS_NOISY].sum() == 10


def test_plain_synthetic_noise_list_and_show(tmp_path, capsys):
    n = 24
    table = pa.table(
        {
            "image": pa.array(np.random.default_rng(0).normal(size=(n, 4)).tolist()),
            "text": pa.array(np.random.default_rng(1).normal(size=(n, 3)).tolist()),
            "label": pa.array((np.arange(n) % 4).tolist()),
            "split": pa.array(["train"] * 14 + ["test"] * 10),
        }
    )
    pq.write_table(table, tmp_path / "mine.parquet")
    store = str(tmp_path / "store")
    plain = _ingest(
        capsys, "plain", "--input", str(tmp_path / "mine.parquet"), "--store", store, "--name",
        "mine", "--valid-from-test", "4",
    )  # fmt: skip
    assert open_dataset(plain).manifest["counts"] == {"train": 14, "valid": 4, "test": 6}
    syn = _ingest(
        capsys, "synthetic", "--store", store, "--name", "ml", "--label-kind", "multi",
        "--train", "60", "--query", "10", "--database", "30", "--difficulty", "0.2",
    )  # fmt: skip
    assert open_dataset(syn).manifest["source"]["params"]["class_sep"] == pytest.approx(1.28)
    copy = _ingest(
        capsys, "noise", plain, "--noise-mode", "asymmetric", "--noise-rate", "1.0",
        "--flip-map", "0:1,1:0",
    )  # fmt: skip
    assert copy == str(Path(store) / "mine" / "v2")
    c = open_dataset(copy)
    assert c.manifest["noise"]["flip_map"] == {"0": 1, "1": 0, "2": 2, "3": 3}
    assert c.manifest["base"]["data_version"] == open_dataset(plain).data_version
    assert main(["list", store]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["mine/v1", "mine/v2", "ml/v1"]
    assert "asymmetric@1.0 seed 0 (copy of mine/v1@" in lines[1]
    assert main(["list", store, "--name", "ml", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label_kind"] == "multi" and row["counts"]["query"] == 10
    assert main(["show", copy]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["train.parquet"]["ref"] == (
        "mine/v1/train.parquet"
    )


# ----------------------------------------------------------------------------------------------
# Bad input: exit 2, one error line naming file/column/row, the store as it was
# ----------------------------------------------------------------------------------------------


def _plain_file(tmp_path: Path, name: str, **changes) -> Path:
    n = 20
    cols = {
        "pid": np.arange(n),
        "image": np.random.default_rng(0).normal(size=(n, 4)),
        "text": np.random.default_rng(1).normal(size=(n, 3)),
        "label": np.eye(3, dtype=np.uint8)[np.arange(n) % 3],
        "split": np.array(["train"] * 12 + ["valid"] * 4 + ["test"] * 4),
    }
    for k, fn in changes.items():
        cols[k] = fn(cols[k].copy())
    path = tmp_path / f"{name}.npz"
    np.savez(path, **cols)
    return path


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


@pytest.mark.parametrize(
    ("changes", "args", "message"),
    [
        (
            {"text": _set((13, 1), np.nan)},
            [],
            r"split 'valid' column 'text' has a NaN/Inf value at row 1 \(item_id 13, dimension 1",
        ),
        (
            {"image": _set((2, 0), np.inf)},
            [],
            r"column 'image'.* has a NaN/Inf value at row 2 \(item_id 2",
        ),
        (
            {"label": _set(5, 0)},
            [],
            r"split 'train' column 'label' row 5 \(item_id 5\) has 0 labels; a single-label "
            r"dataset needs exactly one per row \(an all-zero label row",
        ),
        (
            {"pid": _set(17, 3)},
            ["--id-col", "pid"],
            r"duplicate item_id 3 \(in splits 'train' row 3 and 'test' row 1\)",
        ),
        (
            {"label": lambda a: np.arange(20) % 5},
            ["--num-classes", "4"],
            r"column 'label' row 4 has label 4, outside \[0, 3\]",
        ),
    ],
    ids=["nan", "inf", "all-zero-label", "duplicate-ids", "label-out-of-range"],
)
def test_bad_plain_input_exits_2_and_writes_nothing(tmp_path, caplog, changes, args, message):
    path = _plain_file(tmp_path, "bad", **changes)
    store = tmp_path / "store"
    err = _bad(caplog, "plain", "--input", str(path), "--store", str(store), "--name", "x", *args)
    assert str(path) in err
    assert re.search(message, err), err
    assert not store.exists()


def test_empty_split_and_existing_version(tmp_path, caplog, capsys):
    store = tmp_path / "store"
    train = _plain_file(tmp_path, "train")
    empty = tmp_path / "empty.npz"
    np.savez(
        empty,
        image=np.zeros((0, 4)),
        text=np.zeros((0, 3)),
        label=np.zeros((0, 3), dtype=np.uint8),
    )
    args = ["plain", "--input", f"train={train}", "--input", f"valid={empty}"]
    args += ["--input", f"test={train}", "--store", str(store), "--name", "x"]
    err = _bad(caplog, *args)
    assert "split 'valid' is empty" in err and not store.exists()

    uri = _ingest(capsys, "synthetic", "--store", str(store), "--name", "syn", "--train", "30")
    before = _tree(store)
    # the target is checked before the input is read: a missing input is not even opened
    err = _bad(
        caplog, "xmedia", "--input", str(tmp_path / "missing.mat"), "--store", str(store),
        "--name", "syn", "--version", "1",
    )  # fmt: skip
    assert f"version {uri} already exists; versions are immutable" in err
    assert _tree(store) == before
    err = _bad(caplog, "noise", uri, "--noise-rate", "0.2", "--version", "1")
    assert "already exists" in err and _tree(store) == before
    err = _bad(caplog, "noise", uri, "--noise-mode", "multilabel", "--noise-rate", "0.2")
    assert "multilabel noise is for multi-label data" in err and _tree(store) == before


def test_bad_layout_files_exit_2(tmp_path, caplog):
    v = xmedia_vars()
    del v["teImgCat"]
    path = write_mat(tmp_path / "x.mat", v, v73=False)
    store = tmp_path / "store"
    err = _bad(caplog, "xmedia", "--input", str(path), "--store", str(store), "--name", "x")
    assert f"'{path}' lacks variable(s) ['teImgCat'] of the XMedia layout" in err
    h5 = write_multilabel_h5(tmp_path / "m.h5", sizes=(200, 20, 100))
    h5.write_bytes(h5.read_bytes()[:5000])
    err = _bad(caplog, "multilabel-h5", "--input", str(h5), "--store", str(store), "--name", "m")
    assert "truncated or damaged HDF5 file" in err
    with h5py.File(tmp_path / "ok.h5", "w") as f:
        f.create_dataset("ImgTrain", data=np.zeros((3, 2)))
    err = _bad(
        caplog, "multilabel-h5", "--input", str(tmp_path / "ok.h5"), "--store", str(store),
        "--name", "m",
    )  # fmt: skip
    assert "lacks variable(s) ['TagTrain', 'LabTrain'" in err
    assert not store.exists()


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    v = inria_vars()
    del v["te_txt"]
    path = write_mat(tmp_path / "inria.mat", v, v73=True)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.ingest", "inria", "--input", str(path), "--store",
         str(tmp_path / "store"), "--name", "inria"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "lacks variable(s) ['te_txt'] of the INRIA-Websearch layout" in lines[0]
    )
    assert not (tmp_path / "store").exists()
