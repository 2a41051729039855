"""A tiny Ray Tune sweep: valid γ per trial, nested MLflow runs, ASHA stops, a registered winner."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.config import ConfigError, TrainConfig
from pipeline.experiments.tune import SweepConfig, trial_config
from pipeline.method.bounds import ell_max

pytestmark = pytest.mark.ray


def _ell_max(r: float) -> float:
    """Eq 14 by hand for M = 2 modalities."""
    return 2 * (r * r - r + 1) / r


def test_gamma_is_a_fraction_of_ell_max():
    base = TrainConfig(dataset="x")
    cfg = trial_config(base, {"gamma_fraction": 0.25, "r": 0.1, "alpha": 0.3, "warmup_epochs": 4})
    # ℓmax(0.1) = 2(0.01 − 0.1 + 1)/0.1 = 18.2; γ = 0.25 × 18.2 (the trial's r, not the base's)
    assert cfg.gamma == pytest.approx(4.55)
    assert (cfg.r, cfg.alpha, cfg.warmup_epochs) == (0.1, 0.3, 4)
    assert ell_max(0.1) == pytest.approx(18.2)


def test_sampled_trials_map_the_space_onto_valid_gammas():
    from pipeline.experiments.tune import DEFAULT_SPACE, param_space

    base = TrainConfig(dataset="x")
    space = param_space(SweepConfig(base=base))
    rs, fractions = [], []
    for _ in range(200):
        params = {k: v.sample() if hasattr(v, "sample") else v for k, v in space.items()}
        cfg = trial_config(base, params).validate()  # refused if γ ≥ ℓmax without the flag
        assert not cfg.allow_gamma_above_ell_max
        assert cfg.gamma == pytest.approx(params["gamma_fraction"] * _ell_max(params["r"]))
        assert cfg.r == params["r"] and cfg.alpha == params["alpha"]
        rs.append(cfg.r)
        fractions.append(cfg.gamma / _ell_max(cfg.r))
    lo, hi = DEFAULT_SPACE["gamma_fraction"]["low"], DEFAULT_SPACE["gamma_fraction"]["high"]
    assert lo <= min(fractions) and max(fractions) <= hi
    assert min(rs) < 0.01 and max(rs) > 0.1  # r spans its log range, so ℓmax varies ~100×
    # the γ grid goes past ℓmax on purpose (RSHNL-D-like points): those trials carry the flag
    grid = param_space(SweepConfig(base=base, mode="gamma"))["gamma_fraction"]
    fractions = grid["grid_search"] if isinstance(grid, dict) else grid
    for frac in fractions:
        cfg = trial_config(base, {"gamma_fraction": frac, "r": base.r}).validate()
        assert cfg.gamma == pytest.approx(frac * 198.02)
        assert cfg.allow_gamma_above_ell_max == (frac >= 1)


def test_scbch_weights_are_searchable_and_untunable_keys_refused():
    from pipeline.config import ConfigError
    from pipeline.experiments.tune import default_space

    base = TrainConfig(dataset="x", method="scbch", checkpoint_every=1)
    space = default_space("scbch")
    assert {"scbch_alpha", "scbch_beta", "scbch_k", "scbch_g"} <= set(space)
    SweepConfig(base=base, space=space).validate()
    assert {"scbch_margin", "scbch_shift"} <= set(space)
    cfg = trial_config(base, {"scbch_alpha": 1.5, "scbch_k": 12.0, "scbch_g": 0.3})
    assert (cfg.scbch_alpha, cfg.scbch_k, cfg.scbch_g) == (1.5, 12, 0.3)
    assert cfg.scbch_params() == {"margin": 0.15, "shift": 0.8, "tau": 1.0}  # unset: the form's
    cfg = trial_config(base, {"scbch_margin": 0.3, "scbch_shift": 0.5})
    assert cfg.scbch_params() == {"margin": 0.3, "shift": 0.5, "tau": 1.0}
    assert cfg.scbch_form == base.scbch_form == "upstream"
    assert isinstance(cfg.scbch_k, int) and cfg.gamma == base.gamma
    with pytest.raises(ConfigError, match=r"untunable key\(s\) \['workers'\]"):
        SweepConfig(base=base, space={"workers": {"type": "fixed", "value": 2}}).validate()
    run_mechanics = (
        "checkpoint_every",
        "search_index",
        "center_sync_check_every",
        "data_cache_max_bytes",
    )
    for key in run_mechanics:  # how the run executes, not what it learns
        with pytest.raises(ConfigError, match=rf"untunable key\(s\) \['{key}'\]"):
            SweepConfig(base=base, space={key: {"type": "fixed", "value": 2}}).validate()


def test_sweeps_refuse_sparse_checkpoints():
    """The best trial is registered from its best epoch's checkpoint: every epoch needs one."""
    from pipeline.config import ConfigError

    base = TrainConfig(dataset="x", checkpoint_every=5)
    with pytest.raises(ConfigError, match="checkpoint_every 5: sweeps need checkpoint_every 1"):
        SweepConfig(base=base, space={}).validate()


