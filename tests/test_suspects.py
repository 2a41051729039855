"""The suspect-label report and `jobs.ingest clean`: report order and columns against plain
Python, precision of the top suspects, and the drop/relabel round trip with its refusals."""

from __future__ import annotations

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from feature_store import schema as S
from feature_store.store import list_versions, open_dataset
from jobs.ingest import main as ingest
from pipeline.config import TrainConfig
from pipeline.method.suspects import SUSPECTS_FILE, TrainReference, precision_at, suspect_report


def _ref(ids, classes, noisy, k=4):
    label = np.eye(k, dtype=np.uint8)[classes]
    return TrainReference(np.asarray(ids), label, np.asarray(noisy, dtype=bool), True)


def test_report_orders_by_score_with_ties_by_item_id():
    ref = _ref([3, 5, 8, 9], [0, 1, 2, 3], [False, True, False, True])
    ids = np.array([9, 3, 8, 5])  # visiting order of an epoch
    ell = np.array([0.5, 2.0, 0.5, 1.5])
    w = np.array([0.7, 0.0, 0.6, 0.1])
    pred = np.array([1, 0, 2, 2])
    t = suspect_report(ref, ids, ell, w, pred).to_pylist()
    # reference: sort (−score, item_id) by hand
    expected = sorted(zip(ids, ell, w, pred, strict=True), key=lambda r: (-r[1], r[0]))
    assert [r["item_id"] for r in t] == [int(e[0]) for e in expected] == [3, 5, 8, 9]
    assert [r["rank"] for r in t] == [1, 2, 3, 4]
    assert [r["label"] for r in t] == [0, 1, 2, 3]  # the observed class of each item
    assert [r["predicted"] for r in t] == [0, 2, 2, 1]
    assert [r["weight"] for r in t] == [0.0, 0.1, 0.6, 0.7]
    assert precision_at(ref, suspect_report(ref, ids, ell, w, pred), ks=(1, 2, 4)) == {
        "1": 0.0,
        "2": 0.5,
        "4": 0.5,
    }


