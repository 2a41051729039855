"""Ray Tune sweeps over γ, α, r and the warm-up length (the only module that touches ray.tune).

Each trial is a Tune function trainable that runs one Ray Train training (the pattern the installed
Ray documents for Tune with Train V2); Train's per-epoch reports reach Tune through
``TuneReportCallback``, which is what ASHA acts on. γ is sampled as a fraction of ℓmax(r) (Eq 14),
so every trial satisfies 0 < γ < ℓmax.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    NOT_TUNABLE_KEYS,
    NUM_MODALITIES,
    ConfigError,
    TrainConfig,
    read_yaml,
)
from pipeline.method.bounds import ell_max
from pipeline.tracking import runs as tracking
from pipeline.training import guards

log = logging.getLogger(__name__)

METRIC = "valid_map_mean"

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "r": {"type": "loguniform", "low": 1e-3, "high": 1.0},
    "gamma_fraction": {"type": "uniform", "low": 0.005, "high": 0.995},
    "alpha": {"type": "loguniform", "low": 1e-2, "high": 1.0},
    "warmup_epochs": {"type": "randint", "low": 0, "high": 20},
}
# The loss-mixture weighting (w_i = P(clean | ℓ_i)) has no γ; its knob is τ of Eq 4.
MIXTURE_SPACE: dict[str, dict[str, Any]] = {
    "r": DEFAULT_SPACE["r"],
    "alpha": DEFAULT_SPACE["alpha"],
    "warmup_epochs": DEFAULT_SPACE["warmup_epochs"],
    "tau_center": {"type": "loguniform", "low": 0.05, "high": 1.0},
}
SCBCH_SPACE: dict[str, dict[str, Any]] = {
    "scbch_alpha": {"type": "loguniform", "low": 0.1, "high": 3.0},
    "scbch_beta": {"type": "loguniform", "low": 0.01, "high": 1.0},
    "scbch_k": {"type": "randint", "low": 5, "high": 50},
    "scbch_g": {"type": "uniform", "low": 0.0, "high": 1.0},
    # around the upstream form's 0.15 / 0.8 (the default form; the base config's form is kept)
    "scbch_margin": {"type": "uniform", "low": 0.05, "high": 0.4},
    "scbch_shift": {"type": "uniform", "low": 0.4, "high": 1.2},
    "warmup_epochs": {"type": "randint", "low": 0, "high": 10},
}
# Any TrainConfig value that shapes the model or the objective can be searched.
_SPACE_KEYS = {"gamma_fraction"} | {
    f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_TUNABLE_KEYS
}


def default_space(method: str, weighting: str = "spl") -> dict[str, dict[str, Any]]:
    """The search space of the paper's sensitivity study (RSHNL with Eq 12's γ as a share of
    ℓmax), of the loss-mixture weighting (no γ; τ of Eq 4 instead), or of SCBCH's weights."""
    if method == "scbch":
        return dict(SCBCH_SPACE)
    return dict(MIXTURE_SPACE if weighting == "mixture" else DEFAULT_SPACE)


