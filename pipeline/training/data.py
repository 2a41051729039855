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
    cluster's object store size ``store_bytes`` is known (> 0), at most a quarter of it. Caching
    briefly holds two copies (the read and its repartition) beside the workers' reads; a split
    of half the store spilled 0.8 GB doing so (docs/results/scale/streaming.md)."""
    size = ds.manifest["files"]["train.parquet"]["bytes"]
    return size <= cache_max_bytes and (store_bytes <= 0 or 4 * size <= store_bytes)


def training_dataset(ds: DatasetVersion, seed: int, workers: int, in_memory: bool):
    """The train split with only the columns a worker may see (a ``ray.data.Dataset``).

    Clean labels and the noise flag are dropped at the scan, so they never reach a worker. A
    split cached ``in_memory`` (see :func:`cached_in_memory`) is read once into the object
    store; each worker reads its shard from it once and shuffles it in memory every epoch
    (``pipeline.training.epoch.MemoryShard``). Otherwise the split is streamed every epoch as
    row groups in a seeded order (:func:`streamed_row_groups`) through the worker's local shuffle
    buffer (see ``local_shuffle_seed``).
    """
    # read through the version's own filesystem (local or s3://, settings from the AWS
    # environment); a noisy copy's labels are joined onto the shared feature files
    if in_memory:
        rd = ray_dataset(ds, "train", S.TRAINING_COLUMNS)
        rows = ds.manifest["files"]["train.parquet"]["rows"]
        return rd.repartition(min(max(16, 8 * workers), max(1, rows // 8))).materialize()
    return streamed_row_groups(ds, "train", seed, readers=max(2, workers))


def streamed_row_groups(
    ds: DatasetVersion,
    split: str,
    seed: int,
    columns: tuple[str, ...] = S.TRAINING_COLUMNS,
    readers: int = 2,
) -> Any:
    """One split as a stream of its Parquet row groups, one block each, in a seeded order that
    changes every epoch, by at most ``readers`` read tasks at a time (single-threaded each, so
    that they take CPU from the training step only where the cluster has it to spare).

    Only the row-group numbers are shuffled (``randomize_block_order`` waits for all its input
    blocks; over the data itself it would hold the whole split in the object store, and spill).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from ray.data import RandomSeedConfig

    scan = ds.parquet_scan(split, columns)
    with scan.filesystem.open_input_file(scan.path) as f:
        n = pq.ParquetFile(f).metadata.num_row_groups

    def read(batch: dict[str, np.ndarray]) -> pa.Table:
        with scan.filesystem.open_input_file(scan.path) as f:
            pf = pq.ParquetFile(f)
            t = pa.concat_tables(
                [
                    pf.read_row_group(int(i), columns=scan.columns, use_threads=False)
                    for i in batch["id"]
                ]
            )
        return scan.join(t) if scan.join is not None else t

    order = ray.data.range(n, override_num_blocks=n).randomize_block_order(
        seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
    )
    return order.map_batches(read, batch_size=1, batch_format="numpy", concurrency=readers)


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
