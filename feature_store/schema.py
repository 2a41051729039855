"""The one Parquet schema of a cross-modal dataset, split conventions, and input validation.

Every row of every split has the same columns:

- ``item_id`` (int64): stable id of the image–text pair, unique within a split;
- ``split`` (string): the split the row belongs to;
- ``image`` / ``text``: fixed-size float32 feature vectors (backbone features);
- ``label``: the observed, possibly noisy, multi-hot uint8 label vector of K classes;
- ``clean_label``: the label vector before noise injection (measurement only);
- ``is_noisy``: whether ``label`` differs from ``clean_label`` (measurement only).

Single-label data sets (Wikipedia, XMedia, INRIA-Websearch, XMediaNet) store a one-hot vector and
have the splits ``train`` / ``valid`` / ``test``; retrieval is test-vs-test. Multi-label data sets
(MIRFlickr-25K, NUS-WIDE, MS-COCO, IAPR TC-12) store multi-hot vectors (at least one class per row)
and have the splits ``train`` / ``query`` / ``database``, plus an optional ``valid`` split (carved
out of the query set, or drawn from the database rows outside train as the MIRFlickr importer does;
a recorded import option); retrieval is query-vs-database, and the same item may appear in
``train`` and ``database`` (the usual protocol samples the training set from the database) and in
``valid`` and ``database`` (every item outside the test queries is in the database, so validation
queries that are not test queries come from it), so item ids may repeat across exactly those pairs
of splits and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from feature_store.errors import FeatureStoreError

SINGLE = "single"
MULTI = "multi"
LABEL_KINDS = (SINGLE, MULTI)

SINGLE_LABEL_SPLITS = ("train", "valid", "test")
MULTI_LABEL_SPLITS = ("train", "query", "database")
SPLITS = SINGLE_LABEL_SPLITS  # the splits of a single-label set (the trainer's default protocol)

ITEM_ID = "item_id"
SPLIT = "split"
IMAGE = "image"
TEXT = "text"
LABEL = "label"  # observed (possibly noisy) multi-hot label vector
CLEAN_LABEL = "clean_label"
IS_NOISY = "is_noisy"

ALL_COLUMNS = (ITEM_ID, SPLIT, IMAGE, TEXT, LABEL, CLEAN_LABEL, IS_NOISY)
# Columns a training worker may see. Clean labels and the noise flag are for measurement only.
TRAINING_COLUMNS = (ITEM_ID, IMAGE, TEXT, LABEL)
MEASUREMENT_COLUMNS = (CLEAN_LABEL, IS_NOISY)
# Columns a label overlay (a noisy copy of a version) replaces; the rest come from the base files.
LABEL_COLUMNS = (LABEL, CLEAN_LABEL, IS_NOISY)


def required_splits(label_kind: str) -> tuple[str, ...]:
    """Splits every version of this label kind has, in their canonical order."""
    _check_kind(label_kind)
    return SINGLE_LABEL_SPLITS if label_kind == SINGLE else MULTI_LABEL_SPLITS


def allowed_splits(label_kind: str) -> tuple[str, ...]:
    """Required plus optional splits (multi-label: ``valid`` carved out of ``query``)."""
    _check_kind(label_kind)
    return SINGLE_LABEL_SPLITS if label_kind == SINGLE else ("train", "valid", "query", "database")


def may_share_ids(label_kind: str, a: str, b: str) -> bool:
    """Whether two splits may hold the same item id (multi-label: train and valid are drawn from
    the database; train and valid never share one)."""
    return label_kind == MULTI and {a, b} in ({"train", "database"}, {"valid", "database"})


def _check_kind(label_kind: str) -> None:
    if label_kind not in LABEL_KINDS:
        raise FeatureStoreError(f"label kind '{label_kind}' is not one of {list(LABEL_KINDS)}")


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


def label_schema(num_classes: int) -> pa.Schema:
    """Schema of a label overlay file: the label columns keyed by item id, in base row order."""
    return pa.schema(
        [
            pa.field(ITEM_ID, pa.int64(), nullable=False),
            pa.field(LABEL, pa.list_(pa.uint8(), num_classes), nullable=False),
            pa.field(CLEAN_LABEL, pa.list_(pa.uint8(), num_classes), nullable=False),
            pa.field(IS_NOISY, pa.bool_(), nullable=False),
        ]
    )


def vectors(a: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """(n, d) array as a fixed-size list array (zero-copy when ``a`` already has the dtype)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=dtype), a.shape[1])


