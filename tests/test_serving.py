"""The registered pyfunc: inputs, outputs and what it carries.

``register_small_model`` (also used by the tracking and pull tests) registers a small untrained
RSHNLModel through ``tracking.start_run`` + ``tracking.finish_run``; no Ray training is involved.
``shared_tracking_uri`` gives every test module one sqlite store per session (creating one costs
seconds). Loading the model without Ray is checked in a fresh interpreter by tests/test_pull.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.method.model import RSHNLModel
from pipeline.tracking import runs as tracking
from pipeline.tracking.serving import WEIGHTS, save_model_file

DIMS = {"image_dim": 24, "text_dim": 16, "num_classes": 6}  # the conftest tiny dataset


_SHARED: dict[str, str] = {}


def shared_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the session (use a distinct model name per test)."""
    if "uri" not in _SHARED:
        root = tmp_path_factory.mktemp("mlflow-shared")
        _SHARED["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return _SHARED["uri"]


def small_history(epochs: int = 4, seed: int = 0) -> dict[str, Any]:
    """A history dict of the shape the training driver passes to finish_run."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(0.0, 1.0, 21)
    ramp = np.linspace(0.2, 0.6, epochs)
    clean = [np.histogram(rng.beta(2 + e, 1, 300), edges)[0].tolist() for e in range(epochs)]
    noisy = [np.histogram(rng.beta(1, 1 + e, 200), edges)[0].tolist() for e in range(epochs)]
    return {
        "epoch": list(range(1, epochs + 1)),
        "loss": (3 - ramp).tolist(),
        "loss_chl": (2 - ramp).tolist(),
        "loss_center": (1 - ramp).tolist(),
        "valid_map_i2t": ramp.tolist(),
        "valid_map_t2i": (ramp - 0.05).tolist(),
        "valid_map_mean": (ramp - 0.025).tolist(),
        "zero_weight_share": np.linspace(0, 0.4, epochs).tolist(),
        "noise_precision": np.linspace(0, 0.9, epochs).tolist(),
        "noise_recall": np.linspace(0, 0.7, epochs).tolist(),
        "weight_hist_edges": edges.tolist(),
        "weight_hist_clean": clean,
        "weight_hist_noisy": noisy,
    }


def register_small_model(
    root: Path,
    *,
    name: str = "rshnl-small",
    valid_map: float = 0.5,
    data_version: str = "tiny/v1@000000000000",
    dataset: str = "",
    seed: int = 0,
    bits: int = 16,
    history: dict[str, Any] | None = None,
    pr_curves: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register a small untrained model; return the ids a test needs."""
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    torch.manual_seed(seed)
    arch = {**DIMS, "bits": bits, "hidden": 32}
    model = RSHNLModel(**arch)
    model_dir = root / f"weights-{seed}"
    model_dir.mkdir(exist_ok=True)
    save_model_file(model_dir / WEIGHTS, model, arch, {"epoch": 1})
    config = {
        "bits": bits,
        "method": "rshnl",
        "warmup_epochs": 1,
        "dataset": dataset,
        "data_version": data_version,
    }
    run_id = tracking.start_run(uri, "tests", f"run-{seed}", config, {"data_version": data_version})
    final = {
        "best_valid_map": {"i2t": valid_map, "t2i": valid_map, "mean": valid_map},
        "test_map": {"i2t": 0.1, "t2i": 0.1, "mean": 0.1},
        "best_epoch": 1,
    }
    registered = tracking.finish_run(
        uri,
        run_id,
        config=config,
        manifest={"name": "tiny", "version": 1, "dims": {"image": 24, "text": 16}},
        final_metrics=final,
        model_dir=model_dir,
        registered_model_name=name,
        history=history,
        pr_curves=pr_curves,
    )
    return {
        "tracking_uri": uri,
        "run_id": run_id,
        "registered": registered,
        "model": model,
        "name": name,
    }


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reg = register_small_model(
        tmp_path_factory.mktemp("serving"),
        name="serving-small",
        tracking_uri=shared_tracking_uri(tmp_path_factory),
    )
    mlflow.set_tracking_uri(reg["tracking_uri"])
    mlflow.set_registry_uri(reg["tracking_uri"])
    reg["pyfunc"] = mlflow.pyfunc.load_model(f"models:/{reg['name']}@champion")
    return reg


def _features(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_codes_match_the_torch_model(registered):
    pm, model = registered["pyfunc"], registered["model"]
    x = _features(7, 24)
    codes = pm.predict(x, params={"modality": "image"})
    with torch.no_grad():
        want = torch.where(model.encode(torch.from_numpy(x), "image") >= 0, 1, -1).numpy()
    assert codes.dtype == np.int8 and codes.shape == (7, 16)
    assert np.array_equal(codes, want)
    txt = pm.predict(_features(5, 16), params={"modality": "text"})
    assert txt.shape == (5, 16) and set(np.unique(txt)) <= {-1, 1}


def test_packed_and_both_outputs(registered):
    pm = registered["pyfunc"]
    x = _features(9, 16, seed=1)
    codes = pm.predict(x, params={"modality": "text"})
    packed = pm.predict(x, params={"modality": "text", "output": "packed"})
    both = pm.predict(x, params={"modality": "text", "output": "both"})
    assert packed.dtype == np.uint8 and packed.shape == (9, 2)
    assert np.array_equal(np.unpackbits(packed, axis=1).astype(np.int8) * 2 - 1, codes)
    assert np.array_equal(both["codes"], codes) and np.array_equal(both["packed"], packed)
    with pytest.raises(Exception, match="output"):
        pm.predict(x, params={"modality": "text", "output": "hex"})


def test_dataframe_inputs(registered):
    pm = registered["pyfunc"]
    img, txt = _features(4, 24, seed=2), _features(3, 16, seed=3)
    want_img = pm.predict(img, params={"modality": "image"})
    want_txt = pm.predict(txt, params={"modality": "text"})
    # d numeric columns, modality from the param
    assert np.array_equal(pm.predict(pd.DataFrame(img), params={"modality": "image"}), want_img)
    # one vector column, float64 values
    df = pd.DataFrame({"features": list(img.astype(np.float64))})
    assert np.array_equal(pm.predict(df, params={"modality": "image"}), want_img)
    # a modality column mixing both kinds of rows; output keeps the input row order
    mixed = pd.DataFrame(
        {
            "features": [txt[0], img[0], img[1], txt[1], img[2], txt[2], img[3]],
            "modality": ["text", "image", "image", "text", "image", "text", "image"],
        }
    )
    out = pm.predict(mixed)
    assert np.array_equal(out[[1, 2, 4, 6]], want_img)
    assert np.array_equal(out[[0, 3, 5]], want_txt)


def test_bad_inputs_name_the_problem(registered):
    pm = registered["pyfunc"]
    with pytest.raises(Exception, match=r"image features must have shape \(n, 24\)"):
        pm.predict(_features(2, 16), params={"modality": "image"})
    with pytest.raises(Exception, match="modality"):
        pm.predict(_features(2, 24), params={"modality": "audio"})
    bad = _features(2, 24)
    bad[0, 3] = np.nan
    with pytest.raises(Exception, match="NaN"):
        pm.predict(bad, params={"modality": "image"})
    with pytest.raises(Exception, match="modality"):
        pm.predict(pd.DataFrame({"features": [bad[1]], "modality": ["video"]}))


def test_model_carries_heads_centers_config_manifest_and_metrics(registered):
    pm = registered["pyfunc"]
    inner = pm.unwrap_python_model()
    sd = inner.model.state_dict()
    assert any(k.startswith("image_head.") for k in sd)
    assert any(k.startswith("text_head.") for k in sd)
    assert any(k.startswith("center_net.") for k in sd)
    centers = inner.hash_centers()
    assert centers.shape == (6, 16) and set(np.unique(centers)) <= {-1, 1}
    assert inner.config["data_version"] == "tiny/v1@000000000000"
    assert inner.manifest["name"] == "tiny"
    assert inner.metrics["best_valid_map"]["mean"] == pytest.approx(0.5)
    sig = pm.metadata.signature
    assert {p.name for p in sig.params.params} == {"modality", "output"}
    assert sig.outputs.inputs[0].shape == (-1, 16)
    assert pm.metadata.metadata["bits"] == 16 and pm.metadata.metadata["text_dim"] == 16
