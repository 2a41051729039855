"""The registered model: an MLflow pyfunc that encodes image or text features into hash codes.

Loading it needs torch, numpy and mlflow only (no Ray). The model directory carries the weights of
both hash heads and the class-center network (``model.pt``), the resolved training config
(``config.yaml``), the dataset manifest (``dataset_manifest.json``), the validation and test
metrics (``metrics.json``) and the search index to use with its codes (``index.json``: the
:class:`~pipeline.retrieval.index.IndexSpec` of the config's ``search_index``, parameters only,
the index is rebuilt from the database codes; also in the MLmodel metadata as ``search_index``).

Input, one of:

- a (n, d) array (any float dtype) of one modality's features;
- a DataFrame of d numeric columns;
- a DataFrame with one column of feature vectors (named ``features``, ``image`` or ``text``) and
  optionally a ``modality`` column, which may mix image and text rows.

Params: ``modality`` (``"image"`` | ``"text"``, default image; a ``modality`` column wins) and
``output``:

- ``"codes"`` (default): (n, L) int8 codes in {−1, +1}, rows in input order;
- ``"packed"``: (n, ⌈L/8⌉) uint8, the codes' bits packed most significant bit first (the layout of
  :func:`pipeline.retrieval.metrics.pack_codes` and of faiss binary indexes);
- ``"both"``: ``{"codes": ..., "packed": ...}``.

The signature declares the output and the params but no input schema: the feature width depends
on the modality, and a tensor schema with a fixed width would refuse DataFrames and one of the two
modalities. The model checks the width itself and names the expected shape when it is wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from pipeline.method.model import MODALITIES, sign_codes
from pipeline.method.weights import WEIGHTS, encode, load_model_file, save_model_file

log = logging.getLogger(__name__)
__all__ = [
    "WEIGHTS",
    "HashCodeModel",
    "encode",
    "load_model_dir",
    "load_model_file",
    "save_model_file",
]

CONFIG = "config.yaml"
MANIFEST = "dataset_manifest.json"
METRICS = "metrics.json"
INDEX = "index.json"
OUTPUTS = ("codes", "packed", "both")


def feature_dim(arch: dict[str, int], modality: str) -> int:
    """Input dimension of ``modality`` for a model of architecture ``arch``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return int(arch["image_dim" if modality == "image" else "text_dim"])


VECTOR_COLUMNS = ("features", "image", "text")


def _matrix(values: Any, what: str) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numeric feature vectors of one length: {e}") from e
    return x


def split_input(model_input: Any, modality: str) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """Input rows grouped by modality: [(row positions, modality, (m, d) float32 features)]."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        df = model_input
        mods = df["modality"].astype(str).to_numpy() if "modality" in df.columns else None
        vec_cols = [c for c in VECTOR_COLUMNS if c in df.columns]
        if vec_cols:
            col = df[vec_cols[0]].to_numpy()
            rows = np.arange(len(df))
            if mods is None:
                return [(rows, modality, _matrix(list(col), f"column '{vec_cols[0]}'"))]
            bad = sorted(set(mods) - set(MODALITIES))
            if bad:
                raise ValueError(f"column 'modality' must hold {MODALITIES}, found {bad}")
            return [
                (rows[mods == m], m, _matrix(list(col[mods == m]), f"{m} rows"))
                for m in MODALITIES
                if (mods == m).any()
            ]
        if mods is not None:
            if len(set(mods)) > 1:
                raise ValueError(
                    "rows of different modalities need a vector column ('features') because "
                    "their feature widths differ"
                )
            modality = str(mods[0]) if len(mods) else modality
            df = df.drop(columns=["modality"])
        return [(np.arange(len(df)), modality, _matrix(df.to_numpy(), "DataFrame columns"))]
    x = _matrix(model_input, "features")
    return [(np.arange(x.shape[0] if x.ndim else 0), modality, x)]


class HashCodeModel(mlflow.pyfunc.PythonModel):
    """Encode one modality's features into ±1 hash codes and/or packed bytes (module docstring).

    After loading, ``config``, ``manifest``, ``metrics`` and ``index`` hold the training config,
    the dataset manifest, the metrics and the recorded index spec (``{}`` for models logged
    without one: the default spec); :meth:`hash_centers` gives the class hash centers.
    """

    def load_context(self, context: Any) -> None:
        self.model, blob = load_model_file(context.artifacts["weights"])
        self.arch: dict[str, int] = dict(blob["arch"])
        self.bits = int(self.arch["bits"])
        self.config: dict[str, Any] = {}
        self.manifest: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.index: dict[str, Any] = {}
        arts = context.artifacts
        if "config" in arts:
            import yaml

            self.config = yaml.safe_load(Path(arts["config"]).read_text()) or {}
        if "dataset_manifest" in arts:
            self.manifest = json.loads(Path(arts["dataset_manifest"]).read_text())
        if "metrics" in arts:
            self.metrics = json.loads(Path(arts["metrics"]).read_text())
        if "index" in arts:
            self.index = json.loads(Path(arts["index"]).read_text())

    def hash_centers(self) -> np.ndarray:
        """(K, L) int8 ±1 class hash centers: the sign of the center network's output."""
        with torch.no_grad():
            return sign_codes(self.model.center_net()).numpy()

    def encode(self, features: Any, modality: str = "image", output: str = "codes") -> Any:
        """Codes of ``features`` (module docstring for the input forms and ``output``)."""
        if output not in OUTPUTS:
            raise ValueError(f"param 'output' must be one of {OUTPUTS}, got {output!r}")
        if modality not in MODALITIES:
            raise ValueError(f"param 'modality' must be one of {MODALITIES}, got {modality!r}")
        groups = split_input(features, modality)
        n = sum(len(rows) for rows, _, _ in groups)
        codes = np.empty((n, self.bits), dtype=np.int8)
        for rows, m, x in groups:
            want = feature_dim(self.arch, m)
            if x.ndim != 2 or x.shape[1] != want:
                raise ValueError(f"{m} features must have shape (n, {want}); got {x.shape}")
            if not np.isfinite(x).all():
                raise ValueError(f"{m} features contain NaN or infinite values")
            codes[rows] = encode(self.model, x, m)
        if output == "codes":
            return codes
        packed = np.packbits(codes > 0, axis=1)
        return packed if output == "packed" else {"codes": codes, "packed": packed}

    # No annotations here: MLflow would derive a second, conflicting schema from them.
    def predict(self, context, model_input, params=None):
        """Encode ``model_input`` (n, d) of the modality named by ``params``."""
        params = params or {}
        modality = params.get("modality") or "image"
        if modality not in MODALITIES:
            raise ValueError(f"param 'modality' must be one of {MODALITIES}, got {modality!r}")
        return self.encode(model_input, modality, params.get("output") or "codes")


