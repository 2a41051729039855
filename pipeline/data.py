"""From the feature store to worker batches (Ray Data) and to in-memory evaluation splits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion

log = logging.getLogger(__name__)


def cached_in_memory(ds: DatasetVersion, cache_max_bytes: int) -> bool:
    """Whether the train split is small enough for each worker to hold its shard in memory."""
    return ds.manifest["files"]["train.parquet"]["bytes"] <= cache_max_bytes


def training_dataset(ds: DatasetVersion, seed: int, workers: int, cache_max_bytes: int):
    """The train split with only the columns a worker may see (a ``ray.data.Dataset``).

    Clean labels and the noise flag are dropped at the scan, so they never reach a worker. A
    split up to ``cache_max_bytes`` is read once into the object store; each worker reads its
    shard from it once and shuffles it in memory every epoch (``pipeline.epoch.MemoryShard``).
    A larger split is streamed every epoch with a seeded block order and the worker's local
    shuffle buffer (see ``local_shuffle_seed``).
    """
    from ray.data import RandomSeedConfig

    # read through the version's own filesystem (local or s3://, settings from the AWS
    # environment); a noisy copy's labels are joined onto the shared feature files
    rd = ds.ray_dataset("train", S.TRAINING_COLUMNS)
    if cached_in_memory(ds, cache_max_bytes):
        rows = ds.manifest["files"]["train.parquet"]["rows"]
        return rd.repartition(min(max(16, 8 * workers), max(1, rows // 8))).materialize()
    return rd.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible in-worker shuffle seed per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 9_973 + rank) % (2**31)


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
        if ds.label_kind == S.SINGLE:
            return cls(EvalSplit.load(ds, stage), None, top_k or None)
        name = "query"
        if stage == "valid" and "valid" in ds.splits:
            name = "valid"
        elif stage == "valid":
            log.warning("%s has no validation split: model selection uses the query split", ds.uri)
        return cls(EvalSplit.load(ds, name), EvalSplit.load(ds, "database"), top_k or None)

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
        from pipeline import evaluate as E

        return E.query_database_map(*codes, top_k=self.top_k)

    def pr_curves_of(self, codes: tuple[Any, Any]) -> dict[str, Any]:
        """PR curves by Hamming radius, ``{"i2t": ..., "t2i": ...}``."""
        from pipeline import evaluate as E

        (qi, qt, ql), (di, dt, dl) = codes
        return {
            "i2t": E.precision_recall_curve(qi, dt, ql, dl),
            "t2i": E.precision_recall_curve(qt, di, ql, dl),
        }


def feature_normalisation(ds: DatasetVersion) -> dict[str, list[list[float]]]:
    """Per-dimension mean and scale of each modality over the train split (features only)."""
    a = ds.read_arrays("train", [S.IMAGE, S.TEXT])
    out: dict[str, list[list[float]]] = {}
    for m in (S.IMAGE, S.TEXT):
        x = a[m].astype(np.float64)
        std = x.std(axis=0)
        out[m] = [x.mean(axis=0).tolist(), np.where(std > 1e-8, std, 1.0).tolist()]
    return out
