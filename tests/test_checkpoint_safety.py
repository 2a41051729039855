"""Checkpoint and model files hold tensors and plain values only; a file that would run code when
unpickled is refused with a clear error and never executed."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.method.model import RSHNLModel
from pipeline.method.weights import WEIGHTS, ModelFileError, load_model_file, save_model_file
from pipeline.tracking.serving import HashCodeModel
from pipeline.training.train_loop import (
    STATE,
    load_train_state,
    restore_rng_states,
    save_train_state,
)

ARCH = {"image_dim": 6, "text_dim": 5, "num_classes": 3, "bits": 8, "hidden": 8}


class _Payload:
    """Unpickling this writes a marker file: what a planted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _craft(path: Path, marker: Path, **fields) -> Path:
    torch.save({**fields, "payload": _Payload(marker)}, path)
    return path


def test_crafted_file_would_run_code_with_a_plain_load(tmp_path):
    """The crafted file is a real threat: an unrestricted load runs its payload."""
    marker = tmp_path / "marker"
    path = _craft(tmp_path / STATE, marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_crafted_train_state_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = _craft(tmp_path / STATE, marker, epoch=1, history="{}")
    with pytest.raises(ModelFileError, match=r"train_state\.pt: refused to load.*exec"):
        load_train_state(path)
    assert not marker.exists()


def test_crafted_model_file_is_refused_by_loader_and_served_model(tmp_path):
    marker = tmp_path / "marker"
    path = _craft(tmp_path / WEIGHTS, marker, arch=ARCH, state_dict={})
    with pytest.raises(ModelFileError, match=r"model\.pt: refused to load"):
        load_model_file(path)
    with pytest.raises(ModelFileError, match="refused to load"):
        HashCodeModel().load_context(SimpleNamespace(artifacts={"weights": str(path)}))
    assert not marker.exists()


def test_truncated_and_missing_files_name_the_file(tmp_path):
    model = RSHNLModel(**ARCH)
    good = tmp_path / WEIGHTS
    save_model_file(good, model, ARCH, {"epoch": np.int64(2), "valid_map": {"mean": np.float64(1)}})
    bad = tmp_path / "cut.pt"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelFileError, match=r"cut\.pt: not a readable model file"):
        load_model_file(bad)
    with pytest.raises(ModelFileError, match=r"gone\.pt: file not found"):
        load_model_file(tmp_path / "gone.pt")
    back, blob = load_model_file(good)  # NumPy scalars were stored as plain numbers
    assert blob["epoch"] == 2 and type(blob["valid_map"]["mean"]) is float
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_train_state_round_trip_restores_every_rng_stream(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    random.gauss(0, 1)
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([param], lr=1e-3)
    param.grad = torch.full((4,), 0.5)
    opt.step()
    history = {"loss": [np.float32(1.5), 0.25], "weight_hist_clean": [[1, 2]]}
    save_train_state(tmp_path / STATE, opt.state_dict(), 4, np.float64(0.75), 3, history)
    expected = [random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3).tolist()]
    state = load_train_state(tmp_path / STATE)
    restore_rng_states(state)
    got = [random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3).tolist()]
    assert got == expected
    assert state["epoch"] == 4 and state["best_epoch"] == 3 and state["best_valid_map"] == 0.75
    assert state["history"] == {"loss": [1.5, 0.25], "weight_hist_clean": [[1, 2]]}
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.ones(4))], lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
