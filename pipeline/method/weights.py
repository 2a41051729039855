"""Model files: the weights plus the architecture to rebuild them, and batched encoding.

No Ray, no MLflow: the training loop, the in-process trainer and the served model share these.
Files hold tensors and plain values only and are read with ``torch.load(weights_only=True)``, so
a file that would run code when unpickled is refused instead of executed.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pipeline.method.model import HashModel, model_from_arch, sign_codes

WEIGHTS = "model.pt"


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be read safely; the message names the file."""


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays turned into Python numbers and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


def safe_load(source: Path | str | IO[bytes] | bytes, what: str = "") -> Any:
    """``torch.load`` restricted to tensors and plain values; :class:`ModelFileError` otherwise."""
    name = what or str(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ModelFileError(
            f"{name}: refused to load: it holds objects other than tensors and plain values"
            + (f" (it references {found.group(1)})" if found else "")
        ) from None
    except FileNotFoundError:
        raise ModelFileError(f"{name}: file not found") from None
    except Exception as e:  # truncated or not a torch file at all
        raise ModelFileError(f"{name}: not a readable model file: {type(e).__name__}: {e}") from e


def save_model_file(
    path: Path, model: HashModel, arch: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Weights plus the architecture needed to rebuild the module (tensors and plain values)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"arch": plain(arch), "state_dict": model.state_dict(), **plain(extra)}, tmp)
    os.replace(tmp, path)


def load_model_file(path: Path | str) -> tuple[HashModel, dict[str, Any]]:
    """Rebuild the module from :func:`save_model_file` output, in eval mode on the CPU.

    Raises :class:`ModelFileError` for a file that is unreadable or holds anything but tensors
    and plain values.
    """
    blob = safe_load(path)
    if not isinstance(blob, dict) or not {"arch", "state_dict"} <= set(blob):
        raise ModelFileError(f"{path}: not a model file (needs 'arch' and 'state_dict')")
    model = model_from_arch(blob["arch"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


@torch.no_grad()
def encode(
    model: HashModel,
    x: np.ndarray,
    modality: str,
    batch_size: int = 2048,
    on_embedding: Callable[[torch.Tensor], None] | None = None,
) -> np.ndarray:
    """±1 int8 codes of features ``x`` (n, d), in batches; ``on_embedding`` sees each batch's
    continuous embedding before its sign is taken."""
    out = []
    device = next(model.parameters()).device
    for s in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.array(x[s : s + batch_size], dtype=np.float32, order="C"))
        h = model.encode(xb.to(device), modality)
        if on_embedding is not None:
            on_embedding(h)
        out.append(sign_codes(h).cpu().numpy())
    if out:
        return np.concatenate(out)
    bits = model.image_head.net[-1].out_features
    return np.zeros((0, bits), dtype=np.int8)
