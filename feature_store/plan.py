"""An import before it is written: labels and ids in memory, features read lazily in chunks.

Importers build an :class:`ImportPlan`. Labels and item ids are small (n × K bytes) and are read
and validated up front; feature matrices may be large, so each split holds a :class:`Features`
reader that yields aligned ``(image, text)`` row chunks on demand. The store writes one Parquet row
group per chunk, so an import never holds more than one row group of features per column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.noise import check_noise, corrupt, default_mode


class Features:
    """Row-aligned image and text features of one split, read in chunks."""

    image_dim: int
    text_dim: int
    num_rows: int

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive ``(image, text)`` blocks of at most ``rows`` rows, in row order."""
        raise NotImplementedError

    def where(self, column: str) -> str:
        """Where a column comes from (file and variable), for error messages."""
        return column

    @property
    def in_memory(self) -> bool:
        """Whether the features are already in memory (then they are checked before writing)."""
        return False

    def slice(self, start: int, stop: int) -> Features:
        """Rows ``start:stop`` of these features."""
        return _SlicedFeatures(self, start, stop)


class ArrayFeatures(Features):
    """Features backed by array-likes with ``.shape`` and row slicing (NumPy, memmap, HDF5)."""

    def __init__(self, image: Any, text: Any, *, where: dict[str, str] | None = None) -> None:
        if len(image.shape) != 2 or len(text.shape) != 2:
            raise FeatureStoreError(
                f"{(where or {}).get(S.IMAGE, 'image')}: features must be 2-D (items × dims), "
                f"got image {tuple(image.shape)} and text {tuple(text.shape)}"
            )
        if image.shape[0] != text.shape[0]:
            raise FeatureStoreError(
                f"{(where or {}).get(S.IMAGE, 'image')} has {image.shape[0]} rows but "
                f"{(where or {}).get(S.TEXT, 'text')} has {text.shape[0]}; the modalities must "
                "describe the same items, row by row"
            )
        self._image, self._text = image, text
        self._where = where or {}
        self.image_dim, self.text_dim = int(image.shape[1]), int(text.shape[1])
        self.num_rows = int(image.shape[0])
        self._start, self._stop = 0, self.num_rows

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(self._start, self._stop, rows):
            b = min(a + rows, self._stop)
            yield np.asarray(self._image[a:b]), np.asarray(self._text[a:b])

    def where(self, column: str) -> str:
        return self._where.get(column, column)

    @property
    def in_memory(self) -> bool:
        return all(
            type(a) is np.ndarray for a in (self._image, self._text)
        )  # not memmaps or HDF5 datasets, which stream

    def slice(self, start: int, stop: int) -> Features:
        out = ArrayFeatures.__new__(ArrayFeatures)
        out.__dict__.update(self.__dict__)
        out._start, out._stop = self._start + start, self._start + stop
        out.num_rows = stop - start
        return out


class _SlicedFeatures(Features):
    """Rows ``start:stop`` of a streaming reader (skips the rows before ``start``)."""

    def __init__(self, base: Features, start: int, stop: int) -> None:
        self._base, self._start, self._stop = base, start, stop
        self.image_dim, self.text_dim = base.image_dim, base.text_dim
        self.num_rows = stop - start

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pos = 0
        for img, txt in self._base.chunks(rows):
            a, b = max(self._start - pos, 0), min(self._stop - pos, len(img))
            pos += len(img)
            if a < b:
                yield img[a:b], txt[a:b]
            if pos >= self._stop:
                return

    def where(self, column: str) -> str:
        return self._base.where(column)


class GeneratedFeatures(Features):
    """Features produced by a function of (start, stop) (the synthetic generator)."""

    def __init__(
        self,
        make: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
        num_rows: int,
        image_dim: int,
        text_dim: int,
    ) -> None:
        self._make, self.num_rows = make, num_rows
        self.image_dim, self.text_dim = image_dim, text_dim

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, self.num_rows, rows):
            yield self._make(a, min(a + rows, self.num_rows))


@dataclass
class SplitPlan:
    """One split: ids and labels in memory, features lazily."""

    item_id: np.ndarray
    clean_label: np.ndarray
    features: Features
    label: np.ndarray | None = None  # observed labels; the clean ones unless noise was applied

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    @property
    def observed(self) -> np.ndarray:
        return self.clean_label if self.label is None else self.label

    def rows(self, start: int, stop: int) -> SplitPlan:
        """Rows ``start:stop`` (used to carve a validation split out of another split)."""
        return SplitPlan(
            item_id=self.item_id[start:stop],
            clean_label=self.clean_label[start:stop],
            features=self.features.slice(start, stop),
            label=None if self.label is None else self.label[start:stop],
        )


