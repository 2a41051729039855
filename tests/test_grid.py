"""The benchmark grid: noisy copies, resumable cells, the Table-1 layout and the CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest

from feature_store.store import open_dataset
from pipeline.config import ConfigError, TrainConfig
from pipeline.experiments.grid import (
    GridSpec,
    format_csv,
    format_markdown,
    noisy_datasets,
    run_grid,
)


def _record(method, noise, bits, seed, i2t, t2i):
    return {
        "method": method, "noise": noise, "bits": bits, "seed": seed,
        "test_map": {"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2},
        "best_valid_map": {"mean": 0.5}, "best_epoch": 3, "epochs_run": 4,
        "seconds_per_epoch": 1.5, "valid_eval_seconds_per_epoch": 0.1, "test_eval_seconds": 0.2,
        "wall_seconds": 9.0, "restarts": 0, "data_version": "d", "mlflow_run_id": "r",
    }  # fmt: skip


def _spec(**kw) -> GridSpec:
    base = dict(
        base=TrainConfig(dataset="x"), methods=["RSHNL", "plain"], noise_rates=[0.2, 0.8],
        bits=[16], seeds=[0, 1], out="unused",
    )  # fmt: skip
    base.update(kw)
    return GridSpec(**base)


def test_markdown_is_table1_shaped_with_mean_std_and_bold_best():
    recs = [
        _record("RSHNL", 0.2, 16, 0, 0.50, 0.40),
        _record("RSHNL", 0.2, 16, 1, 0.54, 0.44),
        _record("plain", 0.2, 16, 0, 0.60, 0.30),
        _record("plain", 0.2, 16, 1, 0.60, 0.32),
        _record("RSHNL", 0.8, 16, 0, 0.30, 0.20),
    ]
    md = format_markdown(_spec(), recs)
    rows = [
        line for line in md.splitlines() if line.startswith("| I2T") or line.startswith("| T2I")
    ]
    assert rows[0] == "| I2T | RSHNL | 0.5200 ± 0.0283 | **0.3000 ± 0.0000** |"
    assert rows[1] == "| I2T | plain | **0.6000 ± 0.0000** | – |"
    assert rows[2] == "| T2I | RSHNL | **0.4200 ± 0.0283** | **0.2000 ± 0.0000** |"
    assert rows[3] == "| T2I | plain | 0.3100 ± 0.0141 | – |"
    assert "| Task | Method | 0.2 / 16 | 0.8 / 16 |" in md
    assert "| RSHNL | 0.2 | 16 | 2 | ray | 1.50 | 0.10 | 0.20 |" in md
    assert "†" not in md  # every cell trained through Ray


def test_markdown_marks_cells_not_trained_through_ray():
    recs = [
        _record("RSHNL", 0.2, 16, 0, 0.50, 0.40),
        _record("RSHNL", 0.2, 16, 1, 0.54, 0.44) | {"executor": "inprocess:cpu"},
        _record("plain", 0.2, 16, 0, 0.60, 0.30) | {"executor": "ray"},
        _record("plain", 0.8, 16, 0, 0.30, 0.20) | {"executor": "inprocess:cuda"},
    ]
    md = format_markdown(_spec(), recs)
    assert "† trained by the in-process executor, not the Ray path." in md.splitlines()[0]
    rows = [line for line in md.splitlines() if line.startswith("| I2T")]
    assert rows[0] == "| I2T | RSHNL | 0.5200 ± 0.0283† | – |"
    assert rows[1] == "| I2T | plain | **0.6000 ± 0.0000** | **0.3000 ± 0.0000**† |"
    assert "| RSHNL | 0.2 | 16 | 2 | inprocess:cpu, ray | 1.50 | 0.10 | 0.20 |" in md
    assert "| plain | 0.8 | 16 | 1 | inprocess:cuda | 1.50 | 0.10 | 0.20 |" in md


def test_csv_has_one_row_per_cell():
    rows = list(csv.DictReader(io.StringIO(format_csv([_record("RSHNL", 0.2, 16, 0, 0.5, 0.4)]))))
    assert len(rows) == 1
    assert float(rows[0]["test_map_mean"]) == pytest.approx(0.45)
    assert rows[0]["method"] == "RSHNL" and rows[0]["seconds_per_epoch"] == "1.5"


def test_bad_grid_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="unknown method"):
        _spec(methods=["RSHNL", "nope"]).validate()
    with pytest.raises(ConfigError, match=r"noise rate 1\.5"):
        _spec(noise_rates=[1.5]).validate()


def test_noisy_copies_are_made_once_and_reused(tiny_clean):
    first = noisy_datasets(tiny_clean, [0.0, 0.4], seed=5)
    again = noisy_datasets(tiny_clean, [0.4], seed=5)
    assert first[0.0] == open_dataset(tiny_clean).uri
    assert again[0.4] == first[0.4]
    assert open_dataset(first[0.4]).manifest["noise"]["rate"] == 0.4
    with pytest.raises(ConfigError, match=r"already has 0\.40 label noise"):
        noisy_datasets(first[0.4], [0.2], seed=5)


def test_grid_runs_cells_and_skips_them_when_run_again(tiny_clean, ray_cluster, tmp_path):
    base = TrainConfig(
        dataset=tiny_clean, bits=16, hidden_dim=32, epochs=2, warmup_epochs=1, batch_size=64,
        workers=1, storage_path=str(tmp_path / "runs"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="grid-test",
    )  # fmt: skip
    spec = GridSpec(
        base=base, methods=["RSHNL", "small-loss"], noise_rates=[0.4], bits=[16], seeds=[0],
        out=str(tmp_path / "grid"), max_concurrent=1,
    )  # fmt: skip
    out = run_grid(spec)
    assert out["complete"] and out["cells_done"] == 2 and out["cells_run_now"] == 2
    cells = sorted((tmp_path / "grid" / "cells").glob("*.json"))
    assert [c.name for c in cells] == ["RSHNL-n0.40-b16-s0.json", "small-loss-n0.40-b16-s0.json"]
    rec = json.loads(cells[1].read_text())
    assert rec["fingerprint"]["weighting"] == "small_loss" and rec["epochs_run"] == 2
    assert rec["seconds_per_epoch"] > 0
    assert not (tmp_path / "runs" / f"{out['grid']}-RSHNL-n0.40-b16-s0").exists()

    import mlflow

    client = mlflow.tracking.MlflowClient(base.tracking_uri)
    children = client.search_runs(
        [client.get_experiment_by_name("grid-test").experiment_id],
        f"tags.mlflow.parentRunId = '{out['parent_run_id']}'",
    )
    assert len(children) == 2
    # each cell records the test MAP its training run logged, and the table shows it
    for path in cells:
        cell = json.loads(path.read_text())
        logged = client.get_run(cell["mlflow_run_id"]).data.metrics
        for k in ("i2t", "t2i", "mean"):
            assert cell["test_map"][k] == pytest.approx(logged[f"final/test_map_{k}"], abs=1e-9)
        assert f"{cell['test_map']['i2t']:.4f}" in out["table_markdown"]

    again = run_grid(GridSpec(**{**spec.__dict__, "base": base}))
    assert again["cells_run_now"] == 0 and again["cells_done"] == 2
    assert again["table_markdown"] == out["table_markdown"]
    with pytest.raises(ConfigError, match=r"different settings \(\['epochs'\]\)"):
        run_grid(GridSpec(**{**spec.__dict__, "base": base.replace(epochs=3)}))


def test_inprocess_grid_runs_without_ray_and_logs_cells(tiny_clean, tmp_path, monkeypatch):
    import sys

    import mlflow

    from pipeline.experiments.grid import cell_config
    from pipeline.training.inprocess import train_in_process

    # as if Ray were not installed: importing ray or any ray.* module raises ImportError, even
    # when another test of the session has imported it already
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")] + ["ray"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import ray  # noqa: F401
    base = TrainConfig(
        dataset=tiny_clean, bits=16, hidden_dim=32, epochs=2, warmup_epochs=1, batch_size=64,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="grid-inprocess",
    )  # fmt: skip
    spec = GridSpec(
        base=base, methods=["RSHNL-S", "plain"], noise_rates=[0.4], bits=[16], seeds=[0, 1],
        out=str(tmp_path / "grid"), executor="inprocess",
    )  # fmt: skip
    out = run_grid(spec)
    assert out["complete"] and out["cells_run_now"] == 4 and not out["failed"]
    rows = list(csv.DictReader((tmp_path / "grid" / "cells.csv").open()))
    assert {r["executor"] for r in rows} == {"inprocess:cpu"} and len(rows) == 4
    client = mlflow.tracking.MlflowClient(base.tracking_uri)
    for r in rows:
        logged = client.get_run(r["mlflow_run_id"]).data.metrics
        assert float(r["test_map_mean"]) == pytest.approx(logged["test_map_mean"], abs=1e-6)
    # a cell is the training of its method's config: run one again, outside the grid
    cell = next(c for c in spec.cells() if (c.method, c.seed) == ("RSHNL-S", 1))
    noisy = noisy_datasets(tiny_clean, [0.4], seed=spec.noise_seed)[0.4]
    again = train_in_process(cell_config(spec, cell, noisy, out["grid"]))
    rec = json.loads((tmp_path / "grid" / "cells" / f"{cell.id}.json").read_text())
    assert rec["fingerprint"]["weighting"] == "hard"
    assert rec["test_map"] == pytest.approx(again["test_map"], abs=1e-9)
    assert "±" in out["table_markdown"]  # two seeds: mean ± std
    with pytest.raises(ConfigError, match="always logs"):
        GridSpec(**{**spec.__dict__, "executor": "ray", "tracking": False}).validate()


def test_fingerprints_recorded_before_a_new_key_still_match():
    from pipeline.experiments.grid import fingerprint, fingerprint_diff

    new = fingerprint(TrainConfig(dataset="x"))
    old = {k: v for k, v in new.items() if k != "weight_decay"}
    assert fingerprint_diff(old, new) == []
    assert fingerprint_diff(old, {**new, "weight_decay": 0.1}) == ["weight_decay"]
    assert fingerprint_diff({**old, "epochs": 3}, new) == ["epochs"]


def test_cells_recorded_with_other_checkpoint_settings_still_match():
    """Cells written when every epoch was checkpointed (the old default) are the same cells."""
    from pipeline.experiments.grid import fingerprint, fingerprint_diff

    new = fingerprint(TrainConfig(dataset="x"))
    assert "checkpoint_every" not in new and "checkpoint_interval_s" not in new
    old = {**new, "checkpoint_every": 1, "center_sync_check_every": 5}
    assert fingerprint_diff(old, new) == []
    assert fingerprint_diff({**old, "lr": 0.5}, new) == ["lr"]


def test_plain_loop_benchmark_times_every_epoch(tiny_clean):
    from pipeline.experiments.benchmark import plain_loop_seconds

    cfg = TrainConfig(dataset=tiny_clean, bits=16, hidden_dim=32, batch_size=64)
    secs = plain_loop_seconds(cfg.replace(weighting="small_loss"), epochs=2, threads=1)
    assert len(secs) == 2 and all(s > 0 for s in secs)