def test_report_lists_multilabel_positives():
    ref = TrainReference(
        np.array([1, 2]), np.array([[1, 0, 1], [0, 1, 0]], np.uint8), np.array([0, 1], bool), False
    )
    t = suspect_report(ref, np.array([2, 1]), np.array([1.0, 3.0]), np.ones(2), np.zeros(2))
    assert t.column("label").to_pylist() == [[0, 2], [1]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An in-process run on a set with 40 % symmetric noise, logged to MLflow with its report."""
    from synthetic_util import write_synthetic

    from pipeline.tracking import runs as tracking
    from pipeline.training.inprocess import train_in_process

    root = tmp_path_factory.mktemp("clean")
    dataset = write_synthetic(
        root / "store", "calib", noise=("symmetric", 0.4, 0), seed=1, num_classes=6,
        counts={"train": 600, "valid": 96, "test": 96}, image_dim=24, text_dim=16, difficulty=0.0,
    )  # fmt: skip
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(
        dataset=dataset, bits=16, hidden_dim=128, epochs=8, warmup_epochs=3, lr=1e-3,
        batch_size=128, weighting="mixture", tau_center=0.2,
    )  # fmt: skip
    s = train_in_process(cfg)
    ds = open_dataset(dataset)
    run_id = tracking.log_finished_run(
        uri, "clean-test", "r", {"bits": 16}, {"data_version": ds.data_version}, {}
    )
    path = root / SUSPECTS_FILE
    pq.write_table(s["_suspects"], path)
    mlflow.tracking.MlflowClient(uri).log_artifact(run_id, str(path))
    return {"uri": uri, "run_id": run_id, "report": s["_suspects"], "ds": ds}


def test_top_suspects_are_mostly_mislabeled(trained):
    ds, report = trained["ds"], trained["report"]
    ref = TrainReference.load(ds)
    assert report.num_rows == ds.manifest["counts"]["train"]
    share = float(ref.is_noisy.mean())
    p = precision_at(ref, report, ks=(100,))["100"]
    assert p >= 0.9 > share + 0.4, (p, share)  # far above picking at random


def _clean(trained, *args):
    return ingest(
        ["clean", trained["ds"].uri, "--from-run", trained["run_id"],
         "--tracking-uri", trained["uri"], *args]
    )  # fmt: skip


def test_drop_writes_a_version_without_the_suspects(trained, capsys):
    ds = trained["ds"]
    assert _clean(trained, "--drop", "--top", "20", "--name", "tiny-drop") == 0
    out = open_dataset(capsys.readouterr().out.strip().splitlines()[-1])
    dropped = set(trained["report"].column("item_id").to_pylist()[:20])
    before = ds.read_arrays("train", [S.ITEM_ID, S.LABEL])
    after = out.read_arrays("train", [S.ITEM_ID, S.LABEL, S.IS_NOISY])
    assert set(after[S.ITEM_ID]) == set(before[S.ITEM_ID]) - dropped
    keep = ~np.isin(before[S.ITEM_ID], list(dropped))
    np.testing.assert_array_equal(after[S.LABEL], before[S.LABEL][keep])
    assert out.manifest["counts"]["train"] == ds.manifest["counts"]["train"] - 20
    c = out.manifest["cleaning"]
    assert (c["from_run"], c["mode"], c["items"], c["rule"]) == (
        trained["run_id"],
        "drop",
        20,
        {"top": 20},
    )
    assert out.manifest["base"]["data_version"] == ds.data_version
    for split in ("valid", "test"):  # referenced, not copied
        assert out.manifest["files"][f"{split}.parquet"]["ref"].startswith("calib/")
    left = out.manifest["noise"]["after_cleaning"]["wrong_share"]
    assert left == pytest.approx(float(after[S.IS_NOISY].mean()))


def test_relabel_gives_suspects_the_predicted_class(trained, capsys):
    ds, report = trained["ds"], trained["report"]
    assert _clean(trained, "--relabel", "--share", "0.1", "--name", "tiny-relabel") == 0
    out = open_dataset(capsys.readouterr().out.strip().splitlines()[-1])
    n = round(0.1 * report.num_rows)
    chosen = dict(zip(report.column("item_id").to_pylist()[:n],
                      report.column("predicted").to_pylist()[:n], strict=True))  # fmt: skip
    before = ds.read_arrays("train", [S.ITEM_ID, S.LABEL, S.CLEAN_LABEL])
    after = out.read_arrays("train", [S.ITEM_ID, S.LABEL, S.CLEAN_LABEL])
    np.testing.assert_array_equal(after[S.ITEM_ID], before[S.ITEM_ID])
    np.testing.assert_array_equal(after[S.CLEAN_LABEL], before[S.CLEAN_LABEL])
    for i, item in enumerate(before[S.ITEM_ID]):
        want = chosen.get(int(item), int(before[S.LABEL][i].argmax()))
        assert int(after[S.LABEL][i].argmax()) == want and after[S.LABEL][i].sum() == 1
    assert out.manifest["cleaning"]["mode"] == "relabel"


def _exit_code(argv: list[str]) -> int:
    from jobs._cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(lambda: ingest(argv))
    return int(e.value.code)


def test_clean_refuses_bad_input_and_writes_nothing(trained, tiny_dataset, caplog):
    ds = trained["ds"]
    store = ds.store_location.uri
    other_store = open_dataset(tiny_dataset).store_location.uri

    def count() -> int:
        return len(list_versions(store)) + len(list_versions(other_store))

    def refused(argv: list[str], message: str) -> None:
        caplog.clear()
        assert _exit_code(argv) == 2
        assert message in caplog.text

    before = count()
    run = ["--from-run", trained["run_id"], "--tracking-uri", trained["uri"]]
    refused(["clean", ds.uri, *run, "--drop", "--top", "5", "--version", "1"], "already exists")
    unknown = ["--from-run", "0" * 32, "--tracking-uri", trained["uri"]]
    refused(["clean", ds.uri, *unknown, "--drop", "--top", "5"], "no MLflow run")
    # a run trained on another data version
    refused(["clean", tiny_dataset, *run, "--drop", "--top", "5"], "was trained on data version")
    refused(["clean", ds.uri, *run, "--drop", "--share", "1.5"], "--share 1.5")
    assert count() == before
