"""Model files: the weights plus the architecture to rebuild them, and batched encoding.

No Ray, no MLflow: the training loop, the in-process trainer and the served model share these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.model import RSHNLModel, sign_codes

WEIGHTS = "model.pt"


def save_model_file(
    path: Path, model: RSHNLModel, arch: dict[str, int], extra: dict[str, Any]
) -> None:
    """Weights plus the architecture needed to rebuild the module."""
    torch.save({"arch": arch, "state_dict": model.state_dict(), **extra}, path)


def load_model_file(path: Path | str) -> tuple[RSHNLModel, dict[str, Any]]:
    """Rebuild the module from :func:`save_model_file` output, in eval mode on the CPU."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    model = RSHNLModel(**blob["arch"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


@torch.no_grad()
def encode(model: RSHNLModel, x: np.ndarray, modality: str, batch_size: int = 2048) -> np.ndarray:
    """±1 int8 codes of features ``x`` (n, d), in batches."""
    out = []
    device = next(model.parameters()).device
    for s in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.array(x[s : s + batch_size], dtype=np.float32, order="C"))
        out.append(sign_codes(model.encode(xb.to(device), modality)).cpu().numpy())
    if out:
        return np.concatenate(out)
    bits = model.image_head.net[-1].out_features
    return np.zeros((0, bits), dtype=np.int8)
