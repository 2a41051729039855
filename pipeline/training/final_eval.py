"""From the best checkpoint to test metrics: the one path train, tune and the grid use.

The test protocol is encoded once through the checked encoder; MAP, PR curves and the fitness
checks of :func:`pipeline.training.guards.model_problems` all read those codes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from feature_store.store import DatasetVersion
from pipeline.config import TrainConfig
from pipeline.method.weights import WEIGHTS, load_model_file
from pipeline.retrieval.protocol import EvalProtocol
from pipeline.training import guards


@dataclass
class FinalEvaluation:
    """Test MAP (I2T, T2I, mean, MAP@k keys), PR curves, seconds for encoding + MAP, and what makes
    the model unfit to register (empty when it is fit)."""

    test_map: dict[str, float]
    pr_curves: dict[str, Any]
    seconds: float
    problems: list[str] = field(default_factory=list)


BEST = "best_model.pt"  # the best epoch's model file, in a checkpoint written after that epoch


def fetch_weights(filesystem: pafs.FileSystem, checkpoint_path: str, dst: Path) -> Path:
    """Copy a checkpoint's best model (local or remote filesystem) to ``dst``: its ``BEST`` file
    when the best epoch came before the checkpoint's own epoch, else its model file."""
    best = f"{checkpoint_path}/{BEST}"
    name = best if filesystem.get_file_info(best).type == pafs.FileType.File else None
    name = name or f"{checkpoint_path}/{WEIGHTS}"
    with filesystem.open_input_stream(name) as src, open(dst, "wb") as f:
        while chunk := src.read(1 << 24):
            f.write(chunk)
    return dst


def load_checkpoint_model(checkpoint_uri: str, dst: Path) -> torch.nn.Module:
    """The model of the checkpoint at ``checkpoint_uri`` (a path or a ``scheme://`` URI); the
    model file is kept at ``dst``."""
    fs, path = pafs.FileSystem.from_uri(checkpoint_uri)
    model, _ = load_model_file(fetch_weights(fs, path, dst))
    return model


def final_evaluation(
    model: torch.nn.Module,
    ds: DatasetVersion,
    cfg: TrainConfig,
    history: Mapping[str, Any],
) -> FinalEvaluation:
    """Test metrics of ``model`` on ``ds`` under the evaluation protocol, with its fitness checks
    (``history``: the run's per-epoch ``loss*`` lists)."""
    t0 = time.perf_counter()
    test = EvalProtocol.load(ds, "test", cfg.eval_top_k)
    encoder = guards.CheckedEncoder(model, cfg.eval_batch_size)
    was_training = model.training
    model.eval()
    try:
        codes = test.encode(encoder)
    finally:
        model.train(was_training)
    test_map = test.map_of(codes)
    seconds = time.perf_counter() - t0
    return FinalEvaluation(
        test_map,
        test.pr_curves_of(codes),
        seconds,
        guards.model_problems(history, model, encoder, codes),
    )
