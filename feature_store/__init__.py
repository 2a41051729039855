"""Feature store: precomputed backbone features of cross-modal datasets in versioned Parquet.

Importers (:mod:`feature_store.formats`, :mod:`feature_store.plain`, :mod:`feature_store.synthetic`)
build an :class:`~feature_store.plan.ImportPlan`; :func:`write_version` validates and writes it as
an immutable version (local or ``s3://``); :func:`write_noisy_copy` adds a version with noisy
train labels that shares the features; :func:`open_dataset` verifies and reads a version.
"""

from feature_store.errors import FeatureStoreError
from feature_store.plan import ImportPlan
from feature_store.store import (
    DatasetVersion,
    list_versions,
    open_dataset,
    write_dataset,
    write_noisy_copy,
    write_version,
)

__all__ = [
    "DatasetVersion",
    "FeatureStoreError",
    "ImportPlan",
    "list_versions",
    "open_dataset",
    "write_dataset",
    "write_noisy_copy",
    "write_version",
]
