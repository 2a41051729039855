"""Versioned datasets in a local directory or under ``s3://bucket/prefix``: the store's API.

Layout: ``STORE/NAME/vN/`` holds one Parquet file per split (``train.parquet``, ``valid.parquet``,
``test.parquet`` for single-label sets; ``train``/``query``/``database`` (+ ``valid``) for
multi-label sets; see :mod:`feature_store.schema`) and ``manifest.json``. The manifest records the
schema, dims, classes, label kind, ordered splits and per-split counts, the noise spec and seed,
the import protocol (e.g. the validation carve-out), the source file's checksum, and every file's
SHA-256, size and row count. :func:`open_dataset` verifies the files against it before any work.

The work is split by what it does: :mod:`feature_store.staging` (target check, temporary
directory or S3 claim, commit), :mod:`feature_store.writing` (imports, noisy and cleaned copies),
:mod:`feature_store.reading` (manifests, :class:`DatasetVersion`, label overlays joined by item id)
and :mod:`feature_store.inventory` (listing and garbage collection).
"""

from __future__ import annotations

from feature_store.inventory import (
    DEFAULT_GC_HOURS,
    StoreScan,
    collect_garbage,
    list_versions,
    scan_store,
)
from feature_store.reading import DatasetVersion, ParquetScan, manifest_problem, open_dataset
from feature_store.staging import FORMAT, MANIFEST, READABLE_FORMATS, check_target
from feature_store.writing import (
    row_group_rows,
    write_cleaned_copy,
    write_dataset,
    write_label_copy,
    write_noisy_copy,
    write_version,
)

__all__ = [
    "DEFAULT_GC_HOURS",
    "FORMAT",
    "MANIFEST",
    "READABLE_FORMATS",
    "DatasetVersion",
    "ParquetScan",
    "StoreScan",
    "check_target",
    "collect_garbage",
    "list_versions",
    "manifest_problem",
    "open_dataset",
    "row_group_rows",
    "scan_store",
    "write_cleaned_copy",
    "write_dataset",
    "write_label_copy",
    "write_noisy_copy",
    "write_version",
]
