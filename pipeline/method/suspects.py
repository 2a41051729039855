"""Noise detection of an epoch and the suspect-label report (no Ray, no MLflow).

The store's ``is_noisy`` is read here for measuring only (joined by item id after the loss); the
report itself holds what a user can act on: each training pair's observed label, its score (the
pair loss ℓ_i of the last epoch, higher = more suspect), its weight, the model's predicted class
and its rank.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store import schema as S
from feature_store.store import DatasetVersion
from pipeline.retrieval import metrics as evaluate

SUSPECTS_FILE = "suspect_labels.parquet"
REPORT_COLUMNS = ("item_id", "label", "score", "weight", "predicted", "rank")
PRECISION_AT = (10, 50, 100, 200, 500, 1000)
# noise_detection_report keys in the summary; per epoch as noise_<key> (auc: of ℓ_i vs is_noisy)
DETECTION_KEYS = (
    "auc",
    "weight_auc",
    "precision",
    "recall",
    "f1",
    "clean_mean_weight",
    "noisy_mean_weight",
    "zero_weight_share",
    "flagged_share",
)


@dataclass
class TrainReference:
    """The train split's item ids (sorted), observed labels and noise flags."""

    item_id: np.ndarray
    label: np.ndarray  # (N, K) multi-hot / one-hot
    is_noisy: np.ndarray
    single_label: bool

    @classmethod
    def load(cls, ds: DatasetVersion) -> TrainReference:
        a = ds.read_arrays("train", [S.ITEM_ID, S.LABEL, S.IS_NOISY])
        order = np.argsort(a[S.ITEM_ID], kind="stable")
        return cls(
            a[S.ITEM_ID][order],
            a[S.LABEL][order],
            a[S.IS_NOISY][order].astype(bool),
            ds.label_kind == S.SINGLE,
        )

    def rows(self, item_id: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.item_id, item_id)
        if pos.size and (pos.max() >= self.item_id.size or (self.item_id[pos] != item_id).any()):
            raise ValueError("item ids outside the train split")
        return pos


def epoch_detection(
    ref: TrainReference, item_id: np.ndarray, weight: np.ndarray, ell: np.ndarray, threshold: float
) -> tuple[dict[str, float], np.ndarray]:
    """``noise_detection_report`` of one epoch's records, and the records' noise flags."""
    noisy = ref.is_noisy[ref.rows(item_id)]
    return evaluate.noise_detection_report(weight, ell, noisy, threshold), noisy


def suspect_report(
    ref: TrainReference,
    item_id: np.ndarray,
    ell: np.ndarray,
    weight: np.ndarray,
    predicted: np.ndarray,
) -> pa.Table:
    """One row per training pair, most suspect first (score ℓ_i descending, ties by item id)."""
    ids = np.asarray(item_id, dtype=np.int64)
    score = np.asarray(ell, dtype=np.float64)
    order = np.lexsort((ids, -score))
    rows = ref.rows(ids[order])
    labels = ref.label[rows]
    if ref.single_label:
        label_col = pa.array(labels.argmax(axis=1).astype(np.int32))
    else:
        label_col = pa.array([np.flatnonzero(r).astype(np.int32).tolist() for r in labels])
    return pa.table(
        {
            "item_id": pa.array(ids[order]),
            "label": label_col,
            "score": pa.array(score[order]),
            "weight": pa.array(np.asarray(weight, dtype=np.float64)[order]),
            "predicted": pa.array(np.asarray(predicted, dtype=np.int32)[order]),
            "rank": pa.array(np.arange(1, ids.size + 1, dtype=np.int64)),
        }
    )


def precision_at(ref: TrainReference, report: pa.Table, ks: tuple[int, ...] = PRECISION_AT) -> dict:
    """Share of truly mislabeled pairs among the top-k suspects (measurement only)."""
    ids = report.column("item_id").to_numpy()
    noisy = ref.is_noisy[ref.rows(ids)]
    return {str(k): float(noisy[:k].mean()) for k in ks if k <= noisy.size}


def markdown_head(report: pa.Table, n: int = 20) -> str:
    """The top ``n`` suspects as a Markdown table (for the run page)."""
    head = report.slice(0, n).to_pylist()
    lines = [
        "| rank | item_id | label | predicted | score | weight |",
        "|---|---|---|---|---|---|",
    ]
    for r in head:
        lines.append(
            f"| {r['rank']} | {r['item_id']} | {r['label']} | {r['predicted']} | "
            f"{r['score']:.4f} | {r['weight']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: pa.Table, path: str | Path) -> Path:
    """Write the report under a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(report, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_report(path: str | Path) -> pa.Table:
    """A report written by :func:`write_report`; ``ValueError`` names a file of another shape."""
    t = pq.read_table(path)
    missing = [c for c in REPORT_COLUMNS if c not in t.column_names]
    if missing:
        raise ValueError(f"{path}: not a suspect-label report (missing columns {missing})")
    return t


def summary_of(ref: TrainReference, report: pa.Table) -> dict[str, Any]:
    return {"rows": report.num_rows, "precision_at": precision_at(ref, report)}
