"""One typed training config: defaults, YAML, command-line overrides and validation."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.method.bounds import ell_max

log = logging.getLogger(__name__)

# the weightings of pipeline.method.losses.WEIGHTINGS (named here so the config needs no torch)
WEIGHTING_NAMES = ("spl", "hard", "none", "small_loss", "mixture")

# SCBCH's forms (pipeline.method.scbch.FORMS) and their margin, shift and tau where the config
# leaves them unset (upstream: the authors' MIRFlickr settings)
SCBCH_FORM_DEFAULTS: dict[str, dict[str, float]] = {
    "project": {"margin": 0.2, "shift": 0.3, "tau": 0.1},
    "upstream": {"margin": 0.15, "shift": 0.8, "tau": 1.0},
}
SCBCH_FORMS = tuple(SCBCH_FORM_DEFAULTS)

NUM_MODALITIES = 2
MAX_BITS = 4096  # widest code: the default hidden width of the hash heads

# Keys that say where a run comes from and is recorded, and how it is launched and checkpointed,
# not what it learns. Resume, Tune and the benchmark grid each start from this one set.
RUN_KEYS = frozenset(
    {
        "dataset",  # the same data_version may be read from another location
        "run_name",
        "resume",
        "storage_path",
        "tracking_uri",
        "tags",
        "experiment_name",
        "register_model",
        "registered_model_name",
        "workers",
        "cpus_per_worker",
        "placement_strategy",
        "max_failures",
        "eval_batch_size",
        "checkpoint_every",
        "checkpoint_interval_s",
        "center_sync_check_every",
    }
)
# A resume may also extend the run (epochs), move it to another device or change the caching of
# the train split; it stays in the experiment and tracking server it started in.
RESUMABLE_KEYS = (RUN_KEYS - {"tracking_uri", "experiment_name"}) | {
    "epochs",
    "use_gpu",
    "data_cache_max_bytes",
}
# Tune searches what shapes the model or the objective; never these.
NOT_TUNABLE_KEYS = RUN_KEYS | {
    "method",
    "epochs",
    "use_gpu",
    "data_cache_max_bytes",
    "search_index",
}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key."""


