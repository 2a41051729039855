"""The one Parquet schema of a cross-modal dataset, and validation of arrays before writing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from feature_store.errors import FeatureStoreError

SPLITS = ("train", "valid", "test")

ITEM_ID = "item_id"
SPLIT = "split"
IMAGE = "image"
TEXT = "text"
LABEL = "label"  # observed (possibly noisy) multi-hot label vector
CLEAN_LABEL = "clean_label"
IS_NOISY = "is_noisy"

# Columns a training worker may see. Clean labels and the noise flag are for measurement only.
TRAINING_COLUMNS = (ITEM_ID, IMAGE, TEXT, LABEL)
MEASUREMENT_COLUMNS = (CLEAN_LABEL, IS_NOISY)


def arrow_schema(image_dim: int, text_dim: int, num_classes: int) -> pa.Schema:
    """Arrow schema with fixed-size vector columns."""
    return pa.schema(
        [
            pa.field(ITEM_ID, pa.int64(), nullable=False),
            pa.field(SPLIT, pa.string(), nullable=False),
            pa.field(IMAGE, pa.list_(pa.float32(), image_dim), nullable=False),
            pa.field(TEXT, pa.list_(pa.float32(), text_dim), nullable=False),
            pa.field(LABEL, pa.list_(pa.uint8(), num_classes), nullable=False),
            pa.field(CLEAN_LABEL, pa.list_(pa.uint8(), num_classes), nullable=False),
            pa.field(IS_NOISY, pa.bool_(), nullable=False),
        ]
    )


@dataclass
class SplitArrays:
    """In-memory arrays of one split, rows aligned."""

    item_id: np.ndarray  # (n,) int64
    image: np.ndarray  # (n, d_img) float32
    text: np.ndarray  # (n, d_txt) float32
    label: np.ndarray  # (n, K) uint8 observed
    clean_label: np.ndarray  # (n, K) uint8
    is_noisy: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def to_table(self, split: str) -> pa.Table:
        n = len(self)
        schema = arrow_schema(self.image.shape[1], self.text.shape[1], self.label.shape[1])

        def vec(a: np.ndarray, t: pa.DataType) -> pa.FixedSizeListArray:
            return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=t), a.shape[1])

        return pa.Table.from_arrays(
            [
                pa.array(self.item_id, type=pa.int64()),
                pa.array([split] * n, type=pa.string()),
                vec(self.image, pa.float32()),
                vec(self.text, pa.float32()),
                vec(self.label, pa.uint8()),
                vec(self.clean_label, pa.uint8()),
                pa.array(self.is_noisy, type=pa.bool_()),
            ],
            schema=schema,
        )


def make_split(
    item_id: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    clean_label: np.ndarray,
    label: np.ndarray | None = None,
) -> SplitArrays:
    """Build a split with observed labels equal to the clean ones unless given."""
    clean = np.asarray(clean_label).astype(np.uint8)
    obs = clean.copy() if label is None else np.asarray(label).astype(np.uint8)
    return SplitArrays(
        item_id=np.asarray(item_id, dtype=np.int64),
        image=np.asarray(image, dtype=np.float32),
        text=np.asarray(text, dtype=np.float32),
        label=obs,
        clean_label=clean,
        is_noisy=np.any(obs != clean, axis=1),
    )


def validate_splits(
    splits: dict[str, SplitArrays], *, source: str, label_kind: str = "single"
) -> None:
    """Refuse data that would silently poison training; messages name source, column and row."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise FeatureStoreError(f"{source}: missing split(s) {missing}; expected {list(SPLITS)}")
    dims: dict[str, int] = {}
    seen_ids: dict[int, str] = {}
    for name, sp in splits.items():
        n = len(sp)
        if n == 0:
            raise FeatureStoreError(f"{source}: split '{name}' is empty; every split needs rows")
        for col in (IMAGE, TEXT, LABEL, CLEAN_LABEL):
            a = getattr(sp, col)
            if a.ndim != 2 or a.shape[0] != n:
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' has shape {a.shape}, "
                    f"expected ({n}, d) aligned with {n} item ids"
                )
            if col in dims and dims[col] != a.shape[1]:
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' has width {a.shape[1]}, "
                    f"other splits have {dims[col]}"
                )
            dims[col] = a.shape[1]
        for col in (IMAGE, TEXT):
            a = getattr(sp, col)
            bad = ~np.isfinite(a)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' has a NaN/Inf value at row {row} "
                    f"(item_id {int(sp.item_id[row])}); clean or drop such rows before import"
                )
        for col in (LABEL, CLEAN_LABEL):
            a = getattr(sp, col)
            if not np.isin(a, (0, 1)).all():
                row = int(np.argwhere(~np.isin(a, (0, 1)))[0][0])
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' row {row} is not a 0/1 label vector"
                )
            counts = a.sum(axis=1)
            if label_kind == "single" and (counts != 1).any():
                row = int(np.argwhere(counts != 1)[0][0])
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' row {row} (item_id "
                    f"{int(sp.item_id[row])}) has {int(counts[row])} labels; a single-label "
                    "dataset needs exactly one per row"
                )
            if label_kind == "multi" and (counts == 0).any():
                row = int(np.argwhere(counts == 0)[0][0])
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' row {row} has no label"
                )
        for i in sp.item_id.tolist():
            if i in seen_ids:
                raise FeatureStoreError(
                    f"{source}: duplicate item_id {i} (in splits '{seen_ids[i]}' and '{name}')"
                )
            seen_ids[i] = name
