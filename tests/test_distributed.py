"""Distributed training: synchronized centers, resume, and recovery from a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import mlflow
import pytest
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.method.model import fixed_centers, hadamard
from pipeline.training.step import center_checksum


def _cfg(dataset: str, root, **kw) -> TrainConfig:
    base = dict(
        dataset=dataset,
        bits=16,
        hidden_dim=32,
        epochs=3,
        warmup_epochs=1,
        batch_size=48,
        lr=1e-3,
        workers=2,
        storage_path=str(root / "runs"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_name="dist",
        register_model=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _history(cfg: TrainConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_fixed_centers_are_seeded_normalised_signs():
    h = hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    c = fixed_centers("hadamard", 6, 16, seed=3)
    assert torch.allclose(c @ c.T, torch.eye(6), atol=1e-6)  # distinct Hadamard rows: orthogonal
    r = fixed_centers("random", 6, 16, seed=3)
    assert torch.equal(r, fixed_centers("random", 6, 16, seed=3))
    assert not torch.equal(r, fixed_centers("random", 6, 16, seed=4))
    assert torch.allclose(r.abs(), torch.full_like(r, 0.25))  # ±1/√L
    with pytest.raises(ValueError, match="bits ≥ classes"):
        fixed_centers("hadamard", 20, 16, seed=0)


@pytest.mark.ray
@pytest.mark.parametrize(
    "workers,centers",
    [
        (3, "learned"),
        pytest.param(2, "random", marks=pytest.mark.slow),
        pytest.param(3, "hadamard", marks=pytest.mark.slow),
    ],
)
def test_centers_bit_identical_on_every_rank(ray_cluster, tiny_dataset, tmp_path, workers, centers):
    from pipeline.training.trainer import run_training

    cfg = _cfg(
        tiny_dataset,
        tmp_path,
        workers=workers,
        centers=centers,
        epochs=2,
        cpus_per_worker=0.5,
        center_sync_check_every=1,
    )
    s = run_training(cfg)  # the per-step check all-gathers the centers and fails on any difference
    assert len(s["center_checksums"]) == workers
    assert len(set(s["center_checksums"])) == 1
    assert s["global_negatives"] is True
    if centers != "learned":
        expected = fixed_centers(centers, 6, 16, seed=cfg.seed)
        assert s["center_checksums"][0] == center_checksum(expected)


@pytest.mark.ray
@pytest.mark.slow  # the default tier resumes in test_resume_falls_back_when_the_latest_...
def test_resume_continues_from_latest_checkpoint(ray_cluster, tiny_dataset, tmp_path):
    from pipeline.training.trainer import run_training

    first = run_training(_cfg(tiny_dataset, tmp_path, epochs=2, run_name="resumable"))
    assert first["epochs_run"] == 2
    with pytest.raises(ConfigError, match="pass --resume"):
        run_training(_cfg(tiny_dataset, tmp_path, epochs=4, run_name="resumable"))
    cfg = _cfg(tiny_dataset, tmp_path, epochs=4, run_name="resumable", resume=True)
    second = run_training(cfg)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["epochs_run"] == 4
    steps = [s for s, _ in _history(cfg, second["mlflow_run_id"], "valid_map_mean")]
    assert steps == [1, 2, 3, 4]  # no epoch repeated or skipped


@pytest.mark.ray
@pytest.mark.slow  # the default tier resumes past a broken checkpoint in test_checkpoint_policy
def test_resume_falls_back_when_the_latest_checkpoint_is_lost(ray_cluster, tiny_dataset, tmp_path):
    import json
    import shutil

    from pipeline.training.trainer import SNAPSHOT, run_training

    first = run_training(_cfg(tiny_dataset, tmp_path, epochs=3, run_name="lost"))
    run_dir = tmp_path / "runs" / "lost"
    snap = json.loads((run_dir / SNAPSHOT).read_text())
    latest = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    kept = sorted(
        (r["metrics"]["epoch"], r["checkpoint_dir_name"])
        for r in snap["checkpoint_results"]
        if r["checkpoint_dir_name"] != latest
    )
    assert kept, "Ray kept only the latest checkpoint"
    shutil.rmtree(run_dir / latest)
    with pytest.raises(ConfigError, match=r"config 'lr' = 0\.01 differs from 0\.001"):
        run_training(_cfg(tiny_dataset, tmp_path, epochs=4, run_name="lost", resume=True, lr=0.01))
    cfg = _cfg(tiny_dataset, tmp_path, epochs=4, run_name="lost", resume=True)
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"
    second = run_training(cfg)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["epochs_run"] == 4
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    fallback_epoch, fallback = kept[-1]
    assert run.data.tags["resumed_from"] == f"{fallback} (after epoch {fallback_epoch})"
    assert run.data.tags["resume_changes"] == "epochs: 3 → 4"
    steps = {s for s, _ in _history(cfg, second["mlflow_run_id"], "valid_map_mean")}
    assert steps == {1, 2, 3, 4}


@pytest.mark.ray
@pytest.mark.slow  # about a minute of Ray Train restarts
def test_killed_worker_restarts_from_checkpoint(ray_cluster, tiny_dataset, tmp_path):
    import ray

    from pipeline.training.trainer import run_training

    cfg = _cfg(tiny_dataset, tmp_path, epochs=6, max_failures=1, run_name="killed", hidden_dim=256)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and killed is None:
        time.sleep(0.2)
        try:
            status = ray.get(ray.get_actor("rshnl-monitor-killed").status.remote())
        except ValueError:
            continue
        if status["epochs_done"] >= 2 and 1 in status["workers"]:
            killed = status["workers"][1]["pid"]
            os.kill(killed, signal.SIGKILL)  # rank 1 dies during epoch 3
    assert killed is not None, "training never reached epoch 2"
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["epochs_run"] == 6
    assert result["restarts"] == 1
    steps = [s for s, _ in _history(cfg, result["mlflow_run_id"], "valid_map_mean")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    # An epoch that ran after the last committed checkpoint is run again after the restart, so a
    # step can be logged twice; the later value belongs to the run's final trajectory.
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    final: dict[int, float] = {}
    for m in sorted(
        client.get_metric_history(result["mlflow_run_id"], "best_valid_map_mean"),
        key=lambda m: m.timestamp,
    ):
        final[m.step] = m.value
    best = [final[step] for step in sorted(final)]
    assert best == sorted(best)  # the best MAP survives the restart: never goes down


@pytest.mark.slow
@pytest.mark.ray
def test_one_and_two_workers_agree_on_wikipedia(ray_cluster, wiki_mat, tmp_path):
    """Same seed and global batch: 1 and 2 workers reach validation MAP within 0.02."""
    from feature_store.formats import read_wiki_mat
    from feature_store.noise import apply_noise
    from feature_store.store import write_dataset
    from pipeline.training.trainer import run_training

    splits, meta = read_wiki_mat(wiki_mat)
    noise = apply_noise(splits["train"], "symmetric", 0.2, seed=0)
    uri = write_dataset(
        str(tmp_path / "store"),
        "wiki",
        splits,
        source=meta["source"],
        noise=noise,
        protocol=meta["protocol"],
    )
    common = dict(bits=64, hidden_dim=1024, epochs=6, warmup_epochs=3, batch_size=256, lr=1e-4)
    one = run_training(_cfg(uri, tmp_path, workers=1, **common))
    two = run_training(_cfg(uri, tmp_path, workers=2, **common))
    assert two["global_negatives"] is True
    gap = abs(one["best_valid_map"]["mean"] - two["best_valid_map"]["mean"])
    assert gap < 0.02, (one["best_valid_map"], two["best_valid_map"])