@dataclass
class SweepConfig:
    """A sweep: the base training config, the search space, the scheduler and the budget."""

    base: TrainConfig
    name: str = ""
    num_samples: int = 12
    mode: str = "random"  # "random" over the space, or "gamma" (grid over γ/ℓmax, others fixed)
    gamma_fractions: list[float] = field(
        default_factory=lambda: [0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.5]
    )
    space: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    scheduler: str = "asha"  # "asha" or "fifo"
    grace_period: int = 3
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs allow
    storage_path: str = "runs/tune"
    seed: int = 0
    resume: bool = False

    def validate(self) -> SweepConfig:
        if self.num_samples < 1:
            raise ConfigError("sweep 'num_samples' must be ≥ 1")
        if self.mode not in ("random", "gamma"):
            raise ConfigError(f"sweep 'mode' must be 'random' or 'gamma', got {self.mode!r}")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"sweep 'scheduler' must be 'asha' or 'fifo', got {self.scheduler!r}")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("sweep 'grace_period' must be ≥ 1 and 'reduction_factor' ≥ 2")
        unknown = set(self.space) - _SPACE_KEYS
        if unknown:
            raise ConfigError(
                f"search space: unknown or untunable key(s) {sorted(unknown)}; "
                f"tunable: {sorted(_SPACE_KEYS)}"
            )
        for k, spec in self.space.items():
            if spec.get("type") not in ("uniform", "loguniform", "randint", "choice", "fixed"):
                raise ConfigError(f"search space '{k}': type {spec.get('type')!r} is not known")
        if self.mode == "gamma" and self.base.weighting not in ("spl", "hard"):
            raise ConfigError(
                f"--mode gamma grids over Eq 12's γ; weighting {self.base.weighting!r} has none"
            )
        if self.base.checkpoint_every != 1:
            # a trial is registered from the checkpoint of its best epoch, so every epoch needs one
            raise ConfigError(
                f"checkpoint_every {self.base.checkpoint_every}: sweeps need checkpoint_every 1 "
                "(the best trial is registered from its best epoch's checkpoint)"
            )
        if self.mode == "gamma" and not all(0 < f for f in self.gamma_fractions):
            raise ConfigError("gamma_fractions must be > 0 (γ = fraction × ℓmax(r))")
        self.base.validate()
        if self.grace_period > self.base.epochs:
            log.warning(
                "grace_period %d > epochs %d: using %d",
                self.grace_period,
                self.base.epochs,
                self.base.epochs,
            )
            self.grace_period = self.base.epochs
        return self


def _domain(spec: dict[str, Any]):
    from ray import tune

    t = spec["type"]
    if t == "uniform":
        return tune.uniform(spec["low"], spec["high"])
    if t == "loguniform":
        return tune.loguniform(spec["low"], spec["high"])
    if t == "randint":
        return tune.randint(spec["low"], spec["high"] + 1)  # inclusive upper bound
    if t == "choice":
        return tune.choice(spec["values"])
    return spec["value"]


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    if sweep.mode == "gamma":
        b = sweep.base
        return {
            "gamma_fraction": tune.grid_search(sweep.gamma_fractions),
            "r": b.r,
            "alpha": b.alpha,
            "warmup_epochs": b.warmup_epochs,
        }
    return {k: _domain(v) for k, v in sweep.space.items()}


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """Map sampled parameters to a training config: γ = gamma_fraction × ℓmax(r) (Eq 14).

    Every other sampled key is the TrainConfig value of the same name.
    """
    changes: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("_") or key == "gamma_fraction":
            continue
        default = getattr(base, key)
        changes[key] = type(default)(value) if isinstance(default, int | float) else value
    cfg = base.replace(**changes)
    if "gamma_fraction" in params:
        frac = float(params["gamma_fraction"])  # ≥ 1 is asked for (the γ grid goes past ℓmax)
        cfg = cfg.replace(
            gamma=frac * ell_max(cfg.r, NUM_MODALITIES),
            allow_gamma_above_ell_max=cfg.allow_gamma_above_ell_max or frac >= 1,
        )
    return cfg


