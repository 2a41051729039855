"""The typed config: validation, YAML and flag precedence."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import ConfigError, TrainConfig


def test_paper_defaults():
    c = TrainConfig(dataset="x")
    assert (c.bits, c.hidden_dim, c.tau, c.r, c.warmup_epochs) == (128, 4096, 1.0, 0.01, 5)
    assert (c.lr, c.batch_size, c.epochs, c.alpha, c.gamma) == (1e-4, 256, 150, 0.05, 3.0)
    assert c.gamma_fraction == pytest.approx(3.0 / 198.02)


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_gamma_must_be_positive(gamma):
    with pytest.raises(ConfigError, match=r"'gamma'.*> 0"):
        TrainConfig(dataset="x", gamma=gamma).validate()


def test_gamma_above_ell_max_is_refused_unless_allowed(caplog):
    # ℓmax(r=0.01) = 2·(0.0001 − 0.01 + 1)/0.01 = 198.02 (Eq 14)
    with pytest.raises(ConfigError, match=r"'gamma' = 250\.0: must be < ℓmax\(r=0\.01\) = 198"):
        TrainConfig(dataset="x", gamma=250.0).validate()
    with pytest.raises(ConfigError, match="allow_gamma_above_ell_max"):
        TrainConfig(dataset="x", gamma=198.02, weighting="hard").validate()
    with caplog.at_level(logging.WARNING):
        TrainConfig(dataset="x", gamma=250.0, allow_gamma_above_ell_max=True).validate()
    assert "ℓmax" in caplog.text
    TrainConfig(dataset="x", gamma=198.0).validate()  # just below the bound
    # γ plays no part without self-paced weights
    TrainConfig(dataset="x", gamma=250.0, weighting="none").validate()
    TrainConfig(dataset="x", gamma=250.0, method="scbch").validate()


def test_variants_and_sweeps_that_mean_gamma_above_ell_max_still_validate():
    from pipeline.experiments.tune import trial_config
    from pipeline.method.bounds import ell_max
    from pipeline.method.variants import apply_method

    d = apply_method("RSHNL-D", TrainConfig(dataset="x")).validate()
    assert d.gamma == pytest.approx(1.5 * ell_max(0.01)) and d.allow_gamma_above_ell_max
    base = TrainConfig(dataset="x")
    assert trial_config(base, {"gamma_fraction": 1.5, "r": 0.1}).validate().gamma_fraction == (
        pytest.approx(1.5)
    )
    below = trial_config(base, {"gamma_fraction": 0.995, "r": 1.0}).validate()
    assert not below.allow_gamma_above_ell_max


def test_bits_have_an_upper_bound():
    TrainConfig(dataset="x", bits=4096).validate()
    with pytest.raises(ConfigError, match=r"'bits' = 4097: must be in 1\.\.4096"):
        TrainConfig(dataset="x", bits=4097).validate()


@pytest.mark.parametrize(
    "key,value", [("r", 0.0), ("r", 1.5), ("bits", 0), ("epochs", 0), ("workers", 0)]
)
def test_other_ranges(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TrainConfig(dataset="x", **{key: value}).validate()


def test_yaml_then_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dataset: /data/v1\ngamma: 2.5\nbits: 64\n")
    c = TrainConfig.load(p, {"bits": 32, "epochs": None})
    assert (c.dataset, c.gamma, c.bits, c.epochs) == ("/data/v1", 2.5, 32, 150)


def test_yaml_errors_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dataset: x\ngama: 2.5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['gama'\]"):
        TrainConfig.load(p, {})
    p.write_text("dataset: x\nbits: many\n")
    with pytest.raises(ConfigError, match="'bits' must be an integer"):
        TrainConfig.load(p, {})
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.yaml", {})


def test_roundtrip_dict():
    c = TrainConfig(dataset="d", gamma=1.5, tags={"team": "x"})
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_run_key_sets_name_real_fields_and_keep_the_model_keys_out():
    from pipeline.config import NOT_TUNABLE_KEYS, RESUMABLE_KEYS, RUN_KEYS

    fields = set(TrainConfig().to_dict())
    for keys in (RUN_KEYS, RESUMABLE_KEYS, NOT_TUNABLE_KEYS):
        assert keys <= fields, sorted(keys - fields)
    model_keys = {"bits", "hidden_dim", "gamma", "alpha", "r", "tau", "warmup_epochs", "seed", "lr"}
    assert not model_keys & (RESUMABLE_KEYS | NOT_TUNABLE_KEYS)
    # a resume stays in the tracking server and experiment it started in
    assert {"tracking_uri", "experiment_name"} <= RUN_KEYS - RESUMABLE_KEYS
    assert RUN_KEYS <= NOT_TUNABLE_KEYS and "epochs" in RESUMABLE_KEYS & NOT_TUNABLE_KEYS
