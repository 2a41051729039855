"""jobs.pull: registry → encode a store split → faiss search → results and MAP; bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from test_serving import register_small_model, shared_tracking_uri

from feature_store import schema as S
from feature_store.store import open_dataset
from jobs._cli import run_main
from jobs.pull import main
from pipeline.retrieval import metrics as evaluate
from pipeline.retrieval.index import IndexSpec
from pipeline.tracking.pull import PullError, model_uri

REPO = Path(__file__).resolve().parent.parent
NAME = "pull-small"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_dataset):
    uri = shared_tracking_uri(tmp_path_factory)
    reg = register_small_model(
        tmp_path_factory.mktemp("pull"), name=NAME, dataset=tiny_dataset, tracking_uri=uri
    )
    return {**reg, "dataset": tiny_dataset}


def _args(registry, *extra: str) -> list[str]:
    return ["--model", f"{NAME}@champion", "--tracking-uri", registry["tracking_uri"], *extra]


def _bad_input(caplog, argv: list[str]) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("bad input: ")
    assert "Traceback" not in errors[0] and "\n" not in errors[0]
    return errors[0]


def test_pull_end_to_end_in_a_fresh_interpreter_without_ray(registry, tmp_path):
    summary, results = tmp_path / "summary.json", tmp_path / "results.npz"
    ok = _args(registry, "--k", "5", "--show", "2", "--summary-json", str(summary))
    ok += ["--results", str(results)]
    bad = ["--model", "no-such-model@champion", "--tracking-uri", registry["tracking_uri"]]
    code = (
        "import json, sys\n"
        "from jobs.pull import main\n"
        f"ok = main({ok!r})\n"
        f"bad = main({bad!r})\n"
        "ray = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(json.dumps({'ok': ok, 'bad': bad, 'ray': ray}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert json.loads(out[-1]) == {"ok": 0, "bad": 2, "ray": []}
    assert sum(line.startswith("query ") for line in out) == 2
    assert any(line.startswith("MAP image→text, 48 queries × 48 items, 16 bits") for line in out)
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "model 'no-such-model@champion' not found" in errors[0]
    assert "Traceback" not in r.stderr

    # the reported MAP is the metric of the codes the registered model produces
    s = json.loads(summary.read_text())
    assert s["model"]["version"] == "1" and s["model"]["alias"] == "champion"
    assert s["database"]["size"] == 48 and s["queries"]["count"] == 48 and s["k"] == 5
    mlflow.set_tracking_uri(registry["tracking_uri"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    a = open_dataset(registry["dataset"]).read_arrays("test", [S.IMAGE, S.TEXT, S.LABEL])
    img = pm.predict(a[S.IMAGE], params={"modality": "image"})
    txt = pm.predict(a[S.TEXT], params={"modality": "text"})
    want = evaluate.retrieval_report(img, txt, a[S.LABEL], a[S.LABEL], ks=(1, 5, 10, 100))
    assert s["metrics"]["map"] == pytest.approx(want["map"])
    assert s["metrics"]["map_at_k"]["5"] == pytest.approx(want["map_at_k"]["5"])
    assert s["metrics"]["search_precision_at_k"] == pytest.approx(
        want["precision_at_k"]["5"]["index"]
    )
    saved = np.load(results)
    assert saved["ids"].shape == (48, 5) and saved["distances"].shape == (48, 5)
    assert np.all(np.diff(saved["distances"], axis=1) >= 0)


def test_version_reference_and_approximate_indexes(registry, tmp_path, capsys, caplog):
    def pull(kind: str, k: int, *extra: str) -> tuple[dict, np.lib.npyio.NpzFile]:
        out, res = tmp_path / f"{kind}{k}{len(extra)}.json", tmp_path / f"{kind}{k}{len(extra)}.npz"
        argv = ["--model", f"{NAME}/1", "--tracking-uri", registry["tracking_uri"], "--k", str(k)]
        argv += ["--index", kind, "--show", "0", "--summary-json", str(out), "--results", str(res)]
        assert main([*argv, *extra]) == 0
        return json.loads(out.read_text()), np.load(res)

    _, every = pull("flat", 48)  # every query × database distance, from the exact scan
    db_ids = np.unique(every["ids"])  # item ids, not positions
    assert db_ids.size == 48
    dist = np.zeros((48, 48), dtype=np.int64)
    np.put_along_axis(dist, np.searchsorted(db_ids, every["ids"]), every["distances"], axis=1)
    _, exact_res = pull("flat", 3)
    probe_all = {"ivf": ("--nlist", "4", "--nprobe", "4"), "hash": ("--hash-bits", "8", "--nflip",
                 "8"), "mih": ("--mih-tables", "2", "--nflip", "8")}  # fmt: skip
    for kind in ("ivf", "hash", "mih"):
        s, res = pull(kind, 3)  # the kind's defaults: a radius search may find fewer than k
        assert s["index"]["short_queries"] == int((res["ids"] < 0).any(axis=1).sum()), kind
        warned = [
            r.getMessage() for r in caplog.records if "fewer than 3 results" in r.getMessage()
        ]
        assert bool(warned) == (s["index"]["short_queries"] > 0), kind
        assert kind == "ivf" or s["index"]["short_queries"] > 0  # radius searches at defaults
        caplog.clear()
        assert s["index"]["kind"] == s["index"]["params"]["kind"] == kind
        assert s["index"]["ntotal"] == 48 and s["model"]["version"] == "1"
        assert s["index"]["recorded"]["kind"] == "auto"  # registered without a search_index
        q, j = np.nonzero(res["ids"] >= 0)
        assert np.array_equal(
            res["distances"][q, j], dist[q, np.searchsorted(db_ids, res["ids"][q, j])]
        ), kind
        # every list / bucket probed: the exact scan's distances (which of several items tied at
        # the k-th distance comes back may differ, so ids and precision are not compared)
        s, res = pull(kind, 3, *probe_all[kind])
        np.testing.assert_array_equal(res["distances"], exact_res["distances"], err_msg=kind)
        assert s["index"]["short_queries"] == 0, kind
    assert "MAP image→text" in capsys.readouterr().out


def test_index_cache_gives_the_same_results_without_a_second_build(registry, tmp_path):
    cache = tmp_path / "ivf-cache"
    runs = []
    for i in range(2):
        out, res = tmp_path / f"s{i}.json", tmp_path / f"r{i}.npz"
        argv = _args(registry, "--index", "ivf", "--nlist", "4", "--nprobe", "1", "--k", "5")
        argv += ["--index-cache", str(cache), "--show", "0", "--summary-json", str(out)]
        assert main([*argv, "--results", str(res)]) == 0
        runs.append((json.loads(out.read_text()), np.load(res)))
    (first, r0), (second, r1) = runs
    assert (first["index"]["cached"], second["index"]["cached"]) == (False, True)
    assert first["index"]["params"] == second["index"]["params"]
    for key in ("ids", "distances"):
        np.testing.assert_array_equal(r0[key], r1[key])
    assert len(list(cache.glob("*.faissbin"))) == 1


def test_text_queries_from_a_file_have_no_map(registry, tmp_path, capsys):
    q = tmp_path / "q.npy"
    np.save(q, np.random.default_rng(0).normal(size=(4, 16)).astype(np.float64))
    out = tmp_path / "s.json"
    argv = _args(registry, "--db-modality", "image", "--queries", str(q), "--k", "2")
    assert main([*argv, "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["queries"] == {"source": str(q), "modality": "text", "count": 4}
    assert s["metrics"] is None and len(s["results"]) == 4
    assert "MAP" not in capsys.readouterr().out


def test_bad_input_gives_one_line_and_exit_code_2(registry, tmp_path, caplog):
    msg = _bad_input(caplog, _args(registry, "--k", "49"))
    assert "--k 49 is larger than the database (48 items)" in msg
    msg = _bad_input(caplog, _args(registry, "--max-queries", "0"))
    assert "query set is empty" in msg
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 24), dtype=np.float32))  # image width, used as text queries
    msg = _bad_input(caplog, _args(registry, "--db-modality", "image", "--queries", str(wrong)))
    assert "(3, 24)" in msg and "text head expects (n, 16)" in msg
    msg = _bad_input(caplog, ["--model", "a/b/c", "--tracking-uri", registry["tracking_uri"]])
    assert "is not NAME@ALIAS" in msg
    msg = _bad_input(caplog, ["--model", f"{NAME}/7", "--tracking-uri", registry["tracking_uri"]])
    assert "not found" in msg
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("x")
    msg = _bad_input(caplog, _args(registry, "--index-cache", str(not_a_folder)))
    assert f"--index-cache '{not_a_folder}' exists and is not a folder" in msg
    assert not_a_folder.read_text() == "x"


def test_dataset_with_other_feature_dims_is_refused(registry, tmp_path, caplog):
    from feature_store.store import write_dataset
    from feature_store.synthetic import generate

    splits, meta = generate(
        num_classes=6, counts={"train": 12, "valid": 6, "test": 6}, image_dim=24, text_dim=9
    )
    other = write_dataset(
        str(tmp_path), "other", splits, source=meta["source"], noise={}, protocol=meta["protocol"]
    )
    msg = _bad_input(caplog, _args(registry, "--dataset", other))
    assert "text features of dimension 9" in msg and "expects 16" in msg


def test_unreadable_dataset_exits_2_through_run_main(registry, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(_args(registry, "--dataset", str(tmp_path / "missing"))))
    assert e.value.code == 2


def test_help_and_model_references(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage: python -m jobs.pull" in capsys.readouterr().out
    assert model_uri("m@champion") == ("models:/m@champion", "m", None, "champion")
    assert model_uri("m/3") == ("models:/m/3", "m", "3", None)
    assert model_uri("models:/m/3")[0] == "models:/m/3"
    assert model_uri("runs:/abc/model") == ("runs:/abc/model", None, None, None)
    for bad in ("", "m", "m@", "m/x"):
        with pytest.raises(PullError):
            model_uri(bad)


def test_multi_label_dataset_defaults_to_query_vs_database(registry, tmp_path):
    from feature_store.store import write_dataset
    from feature_store.synthetic import generate

    splits, meta = generate(
        num_classes=6,
        counts={"train": 20, "query": 8, "database": 25},
        image_dim=24,
        text_dim=16,
        label_kind="multi",
        seed=2,
    )
    uri = write_dataset(
        str(tmp_path),
        "multi",
        splits,
        source=meta["source"],
        noise={},
        label_kind="multi",
        protocol=meta["protocol"],
    )
    out = tmp_path / "s.json"
    argv = _args(registry, "--dataset", uri, "--k", "3", "--show", "0")
    assert main([*argv, "--summary-json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["database"]["source"].endswith(":database") and s["database"]["size"] == 25
    assert s["queries"]["source"].endswith(":query") and s["queries"]["count"] == 8
    mlflow.set_tracking_uri(registry["tracking_uri"])
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    ds = open_dataset(uri)
    q = ds.read_arrays("query", [S.IMAGE, S.LABEL])
    d = ds.read_arrays("database", [S.TEXT, S.LABEL])
    assert (q[S.LABEL].sum(1) > 1).any()  # really multi-label
    want = evaluate.mean_average_precision(
        pm.predict(q[S.IMAGE], params={"modality": "image"}),
        pm.predict(d[S.TEXT], params={"modality": "text"}),
        q[S.LABEL],
        d[S.LABEL],
        ties="expected",
    )
    assert s["metrics"]["map"]["expected"] == pytest.approx(want)


def test_bad_query_files_are_refused_before_any_encoding(registry, tmp_path, caplog):
    def queries(name: str, a: np.ndarray | None) -> list[str]:
        path = tmp_path / name
        if a is None:
            path.write_bytes(b"")
        else:
            np.save(path, a)
        return _args(registry, "--db-modality", "image", "--queries", str(path))

    ok = np.random.default_rng(0).normal(size=(4, 16))
    nan, inf = ok.copy(), ok.copy()
    nan[2, 5], inf[3, 0] = np.nan, np.inf
    big = ok.copy()
    big[1, 1] = 1e300  # finite in float64, infinite as the float32 the model takes
    cases = [
        ("empty.npy", None, "empty.npy: the file is empty (0 bytes)"),
        ("nan.npy", nan, "nan.npy: row 2 column 5 is nan; query features must be finite"),
        ("inf.npy", inf, "inf.npy: row 3 column 0 is inf; query features must be finite"),
        ("big.npy", big, "big.npy: row 1 column 1 is 1e+300; beyond the float32 range"),
        ("none.npy", np.zeros((0, 16)), "none.npy: holds no queries (shape (0, 16))"),
        ("complex.npy", ok + 1j, "complex.npy: dtype complex128 is not real numbers"),
    ]
    for name, a, want in cases:
        caplog.clear()
        msg = _bad_input(caplog, queries(name, a))
        assert f"--queries {tmp_path / name}" in msg and want in msg, msg
        assert not any("encoded" in r.getMessage() for r in caplog.records)  # nothing encoded


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for code planted in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pull_never_unpickles_the_stored_python_model(tmp_path, tiny_dataset):
    import pickle

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = register_small_model(
        tmp_path / "reg", name="pull-planted", dataset=tiny_dataset, tracking_uri=uri
    )
    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version("pull-planted", reg["registered"]["version"])
    store = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "copy")))
    planted = [p for p in Path(tmp_path).rglob("python_model.pkl") if store not in p.parents]
    assert planted, "the artifact store holds the logged python_model.pkl"
    marker = tmp_path / "payload-ran"
    for p in planted:  # the registry's own copy, as an attacker with store access would
        p.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(Exception):  # noqa: B017  MLflow's own loader runs the payload ...
        mlflow.pyfunc.load_model(mv.source)
    assert marker.exists()
    marker.unlink()
    summary = tmp_path / "summary.json"
    argv = ["--model", "pull-planted@champion", "--tracking-uri", uri, "--k", "3"]
    assert main([*argv, "--summary-json", str(summary)]) == 0  # ... jobs.pull does not
    assert not marker.exists()
    assert json.loads(summary.read_text())["results"]


def _register_with_index(root: Path, name: str, dataset: str, uri: str, search_index: dict) -> None:
    """Register a small untrained model whose config records ``search_index``."""
    import torch

    from pipeline.method.model import RSHNLModel
    from pipeline.tracking import runs as tracking
    from pipeline.tracking.serving import WEIGHTS, save_model_file

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    arch = {"image_dim": 24, "text_dim": 16, "num_classes": 6, "bits": 16, "hidden": 32}
    save_model_file(root / WEIGHTS, RSHNLModel(**arch), arch, {"epoch": 1})
    config = {
        "bits": 16,
        "method": "rshnl",
        "dataset": dataset,
        "data_version": "tiny/v1@000000000000",
        "search_index": search_index,
    }
    run_id = tracking.start_run(uri, "tests", "run-index", config, {})
    final = {"best_valid_map": {"i2t": 0.5, "t2i": 0.5, "mean": 0.5}, "best_epoch": 1}
    tracking.finish_run(
        uri,
        run_id,
        config=config,
        manifest={"name": "tiny", "version": 1},
        final_metrics=final,
        model_dir=root,
        registered_model_name=name,
    )


def test_index_recorded_with_the_model_is_what_pull_uses(tmp_path_factory, tiny_dataset):
    from pipeline.tracking.serving import load_model_dir

    uri = shared_tracking_uri(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("pull-index")
    recorded = {"kind": "ivf", "nlist": 4, "nprobe": 4, "seed": 5}
    _register_with_index(tmp / "reg", "pull-ivf", tiny_dataset, uri, recorded)
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts("models:/pull-ivf/1", dst_path=str(tmp / "dl"))
    model, mlmodel = load_model_dir(local)  # the spec travels in the model directory
    want = {**IndexSpec().to_dict(), **recorded}
    assert model.index == want and mlmodel["metadata"]["search_index"] == want

    def pull(name: str, *extra: str) -> dict:
        out, res = tmp / f"{name}.json", tmp / f"{name}.npz"
        argv = ["--model", "pull-ivf@champion", "--tracking-uri", uri, "--k", "20", "--show", "0"]
        assert main([*argv, "--results", str(res), "--summary-json", str(out), *extra]) == 0
        return {**np.load(res), "summary": json.loads(out.read_text())}

    ivf = pull("recorded")
    s = ivf["summary"]["index"]
    assert s["recorded"] == want and s["spec"] == want
    assert s["params"] == {"kind": "ivf", "nlist": 4, "nprobe": 4, "train_size": 48, "seed": 5}
    flat = pull("flat", "--index", "flat")
    assert flat["summary"]["index"]["kind"] == "flat"
    assert flat["summary"]["index"]["recorded"] == want
    few = pull("few", "--nprobe", "1")
    assert few["summary"]["index"]["params"]["nprobe"] == 1

    # nprobe = nlist: the exact scan's distances, ids equal up to ties, against brute force
    a = open_dataset(tiny_dataset).read_arrays("test", [S.ITEM_ID, S.IMAGE, S.TEXT])
    img = model.encode(a[S.IMAGE].astype(np.float32), "image")
    txt = model.encode(a[S.TEXT].astype(np.float32), "text")
    true = (img[:, None, :] != txt[None, :, :]).sum(-1)
    want_d = np.sort(true, axis=1)[:, :20]
    assert np.array_equal(ivf["distances"], want_d)
    assert np.array_equal(flat["distances"], want_d)
    pos = {int(v): j for j, v in enumerate(a[S.ITEM_ID])}
    for row in range(len(img)):
        got = [pos[int(v)] for v in ivf["ids"][row]]
        assert np.array_equal(true[row, got], want_d[row])
        assert len(set(got)) == 20
        dk = want_d[row, -1]
        assert {j for j in got if true[row, j] < dk} == set(np.flatnonzero(true[row] < dk))


def test_bad_index_flags_and_recorded_specs_are_refused(registry, caplog):
    msg = _bad_input(caplog, _args(registry, "--nprobe", "0"))
    assert msg == "bad input: --nprobe must be ≥ 1, got 0"
    msg = _bad_input(caplog, _args(registry, "--exact-below", "-3"))
    assert msg == "bad input: --exact-below must be ≥ 0, got -3"
    from pipeline.tracking.pull import PulledModel

    bad = PulledModel(uri="models:/x/1", pyfunc=None, arch={"bits": 8}, index={"kind": "pq"})
    with pytest.raises(PullError, match="models:/x/1 records a bad search index"):
        _ = bad.index_spec
