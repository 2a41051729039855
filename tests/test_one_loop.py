"""One training epoch for every executor: a Ray Train worker and the in-process executor, given
the same seed, produce the same per-epoch losses and validation MAP (RSHNL and SCBCH)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig

pytestmark = pytest.mark.ray


def _ml_dataset(tmp_path) -> str:
    from synthetic_util import write_synthetic

    return write_synthetic(
        tmp_path / "ml-store", "ml", noise=("multilabel", 0.5, 1), num_classes=8,
        counts={"train": 160, "valid": 40, "query": 30, "database": 120}, image_dim=12,
        text_dim=10, label_kind="multi", max_labels=3, difficulty=0.1, seed=5,
    )  # fmt: skip


# the SCBCH case (about a minute) runs in the slow tier: the default tier is near 10 minutes here
@pytest.mark.parametrize("method", ["rshnl", pytest.param("scbch", marks=pytest.mark.slow)])
def test_ray_worker_and_in_process_train_identically(method, ray_cluster, tiny_dataset, tmp_path):
    from pipeline.training.inprocess import train_in_process
    from pipeline.training.trainer import run_training

    dataset = tiny_dataset if method == "rshnl" else _ml_dataset(tmp_path)
    cfg = TrainConfig(
        dataset=dataset, method=method, bits=16, hidden_dim=32, epochs=4, warmup_epochs=2,
        batch_size=32, lr=1e-3, workers=1, cpus_per_worker=1, scbch_k=5, seed=7,
        weighting="mixture" if method == "rshnl" else "spl", tau_center=0.2,
        storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        register_model=False,
    )  # fmt: skip
    torch.set_num_threads(1)
    ray_run = run_training(cfg, log_model=False)["history"]
    local = train_in_process(cfg)["history"]
    assert len(ray_run["loss"]) == len(local["loss"]) == 4
    np.testing.assert_allclose(ray_run["loss"], local["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ray_run["valid_map_mean"], local["valid_map_mean"], atol=1e-5)
    np.testing.assert_allclose(ray_run["noise_auc"], local["noise_auc"], atol=1e-5)
    # one per-epoch record: the same history keys, and every per-epoch series agrees
    assert set(ray_run) == set(local)
    for key, series in ray_run.items():
        np.testing.assert_allclose(series, local[key], atol=1e-5, err_msg=key)
    assert len(set(np.round(local["loss"], 6))) == 4  # the epochs differ: the loss is not constant
