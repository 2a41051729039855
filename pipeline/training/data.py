"""From the feature store to Ray Train workers: the Ray Data reader, the train split a worker may
see, its shuffle seeds, and the feature normalisation statistics."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.store import DatasetVersion

log = logging.getLogger(__name__)


def cached_in_memory(ds: DatasetVersion, cache_max_bytes: int, store_bytes: int = 0) -> bool:
    """Whether the train split is cached: at most ``cache_max_bytes`` on disk and, when the
    cluster's object store size ``store_bytes`` is known (> 0), at most half of it (the cached
    blocks and each worker's read of its shard must fit without spilling)."""
    size = ds.manifest["files"]["train.parquet"]["bytes"]
    return size <= cache_max_bytes and (store_bytes <= 0 or 2 * size <= store_bytes)


def training_dataset(ds: DatasetVersion, seed: int, workers: int, in_memory: bool):
    """The train split with only the columns a worker may see (a ``ray.data.Dataset``).

    Clean labels and the noise flag are dropped at the scan, so they never reach a worker. A
    split cached ``in_memory`` (see :func:`cached_in_memory`) is read once into the object
    store; each worker reads its shard from it once and shuffles it in memory every epoch
    (``pipeline.training.epoch.MemoryShard``). Otherwise the split is streamed every epoch with
    a seeded block order and the worker's local shuffle buffer (see ``local_shuffle_seed``).
    """
    from ray.data import RandomSeedConfig

    # read through the version's own filesystem (local or s3://, settings from the AWS
    # environment); a noisy copy's labels are joined onto the shared feature files
    rd = ray_dataset(ds, "train", S.TRAINING_COLUMNS)
    if in_memory:
        rows = ds.manifest["files"]["train.parquet"]["rows"]
        return rd.repartition(min(max(16, 8 * workers), max(1, rows // 8))).materialize()
    return rd.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def ray_dataset(
    ds: DatasetVersion, split: str, columns: list[str] | tuple[str, ...] = S.TRAINING_COLUMNS
) -> Any:
    """A ``ray.data.Dataset`` of one split's columns, read through the version's filesystem
    (local or s3://); a noisy copy's labels are joined onto the shared feature rows per block."""
    import ray.data

    scan = ds.parquet_scan(split, columns)
    rd = ray.data.read_parquet(scan.path, filesystem=scan.filesystem, columns=scan.columns)
    if scan.join is None:
        return rd
    return rd.map_batches(scan.join, batch_format="pyarrow", zero_copy_batch=True)


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible in-worker shuffle seed per (run seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 9_973 + rank) % (2**31)


def feature_normalisation(ds: DatasetVersion) -> dict[str, list[list[float]]]:
    """Per-dimension mean and scale of each modality over the train split (features only)."""
    a = ds.read_arrays("train", [S.IMAGE, S.TEXT])
    out: dict[str, list[list[float]]] = {}
    for m in (S.IMAGE, S.TEXT):
        x = a[m].astype(np.float64)
        std = x.std(axis=0)
        out[m] = [x.mean(axis=0).tolist(), np.where(std > 1e-8, std, 1.0).tolist()]
    return out
