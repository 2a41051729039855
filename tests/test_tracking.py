"""finish_run: artifacts and plots a reviewer expects, and the champion promotion rule
(the compare-and-set and the broken-run guards: test_promotion.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_serving import register_small_model, shared_tracking_uri, small_history

from pipeline.retrieval import metrics as evaluate
from pipeline.tracking import plots
from pipeline.tracking import runs as tracking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pr_curves() -> dict:
    rng = np.random.default_rng(0)
    img = np.where(rng.random((60, 16)) < 0.5, 1, -1)
    txt = img.copy()
    txt[:, :6] = np.where(rng.random((60, 6)) < 0.5, 1, -1)
    labels = np.eye(4, dtype=int)[rng.integers(0, 4, 60)]
    return evaluate.cross_modal_pr_curves(img, txt, labels)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    uri = shared_tracking_uri(tmp_path_factory)
    reg = register_small_model(
        tmp_path_factory.mktemp("tracking"),
        name="tracking-artifacts",
        tracking_uri=uri,
        history=small_history(epochs=5),
        pr_curves=_pr_curves(),
    )
    return reg, tmp_path_factory.mktemp("download")


def test_run_has_every_artifact_and_plot(full_run):
    reg, dl = full_run
    client = _client(reg["tracking_uri"])
    run_id = reg["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "config.yaml",
        "dataset_manifest.json",
        "final_metrics.json",
        "history.json",
        "pr_curves.json",
        "plots",
    } <= top
    pngs = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert pngs == {
        f"plots/{n}"
        for n in (
            plots.VALID_MAP_PNG,
            plots.LOSSES_PNG,
            plots.PR_PNG,
            plots.WEIGHTS_PNG,
            plots.NOISE_PNG,
        )
    }
    local = Path(client.download_artifacts(run_id, "", str(dl)))
    for name in pngs:
        data = (local / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert yaml.safe_load((local / "config.yaml").read_text())["warmup_epochs"] == 1
    assert json.loads((local / "final_metrics.json").read_text())["best_valid_map"]["mean"] == 0.5
    assert json.loads((local / "history.json").read_text())["epoch"] == [1, 2, 3, 4, 5]
    assert set(json.loads((local / "pr_curves.json").read_text())) == {"i2t", "t2i"}
    assert run.data.metrics["final/best_valid_map_mean"] == pytest.approx(0.5)
    assert "plot_problems" not in run.data.tags


def test_first_registration_becomes_champion(full_run):
    reg, _ = full_run
    assert reg["registered"]["name"] == "tracking-artifacts"
    assert reg["registered"]["version"] == "1"
    assert reg["registered"]["alias"] == "champion"
    client = _client(reg["tracking_uri"])
    mv = client.get_model_version_by_alias("tracking-artifacts", "champion")
    assert str(mv.version) == "1" and mv.run_id == reg["run_id"]
    assert mv.tags["data_version"] == "tiny/v1@000000000000"
    assert float(mv.tags["valid_map_mean"]) == pytest.approx(0.5)
    assert client.get_run(reg["run_id"]).data.tags["promotion"] == "champion"


def test_promotion_rule(tmp_path_factory):
    uri = shared_tracking_uri(tmp_path_factory)
    root = tmp_path_factory.mktemp("promotion")
    client = _client(uri)
    name = "promotion-rule"

    def register(seed: int, valid_map: float, data_version: str = "tiny/v1@aaa") -> dict:
        return register_small_model(
            root,
            name=name,
            valid_map=valid_map,
            data_version=data_version,
            seed=seed,
            tracking_uri=uri,
        )

    first = register(1, 0.40)
    assert first["registered"]["alias"] == "champion"

    worse = register(2, 0.35)
    assert worse["registered"]["alias"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    tags = client.get_run(worse["run_id"]).data.tags
    assert tags["promotion"] == "not_promoted"
    assert "does not beat" in tags["promotion_reason"] and "0.4000" in tags["promotion_reason"]

    equal = register(3, 0.40)  # a tie does not beat the champion
    assert equal["registered"]["alias"] is None

    better = register(4, 0.45)
    assert better["registered"]["alias"] == "champion"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    assert "beats" in client.get_run(better["run_id"]).data.tags["promotion_reason"]

    other_data = register(5, 0.90, data_version="tiny/v2@bbb")
    assert other_data["registered"]["alias"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    reason = client.get_run(other_data["run_id"]).data.tags["promotion_reason"]
    assert "not comparable" in reason and "tiny/v1@aaa" in reason and "tiny/v2@bbb" in reason
    mv5 = client.get_model_version(name, "5")
    assert mv5.tags["promotion"] == "not_promoted" and mv5.tags["data_version"] == "tiny/v2@bbb"

    # a longer code on the same data is another retrieval problem, not a better model
    longer = register_small_model(
        root,
        name=name,
        valid_map=0.95,
        seed=6,
        bits=32,
        tracking_uri=uri,
        data_version="tiny/v1@aaa",
    )
    assert longer["registered"]["alias"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    reason = longer["registered"]["promotion_reason"]
    assert "bits 16" in reason and "bits 32" in reason and "differ in bits" in reason
    mv6 = client.get_model_version(name, "6")
    assert (mv6.tags["bits"], mv6.tags["method"]) == ("32", "rshnl")


def test_finish_run_keeps_the_old_call_and_a_bare_number_as_valid_map(tmp_path_factory):
    """The original keyword set still works (no history, no PR curves, no plots)."""
    uri = shared_tracking_uri(tmp_path_factory)
    run_id = tracking.start_run(uri, "tests", "old-call", {"bits": 16}, {})
    registered = tracking.finish_run(
        uri,
        run_id,
        config={"bits": 16},
        manifest={"name": "x", "version": 2, "files": {"a": {"sha256": "0"}}},
        final_metrics={"best_valid_map": 0.3, "test_map": {"mean": 0.2}},
        model_dir=None,
        registered_model_name=None,
    )
    assert registered is None
    client = _client(uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "config.yaml",
        "dataset_manifest.json",
        "final_metrics.json",
    }
    assert client.get_run(run_id).data.metrics["final/best_valid_map"] == pytest.approx(0.3)
    assert tracking._valid_map({"best_valid_map": 0.3}) == pytest.approx(0.3)
    assert tracking._valid_map({"best_valid_map": {"mean": float("nan")}}) is None
    # the data version is derived from the manifest when the config has none
    assert tracking.data_version_of({}, {"name": "x", "version": 2, "files": {}}).startswith(
        "x/v2@"
    )


def test_malformed_history_is_reported_not_fatal(tmp_path_factory):
    uri = shared_tracking_uri(tmp_path_factory)
    run_id = tracking.start_run(uri, "tests", "bad-history", {}, {})
    history = small_history(epochs=3)
    history["weight_hist_noisy"] = history["weight_hist_noisy"][:2]  # one epoch short
    tracking.finish_run(
        uri,
        run_id,
        config={},
        manifest={},
        final_metrics={},
        model_dir=None,
        registered_model_name=None,
        history=history,
    )
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert plots.WEIGHTS_PNG in run.data.tags["plot_problems"]
    pngs = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert f"plots/{plots.VALID_MAP_PNG}" in pngs and f"plots/{plots.WEIGHTS_PNG}" not in pngs


def test_write_run_plots_and_epoch_selection(tmp_path):
    history = small_history(epochs=3)
    written, problems = plots.write_run_plots(tmp_path, history=history, warmup_epochs=1)
    assert problems == []
    assert {p.name for p in written} == {
        plots.VALID_MAP_PNG,
        plots.LOSSES_PNG,
        plots.WEIGHTS_PNG,
        plots.NOISE_PNG,
    }
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
    picked = plots._select_epochs(30, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 29
    assert picked == sorted(picked) and plots._select_epochs(3, 8) == [0, 1, 2]
    bad = dict(history, weight_hist_clean=[[1, 2, 3]] * 3)
    with pytest.raises(ValueError, match="bins"):
        plots.plot_weight_density(bad, tmp_path / "x.png")


def test_code_version_digests_every_package_and_changes_with_the_source(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    files = {str(p.relative_to(root)) for p in tracking.source_files()}
    for f in ("pipeline/method/losses.py", "pipeline/training/epoch.py", "jobs/train.py"):
        assert f in files
    assert "feature_store/store.py" in files
    # a copy of the tree with one changed line gets another digest
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes((root / f).read_bytes())
    monkeypatch.setattr(tracking, "_PKG_ROOT", tmp_path)
    before = tracking.code_version()["code_digest"]
    with open(tmp_path / "pipeline/method/losses.py", "a") as fh:
        fh.write("# changed\n")
    assert tracking.code_version()["code_digest"] != before


def test_the_logged_model_carries_the_whole_pipeline_package(tmp_path):
    import mlflow.artifacts

    ids = register_small_model(tmp_path, name="rshnl-code-paths")
    got = Path(
        mlflow.artifacts.download_artifacts(
            run_id=ids["run_id"], artifact_path="model/code", tracking_uri=ids["tracking_uri"],
            dst_path=str(tmp_path / "dl"),
        )
    )  # fmt: skip
    for f in ("method/model.py", "method/weights.py", "tracking/serving.py"):
        assert (got / "pipeline" / f).is_file(), f
