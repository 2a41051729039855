"""MIRFlickr-25K as distributed with the common VGG features: ``LAll`` / ``YAll`` / ``XAll`` .mat
files and the published noisy-label ``.h5`` files (``True``, ``result``), in the standard protocol.

Files (rows are items, row k of every file is the same item; MATLAB v5 or v7.3):

- ``mirflickr25k-lall.mat``: ``LAll``, n × 24 multi-hot labels (n = 20015);
- ``mirflickr25k-yall.mat``: ``YAll``, n × 1386 binary tag vectors (the text modality);
- ``mirflickr25k-iall-vgg.mat``: ``XAll``, n × 4096 VGG features (the image modality). Often
  absent (e.g. only a Git LFS pointer was published); then the image modality can be *generated*
  from the real labels by :func:`feature_store.synthetic.modality_from_labels`, recorded in the
  manifest as synthetic (``source.image.real`` is false, ``source.synthetic`` names it);
- ``mirflickr25k-lall-noise_R.h5``: ``True`` (= ``LAll`` rows 2000–11999) and ``result`` (the same
  rows with noisy labels), 10000 × 24 each, for the training rows only.

Protocol (fixed contiguous row ranges of the files, 0-based, as the published code uses): query =
rows 0–1999, train = rows 2000–11999, database = rows 2000–n−1 (everything but the query; it
contains the train rows). Item ids are the row numbers, so an item keeps its id in every split.

Validation: the published protocol has none. Validation queries must not be test queries, and
carving them out of ``query`` (as ``multilabel-h5 --valid-from-query`` does) would change the
published 2000 test queries, so ``valid`` is a seeded sample (``valid_from_database`` rows, seed
``valid_seed``) of the database rows outside train (rows 12000–n−1). Those items stay in the
database, as every non-query item does in this protocol; validation MAP is therefore a little
optimistic (each validation query's own pair is one of its many relevant database items) but
never sees a test query or a training item. Relevance: a query and a database item share a label.

A published noise file becomes a noisy copy by reference (see :func:`published_noise`): observed
train labels = ``result``, clean = ``True``, checked row by row against ``LAll``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.formats import file_sha256
from feature_store.matfile import MatFile
from feature_store.plan import Features, ImportPlan, SplitPlan
from feature_store.synthetic import modality_from_labels

QUERY_ROWS = 2000
TRAIN_ROWS = 10000
VALID_FROM_DATABASE = 2000
VALID_SEED = 0
SYNTHETIC = "synthetic"
SYNTHETIC_IMAGE_DIM = 4096  # the width of the VGG features it stands in for
SYNTHETIC_DIFFICULTY = 0.5
SYNTHETIC_SEED = 0
NOISE_VARS = ("True", "result")

# The published noise files (GitHub LonganWANG-cs/NRCH, commit c2ec2e85, noise/), by sha256.
KNOWN_NOISE_FILES = {
    "9b45b5beb112be3e68054c6b428d4aec32a33881f5a33917a60ff9fc7eaf9e4a": "0.2",
    "9d00abebf089f8a59d7dad71ebfe85aaa9aaffeb2ab2a61fb31979af91ba6598": "0.5",
    "b2b9626c71b17400ac9c40e74a886c35ea6421f61927dbbd4d94b7b4ac6fb4b0": "0.8",
}
NRCH = (
    "LonganWANG-cs/NRCH@c2ec2e85 noise/mirflickr25k-lall-noise_{}.h5 (Robust Contrastive "
    "Cross-modal Hashing with Noisy Labels, ACM MM 2024): int(10000 r) training items, one "
    "positive label switched off and one negative switched on each, unseeded"
)


def _binary(a: np.ndarray, where: str, what: str) -> np.ndarray:
    """A 2-D 0/1 matrix as uint8; refuses other shapes, NaN and values other than 0 and 1."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise FeatureStoreError(f"{where} has shape {a.shape}, expected items × {what}")
    bad = ~np.isfinite(a) if a.dtype.kind == "f" else np.zeros(a.shape, dtype=bool)
    bad |= (a != 0) & (a != 1)
    if bad.any():
        r, k = (int(x) for x in np.argwhere(bad)[0])
        raise FeatureStoreError(
            f"{where} row {r} column {k} is {a[r, k].item()!r}; {what} must be 0 or 1"
        )
    return a.astype(np.uint8)


