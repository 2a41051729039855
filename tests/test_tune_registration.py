"""A sweep registers its best trial whose model passes the pre-registration checks."""

from __future__ import annotations

import pytest

from pipeline.experiments import tune
from pipeline.training import guards


def _trials(*maps: float) -> list[dict]:
    return [
        {"trial_id": f"t{i}", "best_valid_map": m, "status": "completed"}
        for i, m in enumerate(maps)
    ]


def test_an_unfit_best_trial_gives_way_to_the_next(monkeypatch):
    unfit = {"t1"}  # the best by validation MAP
    tried = []

    def fake_register(base, ds, trial, uri):
        tried.append(trial["trial_id"])
        if trial["trial_id"] in unfit:
            raise guards.UnfitModelError("image codes collapsed")
        return {"name": "m", "version": "1"}, {"mean": 0.5}

    monkeypatch.setattr(tune, "_register_best", fake_register)
    trials = _trials(0.30, 0.50, 0.40)
    best, registered, test_map = tune._register_first_fit(None, None, trials, "sqlite://")
    assert tried == ["t1", "t2"]
    assert best["trial_id"] == "t2" and registered == {"name": "m", "version": "1"}
    assert test_map == {"mean": 0.5}
    assert trials[1]["status"] == "unfit" and "collapsed" in trials[1]["error"]


def test_no_fit_trial_raises(monkeypatch):
    def fake_register(base, ds, trial, uri):
        raise guards.UnfitModelError("loss is nan at epoch 1")

    monkeypatch.setattr(tune, "_register_best", fake_register)
    with pytest.raises(guards.UnfitModelError, match="none of 2 trials"):
        tune._register_first_fit(None, None, _trials(0.3, 0.2), "sqlite://")
