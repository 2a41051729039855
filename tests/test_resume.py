"""Resume keeps provenance true: mismatches are refused before Ray starts, a broken latest
checkpoint falls back to the newest intact one, a finished run keeps its status, and a run that
fails after it started is marked FAILED. No Ray cluster: the fit is replaced where needed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from feature_store.store import open_dataset
from pipeline.config import ConfigError, TrainConfig
from pipeline.method.model import RSHNLModel
from pipeline.method.weights import WEIGHTS, save_model_file
from pipeline.tracking import runs as tracking
from pipeline.training import trainer
from pipeline.training.step import arch_of
from pipeline.training.train_loop import STATE, save_train_state

REPO = Path(__file__).resolve().parent.parent


def _cfg(dataset: str, root: Path, **kw) -> TrainConfig:
    base = dict(
        dataset=dataset,
        bits=16,
        hidden_dim=32,
        epochs=3,
        warmup_epochs=1,
        batch_size=48,
        workers=1,
        storage_path=str(root / "runs"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_name="resume",
        run_name="r1",
        register_model=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _started_run(cfg: TrainConfig, status: str) -> str:
    """An earlier start of ``cfg.run_name``: its MLflow run (in ``status``) and run info."""
    ds = open_dataset(cfg.dataset)
    uri = cfg.tracking_uri
    run_id = tracking.start_run(uri, cfg.experiment_name, cfg.run_name, cfg.to_dict(), {})
    if status != "RUNNING":
        mlflow.tracking.MlflowClient(uri).set_terminated(run_id, status)
    info = {"mlflow_run_id": run_id, "tracking_uri": uri}
    trainer._write_run_info(cfg, cfg.run_name, info | trainer._resume_record(cfg, ds))
    return run_id


def _status(cfg: TrainConfig, run_id: str) -> str:
    return mlflow.tracking.MlflowClient(cfg.tracking_uri).get_run(run_id).info.status


def _no_ray(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(trainer, "ensure_ray", fail)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"lr": 5e-4}, "config 'lr' = 0.0005 differs from 0.0001"),
        ({"bits": 32}, "config 'bits' = 32 differs from 16"),
        ({"seed": 7}, "config 'seed' = 7 differs from 0"),
    ],
)
def test_mismatched_config_is_refused_before_ray(
    tiny_dataset, tmp_path, monkeypatch, change, needle
):
    run_id = _started_run(_cfg(tiny_dataset, tmp_path), "FINISHED")
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        trainer.run_training(_cfg(tiny_dataset, tmp_path, resume=True, **change))
    assert _status(_cfg(tiny_dataset, tmp_path), run_id) == "FINISHED"


def test_other_data_version_or_dims_is_refused(tiny_dataset, tiny_clean, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)
    run_id = _started_run(cfg, "FAILED")
    _no_ray(monkeypatch)
    old = open_dataset(tiny_dataset).data_version
    new = open_dataset(tiny_clean).data_version
    with pytest.raises(ConfigError, match=f"data_version {old}, but .* is {new}"):
        trainer.run_training(_cfg(tiny_clean, tmp_path, resume=True))
    # the same data_version with other dims cannot exist; a forged record shows the dims check
    info = trainer.read_run_info(cfg, "r1")
    info["dims"] = {"image": 99, "text": 16}
    trainer._write_run_info(cfg, "r1", info)
    with pytest.raises(ConfigError, match=r"feature dims \{'image': 99, 'text': 16\}"):
        trainer.run_training(_cfg(tiny_dataset, tmp_path, resume=True))
    assert _status(cfg, run_id) == "FAILED"


def test_cli_mismatched_resume_exits_2_with_one_line(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    _started_run(cfg, "FINISHED")
    args = ["--dataset", tiny_dataset, "--run-name", "r1", "--resume", "--lr", "0.01"]
    args += ["--storage-path", cfg.storage_path, "--tracking-uri", cfg.tracking_uri]
    args += ["--bits", "16", "--hidden-dim", "32", "--epochs", "3", "--warmup-epochs", "1"]
    args += ["--batch-size", "48", "--workers", "1", "--experiment-name", "resume", "--no-register"]
    r = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "config 'lr' = 0.01 differs from 0.0001" in errors[0]
    assert "Traceback" not in r.stderr


def test_epochs_may_change_and_are_recorded(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)
    _started_run(cfg, "FAILED")
    ds = open_dataset(tiny_dataset)
    changes = trainer.check_resume(
        trainer.read_run_info(cfg, "r1"),
        _cfg(tiny_dataset, tmp_path, resume=True, epochs=5, workers=2),
        ds,
        cfg.tracking_uri,
        "r1",
    )
    assert changes == ["epochs: 3 → 5", "workers: 1 → 2"]


def _checkpoint(run_dir: Path, name: str, cfg: TrainConfig, epochs_done: int) -> dict:
    d = run_dir / name
    d.mkdir(parents=True)
    ds = open_dataset(cfg.dataset)
    arch = arch_of(cfg, ds.dims, ds.num_classes)
    model = RSHNLModel(**arch)
    save_model_file(d / WEIGHTS, model, arch, {"epoch": epochs_done})
    opt = torch.optim.Adam(model.parameters())
    save_train_state(d / STATE, opt.state_dict(), epochs_done - 1, 0.1 * epochs_done, 1, {})
    return {"version": 0, "checkpoint_dir_name": name, "metrics": {"epoch": epochs_done}}


def _snapshot(run_dir: Path, results: list[dict], latest: dict) -> Path:
    import ray

    snap = {
        "ray_version": ray.__version__,
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(results))),
        "latest_checkpoint_result": latest,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(results),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    path = run_dir / trainer.SNAPSHOT
    path.write_text(json.dumps(snap))
    return path


@pytest.mark.parametrize("damage", ["deleted", "truncated", "planted"])
def test_broken_latest_checkpoint_falls_back_to_newest_intact(
    tiny_dataset, tmp_path, caplog, damage
):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
    )

    cfg = _cfg(tiny_dataset, tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    older = _checkpoint(run_dir, "checkpoint_2026-01-01_00-00-01.000001", cfg, 2)
    latest = _checkpoint(run_dir, "checkpoint_2026-01-01_00-00-03.000001", cfg, 3)
    path = _snapshot(run_dir, [older, latest], latest)
    broken = run_dir / latest["checkpoint_dir_name"] / STATE
    marker = tmp_path / "marker"
    if damage == "deleted":
        broken.unlink()
    elif damage == "truncated":
        broken.write_bytes(broken.read_bytes()[:64])
    else:
        payload = f"open({str(marker)!r}, 'w').write('ran')"
        torch.save({"x": type("P", (), {"__reduce__": lambda s: (exec, (payload,))})()}, broken)
    ds = open_dataset(tiny_dataset)
    with caplog.at_level(logging.WARNING):
        name, done = trainer.choose_resume_checkpoint(
            cfg, "r1", arch_of(cfg, ds.dims, ds.num_classes)
        )
    assert (name, done) == (older["checkpoint_dir_name"], 2)
    assert f"cannot be resumed from: {broken}" in caplog.text or STATE in caplog.text
    assert f"resumes from checkpoint {name} (after epoch 2), the newest intact one" in caplog.text
    snap = _CheckpointManagerState.parse_obj(json.loads(path.read_text()))  # Ray reads it back
    assert [r.checkpoint_dir_name for r in snap.checkpoint_results] == [name]
    assert snap.latest_checkpoint_result.checkpoint_dir_name == name
    assert not marker.exists()


def test_no_intact_checkpoint_or_other_architecture_is_bad_input(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    only = _checkpoint(run_dir, "checkpoint_a", cfg, 1)
    _snapshot(run_dir, [only], only)
    ds = open_dataset(tiny_dataset)
    wide = arch_of(cfg.replace(hidden_dim=64), ds.dims, ds.num_classes)
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint_a has hidden = 32, .* 64"):
        trainer.choose_resume_checkpoint(cfg, "r1", wide)
    (run_dir / "checkpoint_a" / WEIGHTS).unlink()
    with pytest.raises(
        ConfigError, match=r"no intact checkpoint .*checkpoint_a: model\.pt is missing"
    ):
        trainer.choose_resume_checkpoint(cfg, "r1", arch_of(cfg, ds.dims, ds.num_classes))


def test_failed_resume_keeps_a_finished_run_finished(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)
    run_id = _started_run(cfg, "FINISHED")

    def broken_fit(*a, **k):
        raise trainer.TrainingError("workers died")

    monkeypatch.setattr(trainer, "_fit", broken_fit)
    with pytest.raises(trainer.TrainingError):
        trainer.run_training(_cfg(tiny_dataset, tmp_path, resume=True, epochs=5))
    run = mlflow.tracking.MlflowClient(cfg.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume_error"] == "TrainingError: workers died"
    assert run.data.tags["resume_changes"] == "epochs: 3 → 5"


def test_failed_resume_of_an_unfinished_run_marks_it_failed(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)
    run_id = _started_run(cfg, "KILLED")
    seen = {}

    def broken_fit(cfg, ds, norm, run_name, run_id, uri, *a):
        seen["status"] = _status(cfg, run_id)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_fit", broken_fit)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training(_cfg(tiny_dataset, tmp_path, resume=True))
    assert seen["status"] == "RUNNING" and _status(cfg, run_id) == "FAILED"


def test_finished_run_with_nothing_left_to_train_is_refused(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)
    _started_run(cfg, "FINISHED")
    run_dir = tmp_path / "runs" / "r1"
    last = _checkpoint(run_dir, "checkpoint_a", cfg, 3)
    _snapshot(run_dir, [last], last)
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match="finished 3 epochs; pass --epochs above 3"):
        trainer.run_training(_cfg(tiny_dataset, tmp_path, resume=True))


def test_unwritable_storage_is_bad_input_and_starts_no_run(tiny_dataset, tmp_path, monkeypatch):
    (tmp_path / "plain-file").write_text("not a directory")
    cfg = _cfg(tiny_dataset, tmp_path, storage_path=str(tmp_path / "plain-file" / "runs"))
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match=r"storage_path '.*plain-file/runs': cannot write there"):
        trainer.run_training(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name("resume")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_failure_after_the_run_started_marks_it_failed(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset, tmp_path)

    def lost_storage(*a, **k):
        raise OSError("bucket went away")

    monkeypatch.setattr(trainer, "_write_run_info", lost_storage)
    with pytest.raises(OSError, match="bucket went away"):
        trainer.run_training(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "OSError: bucket went away"


def test_missing_s3_bucket_is_bad_input_and_starts_no_run(
    tiny_dataset,
    tmp_path,
    s3,
    monkeypatch,
):
    bucket, client = s3
    cfg = _cfg(tiny_dataset, tmp_path, storage_path=f"s3://{bucket}-missing/runs")
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match=f"storage_path 's3://{bucket}-missing/runs': cannot"):
        trainer.run_training(cfg)
    mlflow_client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    exp = mlflow_client.get_experiment_by_name("resume")
    assert exp is None or not mlflow_client.search_runs([exp.experiment_id])
    trainer.check_storage(cfg.replace(storage_path=f"s3://{bucket}/runs"))  # writable
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if ".write-check" in k]  # the probe was removed
