"""Named variants of the objective: the paper's ablations, robustness study and two baselines.

Each is a set of ``TrainConfig`` overrides on top of the run's config, so every variant trains
through the same loop, evaluation and tracking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import NUM_MODALITIES, ConfigError, TrainConfig
from pipeline.method.bounds import ell_max


@dataclass(frozen=True)
class Variant:
    """A named method: what it is, and the config changes that make it from a run's config."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # for overrides that depend on the run's config (e.g. γ as a multiple of ℓmax(r))
    derived: Callable[[TrainConfig], dict[str, Any]] | None = None

    def overrides_for(self, cfg: TrainConfig) -> dict[str, Any]:
        return {**self.overrides, **(self.derived(cfg) if self.derived else {})}

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        return cfg.replace(**self.overrides_for(cfg))


_PAPER_NSH = {"weighting": "spl", "gamma_mode": "fixed", "tau_center": 0.0, "pseudo_labels": False}
_MIXTURE = {"weighting": "mixture", "gamma_mode": "fixed", "tau_center": 0.2}
_RAW = {"feature_norm": "none"}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("RSHNL", "the full method (paper defaults)"),
        Variant("RSHNL-1", "no warm-up (N_w = 0)", {"warmup_epochs": 0}),
        Variant("RSHNL-2", "no contrastive term L_C (α = 0)", {"alpha": 0.0}),
        Variant("RSHNL-3", "no self-paced weighting of L_S (every w_i = 1)", {"weighting": "none"}),
        Variant(
            "RSHNL-S", "binary weights: every positive Eq 12 weight set to 1", {"weighting": "hard"}
        ),
        Variant(
            "RSHNL-D",
            "γ = 1.5·ℓmax(r) (Eq 14): every pair keeps a positive weight",
            {"allow_gamma_above_ell_max": True},
            lambda cfg: {"gamma": 1.5 * ell_max(cfg.r, NUM_MODALITIES)},
        ),
        Variant(
            "RSHNL-P",
            "the paper's NSH exactly: Eq 12 with the fixed γ, τ of Eq 4 = τ of Eq 2",
            _PAPER_NSH,
        ),
        Variant(
            "RSHNL-M",
            "w_i = P(clean | ℓ_i), a two-component mixture fitted on the previous epoch's ℓ_i "
            "of the whole training set, τ = 0.2 in Eq 4",
            {**_MIXTURE, "pseudo_labels": False},
        ),
        Variant(
            "RSHNL-MP",
            "RSHNL-M, and each pair's 1 − w_i goes to ℓ_i of the model's predicted class",
            {**_MIXTURE, "pseudo_labels": True},
        ),
        Variant(
            "RSHNL-MR",
            "RSHNL-M on raw features (no per-dimension standardisation)",
            {**_MIXTURE, "pseudo_labels": False, **_RAW},
        ),
        Variant(
            "RSHNL-PR",
            "RSHNL-P on raw features (no per-dimension standardisation)",
            {**_PAPER_NSH, **_RAW},
        ),
        Variant(
            "RSHNL-G",
            "Eq 12 with γ at the P(clean | ℓ) = ½ point of that mixture, refitted every epoch",
            {"weighting": "spl", "gamma_mode": "mixture", "pseudo_labels": False},
        ),
        Variant(
            "plain",
            "cross-entropy center classification + CHL, no noise handling",
            {"loss_form": "ce", "weighting": "none"},
        ),
        Variant(
            "small-loss",
            "cross-entropy, keep the (1 − noise rate) smallest-loss pairs of each batch",
            {"loss_form": "ce", "weighting": "small_loss"},
        ),
        Variant(
            "SCBCH",
            "the multi-label method: CSCC reliability-weighted classification + BSCH",
            {"method": "scbch"},
        ),
    )
}
METHODS = tuple(VARIANTS)
DESCRIPTIONS = {name: v.description for name, v in VARIANTS.items()}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def method_overrides(name: str, cfg: TrainConfig) -> dict[str, Any]:
    """The config changes that turn ``cfg`` into method ``name``."""
    return variant(name).overrides_for(cfg)


def apply_method(name: str, cfg: TrainConfig) -> TrainConfig:
    return variant(name).apply(cfg)