def _read(path: str | Path, variable: str, layout: str) -> tuple[MatFile, Any, str]:
    """(file, the variable with items as rows, where) after checking the variable is there."""
    mf = MatFile(path, layout)
    mf.require([variable])
    return mf, mf.matrix(variable), f"'{mf.path}' variable '{variable}'"


def _file(mf: MatFile, variable: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": str(mf.path.resolve()),
        "sha256": file_sha256(mf.path),
        "variable": variable,
        "container": mf.kind,
        **extra,
    }


class _ItemRows(Features):
    """Rows ``rows`` of item-aligned modalities: ``image(rows)`` and the tag matrix."""

    def __init__(
        self,
        rows: np.ndarray,
        image: Callable[[np.ndarray], np.ndarray],
        text: np.ndarray,
        image_dim: int,
        where: dict[str, str],
    ) -> None:
        self._rows, self._image, self._text, self._where = rows, image, text, where
        self.image_dim, self.text_dim = image_dim, int(text.shape[1])
        self.num_rows = int(rows.shape[0])

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, self.num_rows, rows):
            r = self._rows[a : a + rows]
            yield self._image(r), np.asarray(self._text[r], dtype=np.float32)

    def where(self, column: str) -> str:
        return self._where.get(column, column)


def protocol_rows(
    n: int,
    *,
    query: int = QUERY_ROWS,
    train: int = TRAIN_ROWS,
    valid_from_database: int = VALID_FROM_DATABASE,
    valid_seed: int = VALID_SEED,
    where: str = "the label file",
) -> dict[str, np.ndarray]:
    """The file rows of each split: train, [valid,] query, database (see the module docstring)."""
    rest = n - query - train
    if query < 1 or train < 1 or rest < 1:
        raise FeatureStoreError(
            f"{where} has {n} rows; the protocol needs {query} query rows, {train} train rows "
            "and at least one database row outside them"
        )
    if not 0 <= valid_from_database < rest:
        raise FeatureStoreError(
            f"valid_from_database={valid_from_database} must be in [0, {rest}): {where} has "
            f"{rest} database rows outside query and train ({query + train}..{n - 1})"
        )
    out = {"train": np.arange(query, query + train, dtype=np.int64)}
    if valid_from_database:
        pool = np.arange(query + train, n, dtype=np.int64)
        pick = np.random.default_rng(valid_seed).choice(pool, valid_from_database, replace=False)
        out["valid"] = np.sort(pick)
    out["query"] = np.arange(0, query, dtype=np.int64)
    out["database"] = np.arange(query, n, dtype=np.int64)
    return out


def _image(
    image_features: str | Path,
    labels: np.ndarray,
    lwhere: str,
    *,
    synthetic_dim: int,
    synthetic_difficulty: float,
    synthetic_seed: int,
) -> tuple[Callable[[np.ndarray], np.ndarray], int, dict[str, Any], str]:
    """(rows → image features, width, the manifest's record of them, where)."""
    if str(image_features) == SYNTHETIC:
        rows, params = modality_from_labels(
            labels, dim=synthetic_dim, difficulty=synthetic_difficulty, seed=synthetic_seed
        )
        record = {
            "real": False,
            "kind": SYNTHETIC,
            "generator": "feature_store.synthetic.modality_from_labels: class-centre mixture of "
            "the item's real LAll labels + Gaussian noise, projected through tanh, plus noise",
            "params": params,
        }
        return rows, synthetic_dim, record, "synthetic image features"
    mf, x, where = _read(image_features, "XAll", "MIRFlickr image-feature")
    n = labels.shape[0]
    if len(x.shape) != 2 or x.shape[0] != n:
        raise FeatureStoreError(
            f"{where} has shape {tuple(x.shape)} but {lwhere} has {n} rows; the files must "
            "describe the same items, row by row"
        )
    if not isinstance(x, np.ndarray):  # an HDF5 (v7.3) variable: read once, it is n × 4096
        x = np.asarray(x)
    return (
        lambda r: np.asarray(x[r], dtype=np.float32),
        int(x.shape[1]),
        {"real": True, "kind": "file", **_file(mf, "XAll")},
        where,
    )