def test_sweeps_from_files_checkpoint_every_epoch_unless_told_otherwise(tmp_path):
    """Training's default is sparse checkpoints; a sweep's base is every epoch unless the file
    or a flag says otherwise, and then it is refused."""
    from pipeline.experiments.tune import sweep_from_yaml

    assert TrainConfig(dataset="x").checkpoint_every > 1
    assert sweep_from_yaml(None, {"dataset": "x"}, {}).base.checkpoint_every == 1
    path = tmp_path / "s.yaml"
    path.write_text("checkpoint_every: 3\n")
    with pytest.raises(ConfigError, match="checkpoint_every 3: sweeps need"):
        sweep_from_yaml(str(path), {"dataset": "x"}, {})


@pytest.fixture(scope="module")
def sweep_result(ray_cluster, tiny_dataset, tmp_path_factory):
    from pipeline.experiments.tune import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    base = TrainConfig(
        dataset=tiny_dataset,
        bits=16,
        hidden_dim=32,
        epochs=4,  # ASHA rungs at epochs 1 and 2: two chances to stop a trial, not one
        checkpoint_every=1,
        batch_size=48,
        lr=1e-3,
        workers=1,
        cpus_per_worker=0.5,
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_name="sweep-test",
        registered_model_name="rshnl-sweep-test",
        storage_path=str(root / "train"),
    )
    space = {
        "r": {"type": "loguniform", "low": 1e-3, "high": 1.0},
        "gamma_fraction": {"type": "loguniform", "low": 1e-3, "high": 0.5},
        "alpha": {"type": "loguniform", "low": 1e-2, "high": 1.0},
        "warmup_epochs": {"type": "randint", "low": 0, "high": 1},
    }
    sweep = SweepConfig(
        base=base,
        name="tiny",
        num_samples=4,
        space=space,
        grace_period=1,
        reduction_factor=2,
        max_concurrent=4,  # trials side by side: ASHA compares them at epoch 1
        storage_path=str(root / "tune"),
        seed=1,
    )
    return base, run_sweep(sweep)


@pytest.mark.slow  # the sweep fixture takes 2.5 min; `make test-e2e` submits a sweep too
def test_every_trial_trains_with_its_own_gamma(sweep_result):
    base, s = sweep_result
    assert len(s["trials"]) == 4
    client = mlflow.tracking.MlflowClient(base.tracking_uri)
    for t in s["trials"]:
        c = t["config"]
        # γ/ℓmax(r) by hand lies in the sampled range [1e-3, 0.5]: γ follows the trial's own r
        assert 1e-3 <= c["gamma"] / _ell_max(c["r"]) <= 0.5
        assert 1e-3 <= c["r"] <= 1.0 and 1e-2 <= c["alpha"] <= 1.0 and c["warmup_epochs"] in (0, 1)
        if t["mlflow_run_id"]:  # the training run logged the γ and r it was given
            params = client.get_run(t["mlflow_run_id"]).data.params
            assert float(params["gamma"]) == pytest.approx(c["gamma"])
            assert float(params["r"]) == pytest.approx(c["r"])
    assert len({t["config"]["r"] for t in s["trials"]}) == 4  # sampled, not one fixed point