class _Context:
    """The part of MLflow's PythonModelContext that :meth:`HashCodeModel.load_context` reads."""

    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def load_model_dir(model_dir: str | Path) -> tuple[HashCodeModel, dict[str, Any]]:
    """A logged pyfunc's :class:`HashCodeModel` from its downloaded directory, without unpickling.

    ``mlflow.pyfunc.load_model`` unpickles ``python_model.pkl`` from the artifact store; this
    reads only the MLmodel file (YAML) and the artifacts it names (weights with
    ``torch.load(weights_only=True)``, config YAML, JSON). Returns the model and the MLmodel
    fields (``run_id``, ``metadata``, ...).
    """
    import yaml

    root = Path(model_dir)
    mlmodel = yaml.safe_load((root / "MLmodel").read_text()) or {}
    flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
    artifacts: dict[str, str] = {}
    for key, spec in (flavor.get("artifacts") or {}).items():
        rel = Path(str((spec or {}).get("path", "")))
        path = (root / rel).resolve()
        if rel.is_absolute() or root.resolve() not in path.parents:
            raise ValueError(f"{root / 'MLmodel'}: artifact '{key}' points outside the model")
        artifacts[key] = str(path)
    if "weights" not in artifacts:
        raise ValueError(f"{root / 'MLmodel'}: not a hash-code model (no 'weights' artifact)")
    model = HashCodeModel()
    model.load_context(_Context(artifacts))
    return model, mlmodel


def _json_default(o: Any) -> Any:
    return o.tolist() if hasattr(o, "tolist") else str(o)


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/: the pyfunc imports method/ too


def log_pyfunc(
    model_dir: Path,
    *,
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> Any:
    """Log the pyfunc (weights, config, manifest, metrics, index spec) into the active run;
    return its info."""
    import yaml
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from pipeline.files import write_json_atomic
    from pipeline.retrieval.index import IndexSpec

    _, blob = load_model_file(model_dir / WEIGHTS)
    arch = blob["arch"]
    bits = int(arch["bits"])
    signature = ModelSignature(
        inputs=None,  # the width depends on the modality: see the module docstring
        outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, bits))]),
        params=ParamSchema(
            [ParamSpec("modality", "string", "image"), ParamSpec("output", "string", "codes")]
        ),
    )
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (model_dir / METRICS).write_text(
        json.dumps(metrics, indent=2, sort_keys=True, default=_json_default)
    )
    (model_dir / CONFIG).write_text(yaml.safe_dump(config or {}, sort_keys=True))
    index = IndexSpec.from_dict((config or {}).get("search_index")).to_dict()
    write_json_atomic(model_dir / INDEX, index)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=HashCodeModel(),
        artifacts={
            "weights": str(model_dir / WEIGHTS),
            "config": str(model_dir / CONFIG),
            "dataset_manifest": str(model_dir / MANIFEST),
            "metrics": str(model_dir / METRICS),
            "index": str(model_dir / INDEX),
        },
        signature=signature,
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "mlflow"],
        metadata={
            "bits": bits,
            "packed_bytes": (bits + 7) // 8,
            "image_dim": int(arch["image_dim"]),
            "text_dim": int(arch["text_dim"]),
            "num_classes": int(arch["num_classes"]),
            "outputs": list(OUTPUTS),
            "data_version": str((config or {}).get("data_version", "")),
            "search_index": index,
        },
    )
