"""The registered model: an MLflow pyfunc that encodes image or text features into hash codes.

Loading it needs torch, numpy and mlflow only (no Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from pipeline.model import MODALITIES, RSHNLModel, sign_codes

WEIGHTS = "model.pt"


def save_model_file(
    path: Path, model: RSHNLModel, arch: dict[str, int], extra: dict[str, Any]
) -> None:
    """Weights plus the architecture needed to rebuild the module."""
    torch.save({"arch": arch, "state_dict": model.state_dict(), **extra}, path)


def load_model_file(path: Path | str) -> tuple[RSHNLModel, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = RSHNLModel(**blob["arch"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


@torch.no_grad()
def encode(model: RSHNLModel, x: np.ndarray, modality: str, batch_size: int = 2048) -> np.ndarray:
    """±1 int8 codes of features ``x`` (n, d), in batches."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        xb = torch.as_tensor(np.ascontiguousarray(x[s : s + batch_size]), dtype=torch.float32)
        out.append(sign_codes(model.encode(xb, modality)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.int8)


class HashCodeModel(mlflow.pyfunc.PythonModel):
    """Input: a (n, d) float array of one modality's features; param ``modality``: image or text.
    Output: (n, L) int8 codes in {-1, +1}."""

    def load_context(self, context: Any) -> None:
        self.model, blob = load_model_file(context.artifacts["weights"])
        self.arch = blob["arch"]

    # No annotations here: MLflow would derive a second, conflicting schema from them.
    def predict(self, context, model_input, params=None):
        """Encode ``model_input`` (n, d) of the modality named by ``params``."""
        modality = (params or {}).get("modality", "image")
        if modality not in MODALITIES:
            raise ValueError(f"param 'modality' must be one of {MODALITIES}, got {modality!r}")
        x = np.asarray(model_input, dtype=np.float32)
        want = self.arch["image_dim" if modality == "image" else "text_dim"]
        if x.ndim != 2 or x.shape[1] != want:
            raise ValueError(f"{modality} features must have shape (n, {want}); got {x.shape}")
        return encode(self.model, x, modality)


def log_pyfunc(model_dir: Path, *, manifest: dict[str, Any], metrics: dict[str, Any]) -> Any:
    """Log the pyfunc (weights, manifest, metrics) into the active run; return its ModelInfo."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, -1))]),
        params=ParamSchema([ParamSpec("modality", "string", "image")]),
    )
    (model_dir / "dataset_manifest.json").write_text(json.dumps(manifest, indent=2))
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=HashCodeModel(),
        artifacts={
            "weights": str(model_dir / WEIGHTS),
            "dataset_manifest": str(model_dir / "dataset_manifest.json"),
            "metrics": str(model_dir / "metrics.json"),
        },
        signature=signature,
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "mlflow"],
    )
