"""Named variants of the objective: the paper's ablations, robustness study and two baselines.

Each is a set of ``TrainConfig`` overrides on top of the run's config, so every variant trains
through the same loop, evaluation and tracking.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import NUM_MODALITIES, ConfigError, TrainConfig
from pipeline.method.bounds import ell_max

DESCRIPTIONS = {
    "RSHNL": "the full method (paper defaults)",
    "RSHNL-1": "no warm-up (N_w = 0)",
    "RSHNL-2": "no contrastive term L_C (α = 0)",
    "RSHNL-3": "no self-paced weighting of L_S (every w_i = 1)",
    "RSHNL-S": "binary weights: every positive Eq 12 weight set to 1",
    "RSHNL-D": "γ = 1.5·ℓmax(r) (Eq 14): every pair keeps a positive weight",
    "RSHNL-P": "the paper's NSH exactly: Eq 12 with the fixed γ, τ of Eq 4 = τ of Eq 2",
    "RSHNL-M": "w_i = P(clean | ℓ_i), a two-component mixture fitted on the previous epoch's ℓ_i "
    "of the whole training set, τ = 0.2 in Eq 4",
    "RSHNL-MP": "RSHNL-M, and each pair's 1 − w_i goes to ℓ_i of the model's predicted class",
    "RSHNL-MR": "RSHNL-M on raw features (no per-dimension standardisation)",
    "RSHNL-PR": "RSHNL-P on raw features (no per-dimension standardisation)",
    "RSHNL-G": "Eq 12 with γ at the P(clean | ℓ) = ½ point of that mixture, refitted every epoch",
    "plain": "cross-entropy center classification + CHL, no noise handling",
    "small-loss": "cross-entropy, keep the (1 − noise rate) smallest-loss pairs of each batch",
    "SCBCH": "the multi-label method: CSCC reliability-weighted classification + BSCH",
}


def method_overrides(name: str, cfg: TrainConfig) -> dict[str, Any]:
    """The config changes that turn ``cfg`` into method ``name``."""
    table: dict[str, dict[str, Any]] = {
        "RSHNL": {},
        "RSHNL-1": {"warmup_epochs": 0},
        "RSHNL-2": {"alpha": 0.0},
        "RSHNL-3": {"weighting": "none"},
        "RSHNL-S": {"weighting": "hard"},
        "RSHNL-D": {
            "gamma": 1.5 * ell_max(cfg.r, NUM_MODALITIES),
            "allow_gamma_above_ell_max": True,
        },
        "RSHNL-P": {
            "weighting": "spl",
            "gamma_mode": "fixed",
            "tau_center": 0.0,
            "pseudo_labels": False,
        },
        "RSHNL-M": {
            "weighting": "mixture",
            "gamma_mode": "fixed",
            "tau_center": 0.2,
            "pseudo_labels": False,
        },
        "RSHNL-MP": {
            "weighting": "mixture",
            "gamma_mode": "fixed",
            "tau_center": 0.2,
            "pseudo_labels": True,
        },
        "RSHNL-MR": {
            "weighting": "mixture",
            "gamma_mode": "fixed",
            "tau_center": 0.2,
            "pseudo_labels": False,
            "feature_norm": "none",
        },
        "RSHNL-PR": {
            "weighting": "spl",
            "gamma_mode": "fixed",
            "tau_center": 0.0,
            "pseudo_labels": False,
            "feature_norm": "none",
        },
        "RSHNL-G": {"weighting": "spl", "gamma_mode": "mixture", "pseudo_labels": False},
        "plain": {"loss_form": "ce", "weighting": "none"},
        "small-loss": {"loss_form": "ce", "weighting": "small_loss"},
        "SCBCH": {"method": "scbch"},
    }
    if name not in table:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(table)}")
    return table[name]


def apply_method(name: str, cfg: TrainConfig) -> TrainConfig:
    return cfg.replace(**method_overrides(name, cfg))


METHODS = tuple(DESCRIPTIONS)
