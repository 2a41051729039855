"""From the feature store to worker batches (Ray Data) and to in-memory evaluation splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion


def training_dataset(ds: DatasetVersion, seed: int, workers: int, cache_max_bytes: int):
    """The train split with only the columns a worker may see (a ``ray.data.Dataset``).

    Clean labels and the noise flag are dropped at the scan, so they never reach a worker. A
    split smaller than ``cache_max_bytes`` is read once into the object store in many small
    blocks; each epoch the block order is reshuffled (seeded), so every worker sees a different
    random subset, and the worker shuffles rows locally (see ``local_shuffle_seed``).
    """
    from ray.data import RandomSeedConfig

    # read through the version's own filesystem (local or s3://, settings from the AWS
    # environment); a noisy copy's labels are joined onto the shared feature files
    rd = ds.ray_dataset("train", S.TRAINING_COLUMNS)
    meta = ds.manifest["files"]["train.parquet"]
    if meta["bytes"] <= cache_max_bytes:
        blocks = min(max(16, 8 * workers), max(1, meta["rows"] // 8))
        rd = rd.repartition(blocks).materialize()
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


def feature_normalisation(ds: DatasetVersion) -> dict[str, list[list[float]]]:
    """Per-dimension mean and scale of each modality over the train split (features only)."""
    a = ds.read_arrays("train", [S.IMAGE, S.TEXT])
    out: dict[str, list[list[float]]] = {}
    for m in (S.IMAGE, S.TEXT):
        x = a[m].astype(np.float64)
        std = x.std(axis=0)
        out[m] = [x.mean(axis=0).tolist(), np.where(std > 1e-8, std, 1.0).tolist()]
    return out


def noise_flags(ds: DatasetVersion) -> tuple[np.ndarray, np.ndarray]:
    """(item_id, is_noisy) of the train split, for measuring noise detection outside the loss."""
    a = ds.read_arrays("train", [S.ITEM_ID, S.IS_NOISY])
    return a[S.ITEM_ID], a[S.IS_NOISY].astype(bool)
