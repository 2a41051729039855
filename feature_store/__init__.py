"""Feature store: precomputed backbone features of cross-modal datasets in versioned Parquet."""

from feature_store.errors import FeatureStoreError
from feature_store.store import DatasetVersion, open_dataset, write_dataset

__all__ = ["DatasetVersion", "FeatureStoreError", "open_dataset", "write_dataset"]