def plan_mirflickr(
    labels: str | Path,
    tags: str | Path,
    image_features: str | Path = SYNTHETIC,
    *,
    valid_from_database: int = VALID_FROM_DATABASE,
    valid_seed: int = VALID_SEED,
    synthetic_dim: int = SYNTHETIC_IMAGE_DIM,
    synthetic_difficulty: float = SYNTHETIC_DIFFICULTY,
    synthetic_seed: int = SYNTHETIC_SEED,
    query: int = QUERY_ROWS,
    train: int = TRAIN_ROWS,
) -> ImportPlan:
    """MIRFlickr-25K from ``LAll`` (labels), ``YAll`` (tags) and ``XAll`` (image features, or
    ``"synthetic"``: generated from the real labels and recorded as such), in the standard
    protocol with a seeded validation sample of the non-train database rows (module docstring).

    ``query`` and ``train`` are the protocol's row counts (2000, 10000); other values are for
    small files and are recorded.
    """
    lf, lab, lwhere = _read(labels, "LAll", "MIRFlickr label")
    lab = _binary(lab, lwhere, "labels")
    n = lab.shape[0]
    tf, txt, twhere = _read(tags, "YAll", "MIRFlickr tag")
    txt = np.asarray(txt)
    if txt.ndim != 2 or txt.shape[0] != n:
        raise FeatureStoreError(
            f"{twhere} has shape {txt.shape} but {lwhere} has {n} rows; the files must "
            "describe the same items, row by row"
        )
    txt = _binary(txt, twhere, "tags")
    image, image_dim, image_record, iwhere = _image(
        image_features,
        lab,
        lwhere,
        synthetic_dim=synthetic_dim,
        synthetic_difficulty=synthetic_difficulty,
        synthetic_seed=synthetic_seed,
    )
    rows = protocol_rows(
        n,
        query=query,
        train=train,
        valid_from_database=valid_from_database,
        valid_seed=valid_seed,
        where=lwhere,
    )
    where = {S.IMAGE: iwhere, S.TEXT: twhere}
    splits = {
        s: SplitPlan(r.copy(), lab[r], _ItemRows(r, image, txt, image_dim, where))
        for s, r in rows.items()
    }
    source = {
        "kind": "mirflickr",
        "path": str(lf.path.resolve()),
        "sha256": file_sha256(lf.path),
        "labels": _file(lf, "LAll", real=True),
        "text": {"real": True, **_file(tf, "YAll")},
        "image": image_record,
        "synthetic": [] if image_record["real"] else [S.IMAGE],
    }
    if not image_record["real"]:
        source["note"] = (
            "the image features are SYNTHETIC, generated from the real labels (see "
            "source.image); labels and tags are real; not comparable with VGG-feature results"
        )
    protocol = {
        "retrieval": "query-vs-database, cross-modal",
        "relevance": "shares at least one label",
        "label_format": "multi-hot",
        "item_id": "0-based row of LAll / YAll / XAll",
        "rows": {
            "query": [0, query],
            "train": [query, query + train],
            "database": [query, n],
        },
        "valid_from_database": valid_from_database,
        "valid_seed": valid_seed,
        "valid": f"seeded sample of rows {query + train}..{n - 1} (database, not train/query)",
    }
    return ImportPlan(splits, S.MULTI, source, protocol)