def to_matrix(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list column as an (n, d) NumPy array."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    d = arr.type.list_size
    if arr.offset:
        arr = pa.concat_arrays([arr])  # materialise a sliced array so .values lines up
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), d)


def rows_table(
    split: str,
    item_id: np.ndarray,
    image: np.ndarray,
    text: np.ndarray,
    label: np.ndarray,
    clean_label: np.ndarray,
) -> pa.Table:
    """One chunk of rows in the store schema (features must already be float32)."""
    n = int(item_id.shape[0])
    return pa.Table.from_arrays(
        [
            pa.array(item_id, type=pa.int64()),
            pa.array([split] * n, type=pa.string()),
            vectors(image, pa.float32()),
            vectors(text, pa.float32()),
            vectors(label, pa.uint8()),
            vectors(clean_label, pa.uint8()),
            pa.array(np.any(label != clean_label, axis=1), type=pa.bool_()),
        ],
        schema=arrow_schema(image.shape[1], text.shape[1], label.shape[1]),
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
        """The split as an Arrow table in the store schema."""
        return rows_table(
            split,
            self.item_id,
            self.image.astype(np.float32, copy=False),
            self.text.astype(np.float32, copy=False),
            self.label.astype(np.uint8, copy=False),
            self.clean_label.astype(np.uint8, copy=False),
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


# --------------------------------------------------------------------------------------------
# Validation. Each check raises one FeatureStoreError naming source, split, column, row and
# value, and saying what to do. Labels and ids are checked before anything is written; feature
# chunks are checked as they stream past (see store.write_version), before they are committed.
# --------------------------------------------------------------------------------------------


def check_split_names(names: Iterable[str], label_kind: str, source: str) -> None:
    """Refuse missing or unknown splits for this label kind."""
    names = list(names)
    missing = [s for s in required_splits(label_kind) if s not in names]
    if missing:
        raise FeatureStoreError(
            f"{source}: missing split(s) {missing}; a {label_kind}-label dataset needs "
            f"{list(required_splits(label_kind))}"
        )
    unknown = [s for s in names if s not in allowed_splits(label_kind)]
    if unknown:
        raise FeatureStoreError(
            f"{source}: unknown split(s) {unknown}; a {label_kind}-label dataset has "
            f"{list(allowed_splits(label_kind))}"
        )


def check_labels(
    name: str,
    item_id: np.ndarray,
    labels: dict[str, np.ndarray],
    *,
    label_kind: str,
    num_classes: int,
    source: str,
) -> None:
    """Refuse empty splits, misshapen label matrices, non-0/1 entries and wrong label counts."""
    n = int(item_id.shape[0])
    if n == 0:
        raise FeatureStoreError(
            f"{source}: split '{name}' is empty; every split needs rows (check the input's "
            "split indices or the carve-out size)"
        )
    for col, a in labels.items():
        if a.ndim != 2 or a.shape != (n, num_classes):
            raise FeatureStoreError(
                f"{source}: split '{name}' column '{col}' has shape {a.shape}, expected "
                f"({n}, {num_classes}): one label vector per item id"
            )
        bad = (a != 0) & (a != 1)
        if bad.any():
            row, k = (int(v) for v in np.argwhere(bad)[0])
            raise FeatureStoreError(
                f"{source}: split '{name}' column '{col}' row {row} (item_id {int(item_id[row])})"
                f" has value {a[row, k].item()!r} at class {k}; label vectors must be 0/1"
            )
        counts = a.sum(axis=1, dtype=np.int64)
        if label_kind == SINGLE and (counts != 1).any():
            row = int(np.argwhere(counts != 1)[0][0])
            hint = (
                "an all-zero label row: give it a class or drop the row"
                if counts[row] == 0
                else "import it as a multi-label dataset (--label-kind multi) instead"
            )
            raise FeatureStoreError(
                f"{source}: split '{name}' column '{col}' row {row} (item_id "
                f"{int(item_id[row])}) has {int(counts[row])} labels; a single-label dataset "
                f"needs exactly one per row ({hint})"
            )
        if label_kind == MULTI and (counts == 0).any():
            row = int(np.argwhere(counts == 0)[0][0])
            raise FeatureStoreError(
                f"{source}: split '{name}' column '{col}' row {row} (item_id {int(item_id[row])})"
                " has no label; multi-label retrieval needs at least one class per item, drop "
                "such rows before import (the benchmarks' protocols do)"
            )


def check_item_ids(ids: dict[str, np.ndarray], *, label_kind: str, source: str) -> None:
    """Refuse duplicate item ids within a split, and across splits unless the protocol allows."""
    for name, a in ids.items():
        uniq, counts = np.unique(a, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[counts > 1][0])
            rows = np.flatnonzero(a == dup)[:2].tolist()
            raise FeatureStoreError(
                f"{source}: duplicate item_id {dup} in split '{name}' (rows {rows[0]} and "
                f"{rows[1]}); item ids must be unique, fix the id column or omit it to number "
                "rows automatically"
            )
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if may_share_ids(label_kind, a, b):
                continue
            common = np.intersect1d(ids[a], ids[b], assume_unique=True)
            if common.size:
                dup = int(common[0])
                ra, rb = (
                    int(np.flatnonzero(ids[a] == dup)[0]),
                    int(np.flatnonzero(ids[b] == dup)[0]),
                )
                raise FeatureStoreError(
                    f"{source}: duplicate item_id {dup} (in splits '{a}' row {ra} and '{b}' row "
                    f"{rb}); an item may be in only one of these splits, fix the split "
                    "assignment or the id column"
                )


def check_features(
    name: str,
    column: str,
    block: np.ndarray,
    *,
    row_offset: int,
    item_id: np.ndarray,
    width: int,
    source: str,
) -> None:
    """Refuse a feature chunk with the wrong width or a NaN/Inf (after the cast to float32)."""
    if block.ndim != 2 or block.shape[1] != width:
        raise FeatureStoreError(
            f"{source}: split '{name}' column '{column}' rows {row_offset}.. have width "
            f"{block.shape[1] if block.ndim == 2 else block.shape}, expected {width}; every "
            "vector of a column must have the same length"
        )
    bad = ~np.isfinite(block)
    if bad.any():
        r, k = (int(v) for v in np.argwhere(bad)[0])
        row = row_offset + r
        raise FeatureStoreError(
            f"{source}: split '{name}' column '{column}' has a NaN/Inf value at row {row} "
            f"(item_id {int(item_id[row])}, dimension {k}, value {block[r, k].item()!r}); clean "
            "or drop such rows before import"
        )


def validate_splits(
    splits: dict[str, SplitArrays], *, source: str, label_kind: str = SINGLE
) -> None:
    """Refuse in-memory splits that would silently poison training (all checks, no writing)."""
    check_split_names(splits, label_kind, source)
    first = next(iter(splits.values()))
    k = first.label.shape[1] if first.label.ndim == 2 else -1
    dims = {IMAGE: first.image.shape[-1], TEXT: first.text.shape[-1]}
    for name, sp in splits.items():
        check_labels(
            name,
            sp.item_id,
            {LABEL: sp.label, CLEAN_LABEL: sp.clean_label},
            label_kind=label_kind,
            num_classes=k,
            source=source,
        )
        for col in (IMAGE, TEXT):
            a = getattr(sp, col)
            if a.ndim != 2 or a.shape[0] != len(sp):
                raise FeatureStoreError(
                    f"{source}: split '{name}' column '{col}' has shape {a.shape}, "
                    f"expected ({len(sp)}, d) aligned with {len(sp)} item ids"
                )
            check_features(
                name,
                col,
                a.astype(np.float32, copy=False),
                row_offset=0,
                item_id=sp.item_id,
                width=dims[col],
                source=source,
            )
    check_item_ids(
        {n: sp.item_id for n, sp in splits.items()}, label_kind=label_kind, source=source
    )
