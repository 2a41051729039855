"""Training in one process without Ray or MLflow: the grid's executor on machines without them.

The same epoch (``pipeline.training.epoch.train_epoch``), model, objective, SCBCH weights,
detection and evaluation as the Ray Train loop; no checkpoints, no fault tolerance, no tracking. The
best epoch by validation MAP is kept in memory and evaluated on the test split.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feature_store import schema as S
from feature_store.store import DatasetVersion, open_dataset
from pipeline.config import TrainConfig
from pipeline.method.model import HashModel
from pipeline.method.suspects import (
    DETECTION_KEYS,
    TrainReference,
    suspect_report,
)
from pipeline.retrieval.protocol import EvalProtocol
from pipeline.training.data import feature_normalisation
from pipeline.training.epoch import MemoryShard, epoch_pair_weights, next_mixture, train_epoch
from pipeline.training.final_eval import final_evaluation
from pipeline.training.guards import TrainingError
from pipeline.training.record import RunRecord
from pipeline.training.step import epoch_gamma, make_optimizer, seed_everything, setup_model

log = logging.getLogger(__name__)


@dataclass
class InMemoryRun:
    """A run's config, data (NumPy and an on-device shard), model and optimizer in one process."""

    cfg: TrainConfig
    ds: DatasetVersion
    arrays: dict[str, np.ndarray]
    shard: MemoryShard
    model: HashModel
    optimizer: torch.optim.Optimizer


def prepare_in_memory(cfg: TrainConfig, device: str = "cpu") -> InMemoryRun:
    """Seed, read the train split onto ``device`` and build the model and optimizer of ``cfg``."""
    cfg.validate()
    seed_everything(cfg.seed)
    dev = torch.device(device)
    ds = open_dataset(cfg.dataset)
    a = ds.read_arrays("train", [S.ITEM_ID, S.IMAGE, S.TEXT, S.LABEL])
    norm = feature_normalisation(ds) if cfg.feature_norm == "standardize" else {}
    cfg, model = setup_model(cfg, ds.manifest, ds.dims, ds.num_classes, norm)
    model.to(dev)
    return InMemoryRun(
        cfg=cfg,
        ds=ds,
        arrays=a,
        shard=MemoryShard.from_arrays(a[S.ITEM_ID], a[S.IMAGE], a[S.TEXT], a[S.LABEL], dev),
        model=model,
        optimizer=make_optimizer(model, cfg),
    )


def train_in_process(cfg: TrainConfig, device: str = "cpu") -> dict[str, Any]:
    """Train ``cfg`` on one device; return the run summary (test MAP at the best valid epoch).

    The summary's ``_suspects`` holds the last epoch's suspect-label report (a pyarrow Table).
    """
    run = prepare_in_memory(cfg, device)
    cfg, ds, a, model, opt = run.cfg, run.ds, run.arrays, run.model, run.optimizer
    dev = torch.device(device)
    record = RunRecord(
        cfg, EvalProtocol.load(ds, "valid", cfg.eval_top_k), TrainReference.load(ds)
    )  # validation, detection (joined by id, not in the loss) and the history
    best_state = None
    train_s, epoch_s, eval_s = [], [], []
    mixture, result = None, None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        pair_weights = epoch_pair_weights(model, a, cfg, epoch, dev)
        gamma = epoch_gamma(cfg, mixture)
        result = train_epoch(
            model,
            opt,
            run.shard.batches(cfg.batch_size, cfg.seed, epoch),
            cfg,
            epoch,
            mixture=mixture,
            pair_weights=pair_weights,
        )
        mixture = next_mixture(cfg, result.ell, mixture)
        epoch_s.append(time.perf_counter() - t0)
        # seconds_per_epoch as the Ray worker reports it: data wait + optimizer steps
        train_s.append(result.seconds["data_wait"] + result.seconds["step"])
        t0 = time.perf_counter()
        _, improved = record.record(
            model, epoch, result, gamma=gamma, mixture=mixture, seconds=train_s[-1]
        )
        eval_s.append(time.perf_counter() - t0)
        if improved:
            best_state = copy.deepcopy(model.state_dict())
    assert best_state is not None and result is not None
    suspects = suspect_report(
        record.ref, result.item_id, result.ell, result.weight, result.predicted
    )
    history, det = record.history, record.detection
    model.load_state_dict(best_state)
    final = final_evaluation(model, ds, cfg, history)
    if final.problems:
        raise TrainingError(
            f"in-process run produced an unusable model: {'; '.join(final.problems)}"
        )
    test_map, test_eval = final.test_map, final.seconds
    return {
        "test_map": test_map,
        "best_valid_map": record.best_valid_map,
        "best_epoch": record.best_epoch,
        "epochs_run": cfg.epochs,
        "seconds_per_epoch": float(np.mean(train_s)),
        "valid_eval_seconds_per_epoch": float(np.mean(eval_s)),
        "test_eval_seconds": test_eval,
        "wall_seconds": float(np.sum(epoch_s) + np.sum(eval_s) + test_eval),
        "noise_detection": {k: float(det[k]) for k in DETECTION_KEYS},
        "history": history,
        "mlflow_run_id": "",
        "restarts": 0,
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "_suspects": suspects,
    }