def _rate_in_name(name: str) -> str | None:
    m = re.search(r"noise_([0-9.]+?)\.h5$", name)
    return m.group(1) if m else None


def published_noise(path: str | Path, plan: ImportPlan) -> tuple[np.ndarray, dict[str, Any]]:
    """A published noisy-label file's train labels (``result``) and the noise spec to record.

    ``True`` must equal the plan's clean train labels (the label file's train rows) row for row
    and ``result`` must have its shape, hold 0/1 only and give every row a label; the spec holds
    the file's name, path and sha256, the changed share as the rate, and the flip counts.
    """
    with MatFile(path, "MIRFlickr noisy-label") as mf:
        mf.require(list(NOISE_VARS))
        true_raw, noisy_raw = mf.vector("True"), mf.vector("result")
    where = {v: f"'{mf.path}' variable '{v}'" for v in NOISE_VARS}
    clean = plan.splits["train"].clean_label
    start = int(plan.protocol["rows"]["train"][0])
    lwhere = f"'{plan.source['labels']['path']}' variable 'LAll'"
    true = _binary(true_raw, where["True"], "labels")
    if true.shape != clean.shape:
        raise FeatureStoreError(
            f"{where['True']} has shape {true.shape} but the train split is {lwhere} rows "
            f"{start}..{start + clean.shape[0] - 1}, shape {clean.shape}; the file is for "
            "another label file or another split"
        )
    diff = np.flatnonzero(np.any(true != clean, axis=1))
    if diff.size:
        r = int(diff[0])
        k = int(np.flatnonzero(true[r] != clean[r])[0])
        raise FeatureStoreError(
            f"{where['True']} row {r} differs from {lwhere} row {start + r} at class {k} "
            f"({true[r, k]} vs {clean[r, k]}; {diff.size} rows differ); the noise file is for "
            "another label file or another split"
        )
    noisy = _binary(noisy_raw, where["result"], "labels")
    if noisy.shape != true.shape:
        raise FeatureStoreError(
            f"{where['result']} has shape {noisy.shape} but {where['True']} has {true.shape}; "
            "the noisy labels must cover the same rows and classes"
        )
    empty = np.flatnonzero(noisy.sum(axis=1) == 0)
    if empty.size:
        raise FeatureStoreError(
            f"{where['result']} row {int(empty[0])} has no label; multi-label training needs "
            "at least one class per item"
        )
    return noisy, _spec(mf, true, noisy)


def _spec(mf: MatFile, true: np.ndarray, noisy: np.ndarray) -> dict[str, Any]:
    n = true.shape[0]
    changed = np.any(noisy != true, axis=1)
    off = ((true == 1) & (noisy == 0)).sum(axis=1)
    on = ((true == 0) & (noisy == 1)).sum(axis=1)
    sha = file_sha256(mf.path)
    known = KNOWN_NOISE_FILES.get(sha)
    num = int(changed.sum())
    return {
        "mode": "published",
        "rate": num / n,
        "seed": None,
        "num_corrupted": num,
        "num_noisy": num,
        "realised_rate": num / n,
        "source": {
            "kind": "published-noise",
            "file": mf.path.name,
            "path": str(mf.path.resolve()),
            "sha256": sha,
            "variables": {"clean": "True", "observed": "result"},
            "rate_in_name": _rate_in_name(mf.path.name),
            "published_as": NRCH.format(known) if known else None,
        },
        "rate_from": "share of train rows whose label vector differs from True",
        "flips": {
            "labels_off": int(off.sum()),
            "labels_on": int(on.sum()),
            "rows_one_off_one_on": int(((off == 1) & (on == 1)).sum()),
        },
    }


def published_noises(
    paths: list[str | Path], plan: ImportPlan
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """:func:`published_noise` of each file, in order (all read and checked before returning)."""
    return [published_noise(p, plan) for p in paths]