def _trainable(params: dict[str, Any]) -> None:
    """One trial: one Ray Train run, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.training.trainer import run_training

    base = TrainConfig.from_dict(params["_base"])
    cfg = trial_config(base, params)
    ctx = tune.get_context()
    cfg = cfg.replace(
        run_name=f"{params['_sweep']}-{ctx.get_trial_id()}",
        register_model=False,
        storage_path=params["_train_storage"],
    ).validate()
    run_training(
        cfg,
        callbacks=[TuneReportCallback()],
        parent_run_id=params["_parent_run_id"],
        log_model=False,
    )


def sweep_from_yaml(
    path: str | None,
    train_overrides: dict[str, Any],
    sweep_overrides: dict[str, Any],
    *,
    resume: bool = False,
) -> SweepConfig:
    """A validated sweep from a YAML file (TrainConfig keys, ``search_space``, ``sweep``) with the
    given overrides on top (``None`` values are not overrides)."""
    data = read_yaml(path) if path else {}
    space = default_space(str(data.get("method", "rshnl")), str(data.get("weighting", "spl")))
    space.update(data.pop("search_space", None) or {})
    sweep_data = data.pop("sweep", None) or {}
    known = {f.name for f in dataclasses.fields(SweepConfig)} - {"base", "space"}
    unknown = set(sweep_data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {sorted(unknown)}")
    data.update({k: v for k, v in train_overrides.items() if v is not None})
    data.setdefault("checkpoint_every", 1)  # see SweepConfig.validate
    base = TrainConfig.from_dict(data, source=str(path or "flags")).validate()
    sweep_data.update({k: v for k, v in sweep_overrides.items() if v is not None})
    if resume:
        if not sweep_data.get("name"):
            raise ConfigError("--resume needs the --name of the sweep to continue")
        sweep_data["resume"] = True
    return SweepConfig(base=base, space=space, seed=base.seed, **sweep_data).validate()


def run_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """Run (or resume) a sweep; log it to MLflow; register the best trial's model."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.training.trainer import ensure_ray

    sweep.validate()
    base = sweep.base
    from feature_store.store import open_dataset

    ds = open_dataset(base.dataset)  # verified before any trial starts
    name = sweep.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = (
        sweep.storage_path
        if "://" in sweep.storage_path
        else str(Path(sweep.storage_path).resolve())
    )
    tracking_uri = tracking.resolve_tracking_uri(base.tracking_uri)
    base = base.replace(tracking_uri=tracking_uri)
    # Train's placement-group cleaner needs the state API (the dashboard) to release the worker
    # group of a finished trial; without it each trial's CPUs stay reserved.
    ensure_ray(base, include_dashboard=True)

    exp_path = f"{storage.rstrip('/')}/{name}"
    restoring = sweep.resume and tune.Tuner.can_restore(exp_path)
    if sweep.resume and not restoring:
        raise ConfigError(f"--resume: no sweep '{name}' to restore under {storage}")
    parent_run_id = _parent_run(sweep, name, exp_path, tracking_uri, ds.data_version, restoring)

    trainable = tune.with_resources(_trainable, {"CPU": 0.1})
    if restoring:
        tuner = tune.Tuner.restore(
            exp_path, trainable=trainable, resume_errored=False, restart_errored=False
        )
    else:
        space = param_space(sweep)
        space.update(
            {
                "_base": base.to_dict(),
                "_sweep": name,
                "_parent_run_id": parent_run_id,
                "_train_storage": f"{storage.rstrip('/')}/{name}-train",
            }
        )
        per_trial = base.workers * base.cpus_per_worker + 0.1
        cpus = ray.cluster_resources().get("CPU", 1.0)
        concurrent = sweep.max_concurrent or max(1, int((cpus - 1) // per_trial))
        scheduler = (
            ASHAScheduler(
                time_attr="epoch",
                max_t=base.epochs,
                grace_period=sweep.grace_period,
                reduction_factor=sweep.reduction_factor,
            )
            if sweep.scheduler == "asha"
            else FIFOScheduler()
        )
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=1 if sweep.mode == "gamma" else sweep.num_samples,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(
                    random_state=sweep.seed, max_concurrent=concurrent
                ),
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=0)
            ),
        )
        log.info(
            "sweep %s: %s trials, %d at a time, scheduler %s",
            name,
            "grid" if sweep.mode == "gamma" else sweep.num_samples,
            concurrent,
            sweep.scheduler,
        )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    trials = _collect(grid, base)
    for t in trials:
        log.info(
            "trial %s %s: γ=%.4g α=%.4g r=%.4g warm-up=%d best valid MAP %.4f",
            t["trial_id"],
            t["status"],
            t["config"]["gamma"],
            t["config"]["alpha"],
            t["config"]["r"],
            t["config"]["warmup_epochs"],
            t["best_valid_map"],
        )
    tracking.close_trial_runs(tracking_uri, trials)
    done = [
        t
        for t in trials
        if t["status"] != "failed" and t["best_valid_map"] is not None and t["checkpoint_path"]
    ]
    if not done:
        tracking.fail_run(tracking_uri, parent_run_id, RuntimeError("no trial produced a model"))
        raise RuntimeError(f"sweep {name}: no trial reported a validation MAP")
    try:
        best, registered, test_map = _register_first_fit(base, ds, done, tracking_uri)
    except guards.UnfitModelError as e:
        tracking.fail_run(tracking_uri, parent_run_id, e)
        raise RuntimeError(f"sweep {name}: {e}") from e
    best["test_map"] = test_map
    summary = {
        "sweep": name,
        "trials": trials,
        "best_config": best["config"],
        "best_trial": best["trial_id"],
        "best_valid_map": best["best_valid_map"],
        "best_test_map": test_map,
        "parent_run_id": parent_run_id,
        "registered_model": registered,
        "wall_seconds": wall,
        "tracking_uri": tracking_uri,
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            _trials_csv(trials, Path(tmp) / "trials.csv"),
            _gamma_plot(trials, Path(tmp) / "valid_map_vs_gamma.png"),
        ]
        tracking.finish_sweep(tracking_uri, parent_run_id, best["config"], summary, files)
    return summary


