"""jobs.evaluate: a registered model on a split, and the benchmark on small sizes."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pytest
from test_serving import register_small_model, shared_tracking_uri

from feature_store import schema as S
from feature_store.store import open_dataset
from jobs.evaluate import main
from pipeline.retrieval import metrics as evaluate
from pipeline.retrieval.bench import random_case, straightforward_map
from pipeline.tracking import plots


def test_model_subcommand_reports_both_directions(tmp_path_factory, tiny_dataset, capsys):
    uri = shared_tracking_uri(tmp_path_factory)
    register_small_model(
        tmp_path_factory.mktemp("eval-job"), name="eval-job", dataset=tiny_dataset, tracking_uri=uri
    )
    out = tmp_path_factory.mktemp("eval-out")
    argv = ["model", "--model", "eval-job@champion", "--tracking-uri", uri, "--ks", "1", "5"]
    assert main([*argv, "--out-dir", str(out), "--summary-json", str(out / "s.json")]) == 0
    s = json.loads((out / "s.json").read_text())
    assert s["query_split"] == s["database_split"] == "test"  # single-label: test vs test
    assert (out / plots.PR_PNG).read_bytes()[:4] == b"\x89PNG"
    mlflow.set_tracking_uri(uri)
    pm = mlflow.pyfunc.load_model("models:/eval-job/1")
    a = open_dataset(tiny_dataset).read_arrays("test", [S.IMAGE, S.TEXT, S.LABEL])
    img = pm.predict(a[S.IMAGE], params={"modality": "image"})
    txt = pm.predict(a[S.TEXT], params={"modality": "text"})
    want = evaluate.cross_modal_map(img, txt, a[S.LABEL], ties="expected")
    assert s["report"]["i2t"]["map"]["expected"] == pytest.approx(want["i2t"])
    assert s["report"]["t2i"]["map"]["expected"] == pytest.approx(want["t2i"])
    assert set(s["report"]["i2t"]["map_at_k"]) == {"1", "5"}
    printed = capsys.readouterr().out
    assert printed.count("MAP") >= 2 and "i2t:" in printed and "t2i:" in printed


def test_bench_subcommand_small(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--n-query", "120", "--n-db", "150", "--bits", "16", "--repeat", "2"]
    argv += ["--search-k", "10", "--large", "300", "--large-ties", "expected", "index"]
    assert main([*argv, "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    for ties in ("expected", "index"):
        assert s["straightforward"][ties]["abs_difference"] < 1e-9
        assert s["fast"][ties]["seconds"]["runs"] == 2
    assert s["search"]["identical_results"] is True and s["search"]["k"] == 10
    assert s["large"]["pairs"] == 90_000
    assert s["large"]["expected"]["map"] == pytest.approx(s["large"]["index"]["map"], abs=0.05)


def test_bench_rejects_bad_sizes(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["bench", "--n-query", "0"]) == 2
    assert any("bad input" in r.getMessage() for r in caplog.records)


def test_straightforward_reference_is_the_definition():
    """The benchmark's reference agrees with evaluate on a multi-label case, both tie rules."""
    qc, dc, ql, dl = random_case(30, 45, 6, 5, "multi", seed=3)
    assert qc.dtype == np.int8 and ql.shape == (30, 5)
    for ties in ("index", "expected"):
        assert straightforward_map(qc, dc, ql, dl, ties=ties) == pytest.approx(
            evaluate.mean_average_precision(qc, dc, ql, dl, ties=ties), abs=1e-12
        )
