"""The evaluation protocol: which split is the query set and which the database, for validation
and for test, and MAP / PR curves of an encoder on it. The one place that decides the splits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion

log = logging.getLogger(__name__)


def eval_splits(ds: DatasetVersion, stage: str = "test") -> tuple[str, str | None]:
    """(query split, database split) of ``stage``; database None means the split against itself.

    Single-label: ``stage`` against itself. Multi-label: ``query`` (for validation ``valid`` when
    the data has one, else ``query`` with a warning) against ``database``.
    """
    if ds.label_kind == S.SINGLE:
        return stage, None
    if stage == "valid" and "valid" in ds.splits:
        return "valid", "database"
    if stage == "valid":
        log.warning("%s has no validation split: model selection uses the query split", ds.uri)
    return "query", "database"


@dataclass
class EvalSplit:
    """Features and labels of an evaluation split, held in memory on the evaluating process."""

    image: np.ndarray
    text: np.ndarray
    label: np.ndarray

    @classmethod
    def load(cls, ds: DatasetVersion, split: str) -> EvalSplit:
        a = ds.read_arrays(split, [S.IMAGE, S.TEXT, S.LABEL])
        return cls(a[S.IMAGE].astype(np.float32), a[S.TEXT].astype(np.float32), a[S.LABEL])


@dataclass
class EvalProtocol:
    """What "validation MAP" and "test MAP" mean for a dataset.

    Single-label: the split against itself (valid, test). Multi-label: queries against the
    database; validation queries come from the ``valid`` split when the data has one, otherwise
    from ``query`` (then model selection sees the test queries; a warning says so).
    """

    query: EvalSplit
    database: EvalSplit | None  # None: set-vs-itself
    top_k: int | None = None

    @classmethod
    def load(cls, ds: DatasetVersion, stage: str, top_k: int = 0) -> EvalProtocol:
        """The protocol of ``stage`` (``"valid"`` or ``"test"``), its splits read into memory."""
        query, database = eval_splits(ds, stage)
        return cls(
            EvalSplit.load(ds, query),
            None if database is None else EvalSplit.load(ds, database),
            top_k or None,
        )

    def encode(self, encode_fn: Callable[[np.ndarray, str], np.ndarray]) -> tuple[Any, Any]:
        """(query, database) as (image codes, text codes, labels), each split encoded once.

        Set-vs-itself is the query set serving as its own database.
        """
        q = self.query
        query = (encode_fn(q.image, "image"), encode_fn(q.text, "text"), q.label)
        if self.database is None:
            return query, query
        d = self.database
        return query, (encode_fn(d.image, "image"), encode_fn(d.text, "text"), d.label)

    def evaluate(self, encode_fn: Callable[[np.ndarray, str], np.ndarray]) -> dict[str, float]:
        """MAP (I2T, T2I, mean; MAP@k keys with ``top_k``) with ``encode_fn(x, modality)``."""
        return self.map_of(self.encode(encode_fn))

    def map_of(self, codes: tuple[Any, Any]) -> dict[str, float]:
        from pipeline.retrieval import metrics as E

        return E.query_database_map(*codes, top_k=self.top_k)

    def pr_curves_of(self, codes: tuple[Any, Any]) -> dict[str, Any]:
        """PR curves by Hamming radius, ``{"i2t": ..., "t2i": ...}``."""
        from pipeline.retrieval import metrics as E

        (qi, qt, ql), (di, dt, dl) = codes
        return {
            "i2t": E.precision_recall_curve(qi, dt, ql, dl),
            "t2i": E.precision_recall_curve(qt, di, ql, dl),
        }