def _parent_run(
    sweep: SweepConfig,
    name: str,
    exp_path: str,
    tracking_uri: str,
    data_version: str,
    restoring: bool,
) -> str:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(exp_path)
    info_path = f"{path}/rshnl_sweep.json"
    if restoring and fs.get_file_info(info_path).type == pafs.FileType.File:
        import json

        with fs.open_input_stream(info_path) as f:
            return json.loads(f.read().decode())["parent_run_id"]
    params = {f"base.{k}": v for k, v in sweep.base.to_dict().items()}
    params.update(
        {
            "num_samples": sweep.num_samples,
            "mode": sweep.mode,
            "scheduler": sweep.scheduler,
            "grace_period": sweep.grace_period,
            "space": sweep.space if sweep.mode == "random" else sweep.gamma_fractions,
        }
    )
    run_id = tracking.start_run(
        tracking_uri,
        sweep.base.experiment_name,
        name,
        params,
        {"sweep": name, "data_version": data_version, **tracking.code_version()},
    )
    fs.create_dir(path, recursive=True)
    import json

    with fs.open_output_stream(info_path) as f:
        f.write(json.dumps({"parent_run_id": run_id}).encode())
    return run_id


def _collect(grid: Any, base: TrainConfig) -> list[dict[str, Any]]:
    trials = []
    for res in grid:
        params = {k: v for k, v in (res.config or {}).items() if not k.startswith("_")}
        cfg = trial_config(base, params)
        df = res.metrics_dataframe
        best_map = best_ckpt = run_id = None
        epochs = 0
        losses: dict[str, list[float]] = {}
        if df is not None and len(df) and METRIC in df:
            row = df.loc[df[METRIC].idxmax()]
            best_map = float(row[METRIC])
            best_ckpt = row.get("checkpoint_path") if "checkpoint_path" in df else None
            epochs = int(df["epoch"].max())
            run_id = str(df["mlflow_run_id"].dropna().iloc[-1]) if "mlflow_run_id" in df else None
            losses = {c: df[c].tolist() for c in df.columns if str(c).startswith("loss")}
        if res.error is not None:
            status = "failed"
        elif epochs >= base.epochs:
            status = "completed"
        else:
            status = "early_stopped"
        trials.append(
            {
                "trial_id": (res.metrics or {}).get("trial_id") or os.path.basename(str(res.path)),
                "config": {
                    **{k: getattr(cfg, k) for k in params if k != "gamma_fraction"},
                    "gamma": cfg.gamma,
                    "alpha": cfg.alpha,
                    "r": cfg.r,
                    "warmup_epochs": cfg.warmup_epochs,
                    "gamma_fraction": cfg.gamma / ell_max(cfg.r, NUM_MODALITIES),
                },
                "status": status,
                "best_valid_map": best_map,
                "epochs": epochs,
                "checkpoint_path": best_ckpt if isinstance(best_ckpt, str) else None,
                "mlflow_run_id": run_id,
                "train_storage": (res.config or {}).get("_train_storage", ""),
                "error": str(res.error).splitlines()[0][:500] if res.error is not None else None,
                "losses": losses,
            }
        )
    return trials