@dataclass
class TrainConfig:
    """Everything a training run needs, from CLI/YAML to every worker and Tune trial.

    Defaults are the paper's and its authors' implementation's (Wikipedia: alpha 0.05, gamma 3).
    """

    dataset: str = ""
    method: str = (
        "rshnl"  # "rshnl" (Eq 1–14) or "scbch" (noisy multi-label; pipeline/method/scbch.py)
    )
    # model (authors' implementation: d→4096→4096→L heads and K→4096→4096→L center network)
    bits: int = 128
    hidden_dim: int = 4096
    feature_norm: str = "standardize"  # "standardize" (train-split mean/std) or "none"
    # objective (Eq 2–12)
    gamma: float = 3.0  # learning pace γ of Eq 8/12, must satisfy 0 < γ < ℓmax (Eq 14)
    allow_gamma_above_ell_max: bool = False  # γ ≥ ℓmax keeps every pair (RSHNL-D does so)
    alpha: float = 0.05  # weight of L_C in Eq 9
    r: float = 0.01  # robustness factor r of Eq 3/6/7
    tau: float = 1.0  # temperature τ of Eq 2/4
    warmup_epochs: int = 5  # N_w of Eq 9
    chl_exclude_self: bool = False  # Eq 2 as written includes j = m; True as in the authors' code
    centers: str = "learned"  # "learned" (center network), or fixed "random" / "hadamard" ±1 rows
    weighting: str = "spl"  # after warm-up: spl (Eq 12), hard (RSHNL-S), none, small_loss, mixture
    # γ of Eq 12: "fixed" (the paper's), or "mixture": where P(clean | ℓ) = ½ under a two-component
    # Gaussian mixture fitted on the previous epoch's ℓ_i of the whole training set
    gamma_mode: str = "fixed"
    tau_center: float = 0.0  # τ of Eq 4 alone (0: the shared tau of Eq 2/4)
    pseudo_labels: bool = False  # mixture weighting: 1 − w_i of each pair to its predicted class
    loss_form: str = "robust"  # robust terms of Eq 3/7, or "ce" (−log p, non-robust baselines)
    keep_rate: float = 0.0  # small_loss: share kept per batch; 0 = 1 − the data's noise rate
    # SCBCH (method "scbch"): alpha·BSCH + beta·quantisation + reliability-weighted BCE
    scbch_alpha: float = 0.7
    scbch_beta: float = 0.3
    scbch_k: int = 20  # neighbours for the reliability weights
    scbch_g: float = 0.5  # weight floor g in w = g + (1 − g)·cos
    # "upstream" (the authors' code's formulation) or "project" (the earlier one from the text);
    # upstream is the default: best validation MAP on MIRFlickr at noise 0.5 and 0.8, no collapse
    scbch_form: str = "upstream"
    # unset (None): the form's value (project 0.2 / 0.3 / 0.1, upstream 0.15 / 0.8 / 1.0)
    scbch_margin: float | None = None  # project: subtracted from label-sharing pairs' logits
    scbch_shift: float | None = None  # project: similarity around which pairs are separated
    scbch_tau: float | None = None  # temperature of the BSCH similarities
    scbch_separation: float = 1.0  # weight of the pair-separation term inside BSCH
    scbch_knn: str = "flat"  # reliability kNN: "flat" (exact) or "ivf" (approximate, large N)
    scbch_knn_nprobe: int = 16  # lists searched per query with scbch_knn "ivf"
    global_negatives: str = (
        "auto"  # CHL denominator over all workers' codes: auto (>1 worker)/on/off
    )
    # optimisation
    epochs: int = 150
    batch_size: int = 256  # global batch; each of W workers gets batch_size // W
    lr: float = 1e-4
    weight_decay: float = 0.0  # Adam weight decay (SCBCH's authors use 1e-5)
    seed: int = 0
    shuffle_buffer: int = 4096  # rows shuffled locally by each worker per epoch
    data_cache_max_bytes: int = 2 << 30  # train splits up to this size are cached in Ray's store
    # execution
    workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # Ray placement of the workers: PACK, SPREAD, STRICT_SPREAD
    bf16: bool = False  # autocast the MLPs to bfloat16 (losses stay fp32)
    max_failures: int = 0
    eval_batch_size: int = 2048
    eval_top_k: int = 0  # >0: also report MAP@k (multi-label benchmarks use e.g. 5000)
    center_sync_check_every: int = 0  # >0: all-gather a center checksum every N steps and assert
    storage_path: str = "runs"  # Ray Train run storage (local path or s3://)
    # a full resumable checkpoint every N epochs, after checkpoint_interval_s seconds without one
    # (0: off) and at the last epoch; the best epoch's weights are kept in memory between them
    checkpoint_every: int = 10
    checkpoint_interval_s: float = 600.0
    resume: bool = False  # continue run_name from its latest checkpoint in storage_path
    # tracking
    experiment_name: str = "rshnl"
    run_name: str = ""
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite in the working directory
    registered_model_name: str = "rshnl"
    register_model: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    # search index recorded with the registered model, used by jobs.pull (IndexSpec keys: kind
    # auto/flat/ivf/hash/mih, exact_below, nlist, nprobe, train_size, seed, ...); {}: auto
    search_index: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Check every value; raise ConfigError naming the first bad key."""

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config '{key}' = {getattr(self, key)!r}: {msg}")

        need(bool(self.dataset), "dataset", "a dataset URI is required (STORE/NAME/vN)")
        need(self.method in ("rshnl", "scbch"), "method", "must be 'rshnl' or 'scbch'")
        need(self.scbch_alpha >= 0, "scbch_alpha", "must be ≥ 0")
        need(self.scbch_beta >= 0, "scbch_beta", "must be ≥ 0")
        need(self.scbch_k >= 1, "scbch_k", "must be ≥ 1")
        need(0 <= self.scbch_g <= 1, "scbch_g", "must be in [0, 1]")
        need(self.scbch_form in SCBCH_FORMS, "scbch_form", f"must be one of {SCBCH_FORMS}")
        need(self.scbch_tau is None or self.scbch_tau > 0, "scbch_tau", "must be > 0")
        need(self.scbch_separation >= 0, "scbch_separation", "must be ≥ 0")
        need(self.scbch_knn in ("flat", "ivf"), "scbch_knn", "must be 'flat' or 'ivf'")
        need(self.scbch_knn_nprobe >= 1, "scbch_knn_nprobe", "must be ≥ 1")
        need(self.weight_decay >= 0, "weight_decay", "must be ≥ 0")
        need(self.eval_top_k >= 0, "eval_top_k", "must be ≥ 0 (0: MAP over the whole list)")
        need(
            0 < self.bits <= MAX_BITS,
            "bits",
            f"must be in 1..{MAX_BITS} (codes wider than the default {MAX_BITS}-unit hidden "
            "layer add no information; the paper uses 16..128)",
        )
        need(self.hidden_dim > 0, "hidden_dim", "must be positive")
        need(
            self.feature_norm in ("standardize", "none"),
            "feature_norm",
            "must be 'standardize' or 'none'",
        )
        need(
            self.centers in ("learned", "random", "hadamard"),
            "centers",
            "must be 'learned', 'random' or 'hadamard'",
        )
        need(
            self.centers != "hadamard" or (self.bits & (self.bits - 1) == 0),
            "centers",
            "Hadamard centers need a power-of-two number of bits",
        )
        need(
            self.global_negatives in ("auto", "on", "off"),
            "global_negatives",
            "must be 'auto', 'on' or 'off'",
        )
        need(
            self.weighting in WEIGHTING_NAMES,
            "weighting",
            "must be 'spl', 'hard', 'none', 'small_loss' or 'mixture'",
        )
        need(self.gamma_mode in ("fixed", "mixture"), "gamma_mode", "must be 'fixed' or 'mixture'")
        need(
            not self.pseudo_labels or (self.weighting == "mixture" and self.method == "rshnl"),
            "pseudo_labels",
            "needs weighting: mixture (the weight 1 − w_i it hands to the predicted class)",
        )
        need(self.tau_center >= 0, "tau_center", "must be ≥ 0 (0: the shared tau)")
        need(self.loss_form in ("robust", "ce"), "loss_form", "must be 'robust' or 'ce'")
        need(0 <= self.keep_rate <= 1, "keep_rate", "must be in [0, 1] (0: 1 − noise rate)")
        need(self.gamma > 0, "gamma", "the learning pace γ must be > 0 (Eq 12)")
        need(0 < self.r <= 1, "r", "must be in (0, 1] (Eq 6)")
        need(self.alpha >= 0, "alpha", "must be ≥ 0")
        need(self.tau > 0, "tau", "must be > 0")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be ≥ 0")
        need(self.epochs > 0, "epochs", "must be ≥ 1")
        need(self.batch_size > 0, "batch_size", "must be ≥ 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.workers >= 1, "workers", "must be ≥ 1")
        need(self.batch_size >= self.workers, "batch_size", "must be at least the worker count")
        need(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        need(not self.resume or bool(self.run_name), "resume", "needs the run_name to resume")
        need(
            self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            "placement_strategy",
            "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD",
        )
        need(self.max_failures >= 0, "max_failures", "must be ≥ 0")
        need(self.shuffle_buffer >= 0, "shuffle_buffer", "must be ≥ 0")
        need(self.eval_batch_size > 0, "eval_batch_size", "must be ≥ 1")
        need(self.center_sync_check_every >= 0, "center_sync_check_every", "must be ≥ 0")
        from pipeline.retrieval.index import IndexSpec

        try:
            IndexSpec.from_dict(self.search_index)
        except ValueError as e:
            need(False, "search_index", str(e))
        need(self.checkpoint_every >= 1, "checkpoint_every", "must be ≥ 1")
        need(self.checkpoint_interval_s >= 0, "checkpoint_interval_s", "must be ≥ 0")
        bound = ell_max(self.r, NUM_MODALITIES)
        uses_gamma = (
            self.method == "rshnl"
            and self.weighting in ("spl", "hard")
            and self.gamma_mode == "fixed"
        )
        if uses_gamma and self.gamma >= bound:
            if not self.allow_gamma_above_ell_max:
                raise ConfigError(
                    f"config 'gamma' = {self.gamma!r}: must be < ℓmax(r={self.r:g}) = {bound:.4g} "
                    "(Eq 14), else every pair keeps a positive weight and no label is treated as "
                    "noisy; lower gamma, or set allow_gamma_above_ell_max: true to mean it"
                )
            log.warning(
                "gamma=%g ≥ ℓmax(r=%g)=%.4g (Eq 14): every pair keeps a positive weight and "
                "no label is treated as noisy",
                self.gamma,
                self.r,
                bound,
            )
        return self

    def scbch_params(self) -> dict[str, float]:
        """SCBCH's margin, shift and tau: the config's, or its form's where unset."""
        given = {"margin": self.scbch_margin, "shift": self.scbch_shift, "tau": self.scbch_tau}
        form = SCBCH_FORM_DEFAULTS[self.scbch_form]
        return {k: form[k] if v is None else float(v) for k, v in given.items()}

    @property
    def gamma_fraction(self) -> float:
        """γ as a share of ℓmax(r) (Eq 14)."""
        return self.gamma / ell_max(self.r, NUM_MODALITIES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        base = cls()
        values: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(base, key)
            if key == "search_index" and isinstance(value, dict):
                values[key] = dict(value)  # values checked by validate (IndexSpec)
                continue
            if key in _OPTIONAL_FLOATS:
                default = 0.0 if value is not None else None
            values[key] = _coerce(key, value, default, source)
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults ← YAML file ← overrides (flags that were given); validated."""
        data = read_yaml(path) if path else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path or "flags")).validate()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file holding a mapping; a clear ConfigError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of keys to values")
    return loaded


_OPTIONAL_FLOATS = frozenset({"scbch_margin", "scbch_shift", "scbch_tau"})


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
    return value