@dataclass
class ImportPlan:
    """Everything an importer read, ready to be validated and written as a version."""

    splits: dict[str, SplitPlan]
    label_kind: str
    source: dict[str, Any]
    protocol: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    noise: dict[str, Any] = field(
        default_factory=lambda: {"mode": "none", "rate": 0.0, "seed": 0, "num_noisy": 0}
    )

    @property
    def num_classes(self) -> int:
        return int(next(iter(self.splits.values())).clean_label.shape[1])

    @property
    def dims(self) -> dict[str, int]:
        f = self.splits["train"].features
        return {"image": int(f.image_dim), "text": int(f.text_dim)}

    @property
    def label(self) -> str:
        """A short name of the input for error messages."""
        src = self.source
        return str(src.get("path") or src.get("paths") or src.get("kind") or "input")

    def validate(self) -> None:
        """Check split names, labels, ids and feature widths; raise before anything is written."""
        where = self.label
        S.check_split_names(self.splits, self.label_kind, where)
        k = self.num_classes
        dims = self.dims
        for name, sp in self.splits.items():
            S.check_labels(
                name,
                sp.item_id,
                {S.LABEL: sp.observed, S.CLEAN_LABEL: sp.clean_label},
                label_kind=self.label_kind,
                num_classes=k,
                source=where,
            )
            f = sp.features
            if f.num_rows != len(sp):
                raise FeatureStoreError(
                    f"{where}: split '{name}' has {len(sp)} labels but {f.num_rows} feature rows "
                    f"({f.where(S.IMAGE)}); every item needs both"
                )
            for col, d in ((S.IMAGE, f.image_dim), (S.TEXT, f.text_dim)):
                if d != dims[col]:
                    raise FeatureStoreError(
                        f"{where}: split '{name}' column '{col}' ({f.where(col)}) has width {d}, "
                        f"split 'train' has {dims[col]}; all splits need the same feature width"
                    )
            if f.in_memory:  # already loaded: check every value now, before any work
                row = 0
                for img, txt in f.chunks(65536):
                    for col, block, d in (
                        (S.IMAGE, img, dims["image"]),
                        (S.TEXT, txt, dims["text"]),
                    ):
                        S.check_features(
                            name,
                            col,
                            np.asarray(block, dtype=np.float32),
                            row_offset=row,
                            item_id=sp.item_id,
                            width=d,
                            source=f.where(col),
                        )
                    row += len(img)
        S.check_item_ids(
            {n: sp.item_id for n, sp in self.splits.items()},
            label_kind=self.label_kind,
            source=where,
        )

    def apply_noise(
        self,
        mode: str | None,
        rate: float,
        seed: int,
        *,
        flip_map: dict[int, int] | None = None,
    ) -> dict[str, Any]:
        """Corrupt the train split's observed labels (seeded); record and return the spec."""
        mode = mode or default_mode(self.label_kind)
        check_noise(
            mode, rate, label_kind=self.label_kind, num_classes=self.num_classes, flip_map=flip_map
        )
        train = self.splits["train"]
        train.label, self.noise = corrupt(
            train.clean_label, mode, rate, seed, label_kind=self.label_kind, flip_map=flip_map
        )
        return self.noise

    def to_arrays(self) -> dict[str, S.SplitArrays]:
        """Materialise every split in memory (small data sets and tests)."""
        out = {}
        for name, sp in self.splits.items():
            parts = list(sp.features.chunks(max(len(sp), 1)))
            img = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 0))
            txt = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 0))
            out[name] = S.make_split(sp.item_id, img, txt, sp.clean_label, sp.observed)
        return out

    @classmethod
    def from_arrays(
        cls,
        splits: dict[str, S.SplitArrays],
        *,
        label_kind: str,
        source: dict[str, Any],
        protocol: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        noise: dict[str, Any] | None = None,
    ) -> ImportPlan:
        """A plan over in-memory splits whose observed labels are already final."""
        plans = {
            name: SplitPlan(
                item_id=np.asarray(sp.item_id, dtype=np.int64),
                clean_label=np.asarray(sp.clean_label),
                label=np.asarray(sp.label),
                features=ArrayFeatures(sp.image, sp.text),
            )
            for name, sp in splits.items()
        }
        plan = cls(plans, label_kind, source, protocol or {}, class_names)
        if noise is not None:
            plan.noise = noise
        return plan


def carve(plan: ImportPlan, *, into: str, source_split: str, count: int, option: str) -> None:
    """Move the first ``count`` rows of ``source_split`` into a new split ``into`` (recorded)."""
    sp = plan.splits[source_split]
    if not 0 < count < len(sp):
        raise FeatureStoreError(
            f"{plan.label}: {option}={count} must be in (0, {len(sp)}): the {source_split} split "
            f"has {len(sp)} items and both parts need rows"
        )
    carved, rest = sp.rows(0, count), sp.rows(count, len(sp))
    ordered: dict[str, SplitPlan] = {}
    for name, value in plan.splits.items():
        if name == source_split:
            ordered[into] = carved
            ordered[name] = rest
        else:
            ordered[name] = value
    plan.splits = ordered
    plan.protocol[option] = count