def _register_first_fit(
    base: TrainConfig, ds: Any, done: list[dict[str, Any]], tracking_uri: str
) -> tuple[dict[str, Any], dict[str, str] | None, dict[str, float]]:
    """Register the best trial whose model passes :func:`pipeline.training.guards.model_problems`,
    trying trials in order of validation MAP; raise UnfitModelError when none does."""
    for candidate in sorted(done, key=lambda t: t["best_valid_map"], reverse=True):
        try:
            registered, test_map = _register_best(base, ds, candidate, tracking_uri)
        except guards.UnfitModelError as e:
            log.warning("trial %s is not registered: %s", candidate["trial_id"], e)
            candidate["status"], candidate["error"] = "unfit", str(e)[:500]
            continue
        return candidate, registered, test_map
    raise guards.UnfitModelError(f"none of {len(done)} trials' models passed the checks")


def _register_best(
    base: TrainConfig, ds: Any, best: dict[str, Any], tracking_uri: str
) -> tuple[dict[str, str] | None, dict[str, float]]:
    """Test MAP of the best trial's best checkpoint; log its model in its run and register it."""
    from pipeline.method.weights import WEIGHTS
    from pipeline.training.final_eval import final_evaluation, load_checkpoint_model

    ckpt = best["checkpoint_path"]
    if "://" not in ckpt and "://" in best.get("train_storage", ""):
        ckpt = best["train_storage"].split("://", 1)[0] + "://" + ckpt  # Tune reports bare paths
    with tempfile.TemporaryDirectory() as tmp:
        model = load_checkpoint_model(ckpt, Path(tmp) / WEIGHTS)
        final = final_evaluation(model, ds, base, best.get("losses", {}))
        if final.problems:
            raise guards.UnfitModelError("; ".join(final.problems))
        test_map = final.test_map
        tuned = [k for k in best["config"] if k != "gamma_fraction"]
        cfg = base.replace(**{k: best["config"][k] for k in tuned})
        registered = tracking.finish_run(
            tracking_uri,
            best["mlflow_run_id"],
            config={**cfg.to_dict(), "data_version": ds.data_version},
            manifest=ds.manifest,
            final_metrics={"test_map": test_map, "best_valid_map": best["best_valid_map"]},
            pr_curves=final.pr_curves,
            model_dir=Path(tmp),
            registered_model_name=base.registered_model_name if base.register_model else None,
        )
    return registered, test_map


def _trials_csv(trials: list[dict[str, Any]], path: Path) -> Path:
    cols = [
        "trial_id",
        "status",
        "gamma",
        "gamma_fraction",
        "alpha",
        "r",
        "warmup_epochs",
        "best_valid_map",
        "epochs",
        "mlflow_run_id",
        "error",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for t in trials:
            w.writerow({**{k: t.get(k) for k in cols}, **t["config"]})
    return path


def _gamma_plot(trials: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for status, marker in (("completed", "o"), ("early_stopped", "x"), ("failed", "s")):
        pts = [t for t in trials if t["status"] == status and t["best_valid_map"] is not None]
        if pts:
            ax.scatter(
                [t["config"]["gamma_fraction"] for t in pts],
                [t["best_valid_map"] for t in pts],
                marker=marker,
                label=status,
            )
    ax.set_xscale("log")
    ax.set_xlabel("γ / ℓmax(r)  (Eq 14)")
    ax.set_ylabel("best validation MAP (mean of I2T, T2I)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
