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


def test_gamma_above_ell_max_warns(caplog):
    with caplog.at_level(logging.WARNING):
        TrainConfig(dataset="x", gamma=250.0).validate()
    assert "ℓmax" in caplog.text


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