@pytest.mark.slow  # the sweep fixture takes 2.5 min; `make test-e2e` submits a sweep too
def test_asha_stopped_at_least_one_trial(sweep_result):
    _, s = sweep_result
    statuses = [t["status"] for t in s["trials"]]
    assert "early_stopped" in statuses, statuses
    assert all(st in ("completed", "early_stopped", "failed") for st in statuses)


@pytest.mark.slow  # the sweep fixture takes 2.5 min; `make test-e2e` submits a sweep too
def test_parent_and_child_runs_and_registered_winner(sweep_result):
    base, s = sweep_result
    client = mlflow.tracking.MlflowClient(base.tracking_uri, registry_uri=base.tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'"
    )
    assert len(children) == 4
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED", "FAILED"}
    parent = client.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"trials.csv", "valid_map_vs_gamma.png"} <= {
        a.path for a in client.list_artifacts(s["parent_run_id"])
    }
    assert float(parent.data.params["best.gamma"]) == pytest.approx(s["best_config"]["gamma"])
    reg = s["registered_model"]
    mv = client.get_model_version(reg["name"], reg["version"])
    best = max(
        (t for t in s["trials"] if t["best_valid_map"] is not None),
        key=lambda t: t["best_valid_map"],
    )
    assert mv.run_id == best["mlflow_run_id"]
    assert set(s["best_test_map"]) == {"i2t", "t2i", "mean"}


def test_sweep_from_yaml_flags_over_the_file_and_bad_keys(tmp_path):
    from pipeline.experiments.tune import sweep_from_yaml

    path = tmp_path / "s.yaml"
    path.write_text(
        "bits: 32\nepochs: 9\nsearch_space:\n  alpha: {type: fixed, value: 0.2}\n"
        "sweep:\n  num_samples: 3\n  scheduler: fifo\n"
    )
    s = sweep_from_yaml(str(path), {"dataset": "x", "epochs": 4, "bits": None}, {"num_samples": 5})
    assert (s.base.bits, s.base.epochs, s.num_samples, s.scheduler) == (32, 4, 5, "fifo")
    assert s.space["alpha"] == {"type": "fixed", "value": 0.2} and "gamma_fraction" in s.space
    path.write_text("sweep:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown sweep key\(s\) \['bogus'\]"):
        sweep_from_yaml(str(path), {"dataset": "x"}, {})
    with pytest.raises(ConfigError, match="--resume needs the --name"):
        sweep_from_yaml(None, {"dataset": "x"}, {}, resume=True)


def test_the_mixture_weighting_gets_its_own_default_space(tmp_path):
    from pipeline.experiments.tune import sweep_from_yaml

    path = tmp_path / "m.yaml"
    path.write_text("weighting: mixture\ntau_center: 0.2\n")
    s = sweep_from_yaml(str(path), {"dataset": "x"}, {})
    # w_i = P(clean | ℓ_i) uses no γ: no γ share to search, τ of Eq 4 instead
    assert "gamma_fraction" not in s.space and s.space["tau_center"]["type"] == "loguniform"
    assert {"r", "alpha", "warmup_epochs"} <= set(s.space)
    cfg = trial_config(s.base, {"tau_center": 0.35, "r": 0.05})
    assert (cfg.tau_center, cfg.r, cfg.weighting) == (0.35, 0.05, "mixture")
    with pytest.raises(ConfigError, match="--mode gamma grids over Eq 12's γ"):
        sweep_from_yaml(str(path), {"dataset": "x"}, {"mode": "gamma"})
    # the paper's weighting keeps the γ share
    assert "gamma_fraction" in sweep_from_yaml(None, {"dataset": "x"}, {}).space
