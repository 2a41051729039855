"""Importers from the layouts public cross-modal benchmarks ship in, into the one schema."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from feature_store.errors import FeatureStoreError
from feature_store.schema import SplitArrays, make_split

WIKI_VALID_FROM_TEST = 231


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_mat(path: Path) -> dict[str, Any]:
    import scipy.io as sio

    if not path.is_file():
        raise FeatureStoreError(f"input file '{path}' does not exist")
    try:
        return sio.loadmat(str(path))
    except (ValueError, OSError, TypeError) as e:
        raise FeatureStoreError(
            f"'{path}' is not a readable MATLAB v5 .mat file ({e}); "
            "v7.3 files are HDF5 and need the HDF5 importer"
        ) from e


def read_wiki_mat(
    path: str | Path, *, valid_from_test: int = WIKI_VALID_FROM_TEST
) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """Wikipedia shallow features: struct ``data`` with X1 (d×n), X2, Y (K×n), split (1-based).

    The first ``valid_from_test`` test items become the validation split (the paper's protocol).
    Item ids are the 0-based column indices in the file.
    """
    path = Path(path)
    mat = _load_mat(path)
    if "data" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise FeatureStoreError(
            f"'{path}': no variable 'data' (found {found}); not the wiki layout"
        )
    data = mat["data"]
    try:
        d = data[0, 0]
        fields = set(d.dtype.names or ())
    except (IndexError, TypeError, AttributeError) as e:
        raise FeatureStoreError(f"'{path}': variable 'data' is not a MATLAB struct") from e
    missing = {"X1", "X2", "Y", "split"} - fields
    if missing:
        raise FeatureStoreError(f"'{path}': struct 'data' lacks field(s) {sorted(missing)}")
    split = d["split"][0, 0]
    split_fields = set(split.dtype.names or ())
    if not {"ind_train", "ind_test"} <= split_fields:
        raise FeatureStoreError(
            f"'{path}': data.split lacks {sorted({'ind_train', 'ind_test'} - split_fields)}"
        )
    X1 = np.asarray(d["X1"], dtype=np.float64).T
    X2 = np.asarray(d["X2"], dtype=np.float64).T
    Y = d["Y"]
    Y = (Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)).T
    n = X1.shape[0]
    if X2.shape[0] != n or Y.shape[0] != n:
        raise FeatureStoreError(
            f"'{path}': X1, X2 and Y have {X1.shape[0]}, {X2.shape[0]}, {Y.shape[0]} columns; "
            "they must describe the same items"
        )
    ind_train = np.asarray(split["ind_train"]).ravel().astype(np.int64) - 1
    ind_test = np.asarray(split["ind_test"]).ravel().astype(np.int64) - 1
    for nm, ind in (("ind_train", ind_train), ("ind_test", ind_test)):
        if ind.size and (ind.min() < 0 or ind.max() >= n):
            raise FeatureStoreError(f"'{path}': split.{nm} has indices outside 1..{n}")
    if not 0 < valid_from_test < ind_test.size:
        raise FeatureStoreError(
            f"valid_from_test={valid_from_test} must be in (0, {ind_test.size}) for '{path}'"
        )
    labels = (Y != 0).astype(np.uint8)

    def part(idx: np.ndarray) -> SplitArrays:
        return make_split(idx, X1[idx], X2[idx], labels[idx])

    splits = {
        "train": part(ind_train),
        "valid": part(ind_test[:valid_from_test]),
        "test": part(ind_test[valid_from_test:]),
    }
    source = {"kind": "wiki-mat", "path": str(path.resolve()), "sha256": file_sha256(path)}
    protocol = {"valid_from_test": valid_from_test, "retrieval": "test-vs-test, cross-modal"}
    return splits, {"source": source, "protocol": protocol}
