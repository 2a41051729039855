"""What a run records after each epoch, the same for the Ray Train worker and the in-process
executor: validation MAP, noise detection, the epoch's metrics, the best epoch, and the
per-epoch history that is logged, checkpointed and plotted (no Ray, no MLflow)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.config import TrainConfig
from pipeline.method.losses import LossMixture
from pipeline.method.model import HashModel
from pipeline.method.suspects import DETECTION_KEYS, TrainReference, epoch_detection
from pipeline.method.weights import encode
from pipeline.retrieval.protocol import EvalProtocol
from pipeline.training.epoch import EpochResult
from pipeline.training.step import loss_term_names

log = logging.getLogger("pipeline.train")

SCORE = "checkpoint_score"  # validation MAP (mean), ties broken towards the later epoch
HIST_EDGES = np.linspace(0.0, 1.0, 21)


def checkpoint_score(valid_map_mean: float, epoch: int) -> float:
    """Strictly ordered score so that the best checkpoint is unambiguous under equal MAPs."""
    return valid_map_mean + epoch * 1e-12


def full_checkpoint(
    epochs_done: int,
    every: int,
    epochs: int,
    since_last_s: float = 0.0,
    interval_s: float = 0.0,
) -> bool:
    """Whether the epoch that completes ``epochs_done`` writes a full resumable checkpoint
    (model, optimizer state, RNG states, history): every ``every`` epochs, at the last, and when
    ``since_last_s`` seconds have passed since the last one (``interval_s`` > 0)."""
    due = interval_s > 0 and since_last_s >= interval_s
    return due or epochs_done % max(1, every) == 0 or epochs_done >= epochs


def best_of_history(history: dict[str, Any], best_epoch: int) -> dict[str, float]:
    """The validation MAPs (i2t, t2i, mean) that ``history`` recorded for epoch ``best_epoch``."""
    epochs = list(history.get("epoch") or [])
    if best_epoch not in epochs:
        return {}
    i = epochs.index(best_epoch)
    return {k: float(history[f"valid_map_{k}"][i]) for k in ("i2t", "t2i", "mean")}


def evaluate_split(model: HashModel, protocol: EvalProtocol, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return protocol.evaluate(lambda x, m: encode(model, x, m, batch_size))
    finally:
        model.train(was_training)


def detection_threshold(cfg: TrainConfig) -> float:
    """Weights at or below this flag a pair as noisy: 0 for SPL; cos ≤ ½ for SCBCH's weights;
    P(clean | ℓ) ≤ ½ for the mixture weights."""
    if cfg.method == "scbch":
        return cfg.scbch_g + (1.0 - cfg.scbch_g) * 0.5
    return 0.5 if cfg.weighting == "mixture" else 0.0


def empty_history() -> dict[str, Any]:
    return {
        "weight_hist_edges": HIST_EDGES.tolist(),
        "weight_hist_clean": [],
        "weight_hist_noisy": [],
    }


class RunRecord:
    """The best epoch so far and the per-epoch history of one run (resumable from a checkpoint's
    ``history``, ``best_map`` and ``best_epoch``)."""

    def __init__(
        self,
        cfg: TrainConfig,
        valid: EvalProtocol,
        ref: TrainReference,
        history: dict[str, Any] | None = None,
        best_map: float = -1.0,
        best_epoch: int = -1,
    ) -> None:
        self.cfg, self.valid, self.ref = cfg, valid, ref
        self.terms = loss_term_names(cfg)
        self.history = history or empty_history()
        self.best_map, self.best_epoch = best_map, best_epoch
        self.best_score = checkpoint_score(best_map, best_epoch) if best_epoch > 0 else -1.0
        self.valid_map: dict[str, float] = {}  # of the last recorded epoch
        self.best_valid_map = best_of_history(self.history, best_epoch)  # of the best epoch
        self.detection: dict[str, float] = {}

    def record(
        self,
        model: HashModel,
        epoch: int,
        res: EpochResult,
        *,
        gamma: float,
        mixture: LossMixture | None,
        seconds: float,
    ) -> tuple[dict[str, Any], bool]:
        """Evaluate on the validation split, measure detection on ``res``'s items (all ranks'),
        append to the history; returns (this epoch's metrics, whether it is the new best)."""
        cfg, weights = self.cfg, res.weight
        vmap = evaluate_split(model, self.valid, cfg.eval_batch_size)
        det, noisy = epoch_detection(
            self.ref, res.item_id, weights, res.ell, detection_threshold(cfg)
        )
        self.valid_map, self.detection = vmap, det
        score = checkpoint_score(vmap["mean"], epoch + 1)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_map, self.best_epoch = score, vmap["mean"], epoch + 1
            self.best_valid_map = vmap
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": res.loss,
            self.terms[0]: res.chl,
            self.terms[1]: res.center,
            "valid_map_i2t": vmap["i2t"],
            "valid_map_t2i": vmap["t2i"],
            "valid_map_mean": vmap["mean"],
            **{f"valid_map_{k}": v for k, v in vmap.items() if k.endswith("_at_k")},
            SCORE: score,
            "best_valid_map_mean": self.best_map,
            "best_valid_map_i2t": self.best_valid_map.get("i2t", float("nan")),
            "best_valid_map_t2i": self.best_valid_map.get("t2i", float("nan")),
            "best_epoch": self.best_epoch,
            "zero_weight_share": float(det["zero_weight_share"]),
            "mean_weight": float(np.mean(weights)) if weights.size else 0.0,
            **{f"noise_{k}": float(det[k]) for k in DETECTION_KEYS if k != "zero_weight_share"},
            "gamma": float(gamma),
            "epoch_seconds": seconds,
            "warmup": float(epoch < cfg.warmup_epochs),
        }
        h = self.history
        for key in (
            "epoch",
            "loss",
            *self.terms,
            "valid_map_i2t",
            "valid_map_t2i",
            "valid_map_mean",
            "zero_weight_share",
            "noise_precision",
            "noise_recall",
            "noise_auc",
            "noise_clean_mean_weight",
            "noise_noisy_mean_weight",
            "gamma",
        ):
            h.setdefault(key, []).append(metrics[key])
        if mixture is not None:  # the fit the next epoch uses (numbers only, for resuming)
            for k, v in mixture.to_dict().items():
                for c, x in zip(("clean", "noisy"), v, strict=True):
                    h.setdefault(f"mixture_{k}_{c}", []).append(float(x))
        for name, mask in (("clean", ~noisy), ("noisy", noisy)):
            counts, _ = np.histogram(weights[mask], bins=HIST_EDGES)
            h[f"weight_hist_{name}"].append(counts.tolist())
        log.info(
            "epoch %d/%d loss=%.4f %s=%.4f %s=%.4f valid_map=%.4f (i2t %.4f t2i %.4f) "
            "best=%.4f@%d zero_w=%.3f noise_p/r=%.3f/%.3f auc=%.3f w_clean/noisy=%.3f/%.3f "
            "train %.2fs",
            epoch + 1,
            cfg.epochs,
            res.loss,
            self.terms[0][5:],
            res.chl,
            self.terms[1][5:],
            res.center,
            vmap["mean"],
            vmap["i2t"],
            vmap["t2i"],
            self.best_map,
            self.best_epoch,
            det["zero_weight_share"],
            det["precision"],
            det["recall"],
            det["auc"],
            det["clean_mean_weight"],
            det["noisy_mean_weight"],
            seconds,
        )
        return metrics, improved
