"""Features a user brings as Parquet, CSV or NumPy files, mapped onto the schema by column name.

Inputs are ``FILE`` (its ``--split-col`` says which split each row is in) or ``SPLIT=FILE`` (one
file per split); formats follow the extension: ``.parquet``/``.pq``, ``.csv``/``.tsv``, ``.npz``,
or a directory of ``COLUMN.npy`` files (memory-mapped). Feature columns (``--image-col``,
``--text-col``) may be

- a list / fixed-size list column (Parquet), or a 2-D array (NumPy);
- a text column holding the numbers of one vector (CSV), separated by spaces, commas or
  semicolons, optionally in brackets: ``"0.1 0.2 0.3"`` or ``"[0.1, 0.2, 0.3]"``;
- a glob over scalar columns in file order, e.g. ``--image-col 'img_*'`` for ``img_0 .. img_511``.

The label column (``--label-col``) holds a class number per row (``--label-format index``; the
default for scalar columns), a 0/1 vector (``multi-hot``; the default for list and text
columns), or a list of class numbers (``indices``). ``--label-kind auto`` makes a dataset
multi-label when some row has more than one class. Without ``--id-col`` items are numbered in
input order. Parquet and CSV features stream in batches; labels, ids and splits are read first.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.formats import (
    _as_indices,
    file_sha256,
    infer_num_classes,
    one_hot,
    resolve_label_base,
)
from feature_store.plan import Features, ImportPlan, SplitPlan, carve

log = logging.getLogger(__name__)

LABEL_FORMATS = ("auto", "index", "multi-hot", "indices")
_SEPARATORS = r"[\s,;]+"


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


class _Source:
    """One input file: column names, whole small columns, and batches of feature columns."""

    path: Path
    columns: list[str]
    num_rows: int

    def read(self, cols: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def batches(self, cols: list[str], rows: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def find(self, spec: str, flag: str) -> list[str]:
        """Column names matching a name or glob; one clear error when none does."""
        if _is_glob(spec):
            found = [c for c in self.columns if fnmatch.fnmatchcase(c, spec)]
        else:
            found = [spec] if spec in self.columns else []
        if not found:
            raise FeatureStoreError(
                f"'{self.path}' has no column matching '{spec}' (columns: {self.columns[:20]}"
                f"{' ...' if len(self.columns) > 20 else ''}); pass the right {flag}"
            )
        return found


class _ParquetSource(_Source):
    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._pf = pq.ParquetFile(str(path))
        except (pa.ArrowException, OSError) as e:
            raise FeatureStoreError(f"'{path}' is not a readable Parquet file ({e})") from e
        self.columns = list(self._pf.schema_arrow.names)
        self.num_rows = int(self._pf.metadata.num_rows)

    def read(self, cols: list[str]) -> dict[str, Any]:
        t = self._pf.read(columns=cols)
        return {c: t.column(c).combine_chunks() for c in cols}

    def batches(self, cols: list[str], rows: int) -> Iterator[dict[str, Any]]:
        for b in self._pf.iter_batches(batch_size=rows, columns=cols):
            yield {c: b.column(c) for c in cols}


class _CsvSource(_Source):
    def __init__(self, path: Path) -> None:
        import pyarrow.csv as pacsv

        self.path = path
        self._delim = "\t" if path.suffix.lower() == ".tsv" else ","
        self._types: dict[str, pa.DataType] = {}
        try:
            reader = pacsv.open_csv(
                str(path), parse_options=pacsv.ParseOptions(delimiter=self._delim)
            )
            self.columns = list(reader.schema.names)
        except (pa.ArrowException, OSError) as e:
            raise FeatureStoreError(f"'{path}' is not a readable CSV file ({e})") from e
        self.num_rows = -1

    def set_types(self, types: dict[str, pa.DataType]) -> None:
        """Fix column types so later blocks parse like the first (vectors stay text)."""
        self._types = types

    def _options(self, cols: list[str]) -> tuple[Any, Any]:
        import pyarrow.csv as pacsv

        conv = pacsv.ConvertOptions(
            include_columns=cols,
            column_types={c: t for c, t in self._types.items() if c in cols},
            strings_can_be_null=False,
        )
        return pacsv.ParseOptions(delimiter=self._delim), conv

    def read(self, cols: list[str]) -> dict[str, Any]:
        import pyarrow.csv as pacsv

        parse, conv = self._options(cols)
        try:
            t = pacsv.read_csv(str(self.path), parse_options=parse, convert_options=conv)
        except pa.ArrowInvalid as e:
            raise FeatureStoreError(f"'{self.path}': {e}; fix the file") from e
        self.num_rows = t.num_rows
        return {c: t.column(c).combine_chunks() for c in cols}

    def batches(self, cols: list[str], rows: int) -> Iterator[dict[str, Any]]:
        import pyarrow.csv as pacsv

        parse, conv = self._options(cols)
        read = pacsv.ReadOptions(block_size=1 << 24)
        reader = pacsv.open_csv(
            str(self.path), read_options=read, parse_options=parse, convert_options=conv
        )
        while True:
            try:
                b = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as e:
                raise FeatureStoreError(f"'{self.path}': {e}; fix the file") from e
            for a in range(0, b.num_rows, rows):
                s = b.slice(a, rows)
                yield {c: s.column(c) for c in cols}


class _ArraySource(_Source):
    """A .npz file (in memory) or a directory of COLUMN.npy files (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.is_dir():
                self._arrays = {
                    p.stem: np.load(p, mmap_mode="r", allow_pickle=False)
                    for p in sorted(path.glob("*.npy"))
                }
                if not self._arrays:
                    raise FeatureStoreError(f"directory '{path}' holds no COLUMN.npy files")
            else:
                with np.load(path, allow_pickle=False) as z:
                    self._arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise FeatureStoreError(f"'{path}' is not a readable NumPy file ({e})") from e
        self.columns = list(self._arrays)
        lengths = {k: int(v.shape[0]) if v.ndim else -1 for k, v in self._arrays.items()}
        self.num_rows = max(lengths.values(), default=0)

    def find(self, spec: str, flag: str) -> list[str]:
        if _is_glob(spec):
            raise FeatureStoreError(
                f"'{self.path}': column globs are for Parquet/CSV; store '{spec}' as one 2-D array"
            )
        return super().find(spec, flag)

    def array(self, col: str) -> np.ndarray:
        a = self._arrays[col]
        if a.ndim == 0 or a.shape[0] != self.num_rows:
            raise FeatureStoreError(
                f"'{self.path}' array '{col}' has shape {a.shape}, expected {self.num_rows} rows "
                "like the other arrays"
            )
        return a

    def read(self, cols: list[str]) -> dict[str, Any]:
        return {c: np.asarray(self.array(c)) for c in cols}

    def batches(self, cols: list[str], rows: int) -> Iterator[dict[str, Any]]:
        for a in range(0, self.num_rows, rows):
            yield {c: self.array(c)[a : a + rows] for c in cols}


def _open(path: Path) -> _Source:
    if not path.exists():
        raise FeatureStoreError(f"input file '{path}' does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".npz":
        return _ArraySource(path)
    if suffix in (".parquet", ".pq"):
        return _ParquetSource(path)
    if suffix in (".csv", ".tsv"):
        return _CsvSource(path)
    raise FeatureStoreError(
        f"'{path}': unknown format '{suffix}'; use .parquet, .csv/.tsv, .npz or a directory of "
        ".npy files"
    )


# ------------------------------------------------------------------------------------------
# Arrow/NumPy columns → matrices, with one clear error naming file, column and row
# ------------------------------------------------------------------------------------------


def _text_lists(arr: pa.Array) -> pa.Array:
    """A text column of numbers ("0.1 0.2", "[1, 2]") as a list<string> column."""
    trimmed = pc.utf8_trim(arr, characters=" \t[]()")
    return pc.split_pattern_regex(trimmed, _SEPARATORS)


def _list_matrix(
    arr: pa.Array, *, where: str, row0: int, width: int | None, kind: str = "vector"
) -> np.ndarray:
    """A list column (or text of numbers) as an (n, width) float64 matrix."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        row = row0 + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise FeatureStoreError(
            f"{where} row {row} is missing (null); every item needs a {kind}, drop or fill the row"
        )
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = _text_lists(arr)
    if not (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        raise FeatureStoreError(
            f"{where} has type {arr.type}; a {kind} column must be a list of numbers, text of "
            "numbers, or a glob over scalar columns"
        )
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    w = int(lengths[0]) if width is None and len(lengths) else width
    off = np.flatnonzero(lengths != w)
    if off.size:
        row = int(off[0])
        raise FeatureStoreError(
            f"{where} row {row0 + row} has {int(lengths[row])} values, expected {w} like the "
            f"other rows; every {kind} of a column must have the same length"
        )
    values = pc.list_flatten(arr)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            values = pc.cast(values, pa.float64())
        except pa.ArrowInvalid:
            strings = values.to_pylist()
            for i, tok in enumerate(strings):
                try:
                    float(tok)
                except ValueError:
                    row = row0 + i // max(w or 1, 1)
                    raise FeatureStoreError(
                        f"{where} row {row} holds '{tok}', not a number; a {kind} must be "
                        "numbers separated by spaces, commas or semicolons"
                    ) from None
            raise
    if values.null_count:
        i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise FeatureStoreError(
            f"{where} row {row0 + i // max(w or 1, 1)} has a missing (null) value; fill or drop it"
        )
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return flat.reshape(len(arr), w or 0)


def _scalar_matrix(cols: list[Any], *, where: str, row0: int) -> np.ndarray:
    out = []
    for c in cols:
        if isinstance(c, pa.ChunkedArray):
            c = c.combine_chunks()
        if c.null_count:
            row = row0 + int(np.flatnonzero(c.is_null().to_numpy(zero_copy_only=False))[0])
            raise FeatureStoreError(
                f"{where} row {row} has a missing (null) value; fill or drop it"
            )
        if not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)):
            raise FeatureStoreError(f"{where} has a non-numeric column of type {c.type}")
        out.append(c.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
    return np.column_stack(out)


def _matrix(batch: dict[str, Any], names: list[str], *, where: str, row0: int, width: int | None):
    if len(names) > 1:
        return _scalar_matrix([batch[c] for c in names], where=where, row0=row0)
    a = batch[names[0]]
    if isinstance(a, np.ndarray):
        return a if a.ndim == 2 else a.reshape(a.shape[0], -1)
    return _list_matrix(a, where=where, row0=row0, width=width)


class _TableFeatures(Features):
    """Feature rows of one split, streamed from a file (optionally a subset of its rows)."""

    def __init__(
        self,
        src: _Source,
        image: list[str],
        text: list[str],
        rows: np.ndarray | None,
        dims: tuple[int, int],
        where: dict[str, str],
    ) -> None:
        self._src, self._cols = src, {S.IMAGE: image, S.TEXT: text}
        self._rows = rows  # sorted global row numbers of this split; None = every row
        self.num_rows = src.num_rows if rows is None else int(rows.shape[0])
        self.image_dim, self.text_dim = dims
        self._where = where

    def where(self, column: str) -> str:
        return self._where[column]

    def chunks(self, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cols = self._cols[S.IMAGE] + [c for c in self._cols[S.TEXT] if c not in self._cols[S.IMAGE]]
        pos = 0
        for batch in self._src.batches(cols, rows):
            n = len(next(iter(batch.values())))
            if self._rows is not None:
                lo, hi = np.searchsorted(self._rows, [pos, pos + n])
                take = self._rows[lo:hi] - pos
                if take.size == 0:
                    pos += n
                    continue
                batch = {
                    c: (v[take] if isinstance(v, np.ndarray) else v.take(pa.array(take)))
                    for c, v in batch.items()
                }
                row0 = int(lo)
            else:
                row0 = pos
            w = self._where
            img = _matrix(
                batch, self._cols[S.IMAGE], where=w[S.IMAGE], row0=row0, width=self.image_dim
            )
            txt = _matrix(
                batch, self._cols[S.TEXT], where=w[S.TEXT], row0=row0, width=self.text_dim
            )
            pos += n
            yield img, txt


def _width(src: _Source, names: list[str], where: str) -> int:
    """A feature column's width, from the schema or the first row."""
    if len(names) > 1:
        return len(names)
    if isinstance(src, _ArraySource):
        a = src.array(names[0])
        return int(np.prod(a.shape[1:], dtype=np.int64))
    first = next(src.batches(names, 1), None)
    if first is None:
        return 0  # an empty input: reported as an empty split
    return int(_matrix(first, names, where=where, row0=0, width=None).shape[1])


def _index_lists(col: Any, where: str) -> list[np.ndarray]:
    """A list column, or text like "3 7 12", as one array of class numbers per row."""
    out = []
    for r, v in enumerate(col.to_pylist()):
        tokens = re.split(_SEPARATORS, v.strip(" \t[]()")) if isinstance(v, str) else v
        try:
            out.append(np.array([float(t) for t in tokens if t != ""], dtype=np.float64))
        except (TypeError, ValueError):
            raise FeatureStoreError(
                f'{where} row {r} holds {v!r}, not a list of class numbers; write e.g. "3 7 12"'
            ) from None
    return [_as_indices(a, f"{where} (row {r})") for r, a in enumerate(out)]


def _labels(col: Any, *, fmt: str, where: str) -> tuple[str, Any]:
    """('index', int array) | ('multi-hot', (n, K) array) | ('indices', list of int arrays)."""
    if isinstance(col, np.ndarray):
        if fmt in ("auto", "index") and (col.ndim == 1 or col.shape[1:] == (1,)):
            return "index", _as_indices(col, where)
        if fmt in ("auto", "multi-hot") and col.ndim == 2:
            return "multi-hot", col
        raise FeatureStoreError(
            f"{where} has shape {col.shape}, which does not fit --label-format {fmt}"
        )
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise FeatureStoreError(f"{where} row {row} has no label (null); label it or drop the row")
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        if fmt not in ("auto", "index"):
            raise FeatureStoreError(
                f"{where} holds one number per row; use --label-format index (or auto)"
            )
        return "index", _as_indices(col.to_numpy(zero_copy_only=False), where)
    if fmt == "indices":
        return "indices", _index_lists(col, where)
    if fmt == "index":
        lists = _index_lists(col, where)
        lengths = np.array([a.size for a in lists])
        if (lengths != 1).any():
            row = int(np.flatnonzero(lengths != 1)[0])
            raise FeatureStoreError(
                f"{where} row {row} holds {int(lengths[row])} values, expected one class number; "
                "use --label-format indices or multi-hot for multi-label data"
            )
        return "index", np.array([int(a[0]) for a in lists], dtype=np.int64)
    return "multi-hot", _list_matrix(col, where=where, row0=0, width=None, kind="label vector")


def _to_multi_hot(kind: str, raw: Any, *, base: int, k: int, where: str) -> np.ndarray:
    if kind == "index":
        return one_hot(raw, base=base, num_classes=k, where=where)
    if kind == "indices":
        out = np.zeros((len(raw), k), dtype=np.uint8)
        for r, idx in enumerate(raw):
            if idx.size:
                z = idx - base
                if (z < 0).any() or (z >= k).any():
                    bad = int(idx[(z < 0) | (z >= k)][0])
                    raise FeatureStoreError(
                        f"{where} row {r} has label {bad}, outside [{base}, {base + k - 1}] "
                        f"(label base {base}, {k} classes); fix the label or pass the right "
                        "--num-classes / --label-base"
                    )
                out[r, z] = 1
        return out
    m = np.asarray(raw)
    if m.shape[1] != k:
        raise FeatureStoreError(
            f"{where} has {m.shape[1]} classes per row, expected {k}; fix --num-classes"
        )
    bad = (m != 0) & (m != 1)
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise FeatureStoreError(
            f"{where} row {r} has value {m[r, c].item()!r} at class {c}; a multi-hot label "
            "vector holds only 0 and 1 (use --label-format indices for lists of class numbers)"
        )
    return m.astype(np.uint8)


def plan_plain(
    inputs: list[str],
    *,
    image_col: str = "image",
    text_col: str = "text",
    label_col: str = "label",
    id_col: str | None = None,
    split_col: str = "split",
    label_kind: str = "auto",
    label_format: str = "auto",
    num_classes: int | None = None,
    label_base: str | int = 0,
    valid_from_test: int = 0,
    valid_from_query: int = 0,
) -> ImportPlan:
    """Parquet / CSV / NumPy features: see the module docstring for columns and inputs."""
    if label_format not in LABEL_FORMATS:
        raise FeatureStoreError(f"--label-format '{label_format}' is not one of {LABEL_FORMATS}")
    if label_kind not in ("auto", *S.LABEL_KINDS):
        raise FeatureStoreError(f"--label-kind '{label_kind}' must be auto, single or multi")
    if not inputs:
        raise FeatureStoreError("no --input given; pass FILE or SPLIT=FILE")
    files: list[tuple[str | None, Path]] = []
    for spec in inputs:
        name, eq, p = spec.partition("=")
        if eq and name and "/" not in name and not Path(spec).exists():
            files.append((name, Path(p)))
        else:
            files.append((None, Path(spec)))
    if len(files) > 1 and any(s is None for s, _ in files):
        raise FeatureStoreError(
            "several --input files need a split each: write them as SPLIT=FILE (e.g. "
            "train=train.parquet test=test.parquet)"
        )

    # pass 1: ids, labels and split assignment (small columns), plus feature widths
    per_split: dict[str, list[tuple[_Source, np.ndarray | None, Any, str, np.ndarray | None]]] = {}
    feat_cols: dict[Path, tuple[list[str], list[str]]] = {}
    dims: tuple[int, int] | None = None
    kinds: set[str] = set()
    for fixed_split, path in files:
        src = _open(path)
        img = src.find(image_col, "--image-col")
        txt = src.find(text_col, "--text-col")
        lab = src.find(label_col, "--label-col")[0]
        if isinstance(src, _CsvSource):
            types: dict[str, pa.DataType] = {}
            for cols in (img, txt):
                for c in cols:
                    types[c] = pa.float64() if len(cols) > 1 else pa.string()
            if id_col:
                types[id_col] = pa.int64()
            types[split_col] = pa.string()
            types[lab] = pa.string()  # parsed below: a class number, a 0/1 vector or a list
            src.set_types(types)
        small = [lab]
        if id_col:
            small += src.find(id_col, "--id-col")
        use_split_col = fixed_split is None
        if use_split_col:
            if split_col not in src.columns:
                raise FeatureStoreError(
                    f"'{path}' has no split column '{split_col}'; pass --split-col, or give one "
                    "file per split as SPLIT=FILE"
                )
            small.append(split_col)
        cols = src.read(small)
        if isinstance(src, _CsvSource):
            src.num_rows = len(cols[lab])
        label_where = f"'{path}' column '{lab}'"
        raw_col = cols[lab]
        fmt = label_format
        if isinstance(src, _CsvSource) and label_format == "auto":
            # a CSV label column of single numbers holds class numbers, of several 0/1 vectors
            lengths = pc.list_value_length(_text_lists(raw_col)).to_numpy(zero_copy_only=False)
            fmt = "index" if lengths.size and (lengths == 1).all() else "multi-hot"
        kind, raw = _labels(raw_col, fmt=fmt, where=label_where)
        kinds.add(kind)
        ids = None
        if id_col:
            ic = cols[id_col]
            ids = _as_indices(
                ic if isinstance(ic, np.ndarray) else ic.to_numpy(zero_copy_only=False),
                f"'{path}' column '{id_col}'",
            )
        where = {
            S.IMAGE: f"'{path}' column '{image_col}'",
            S.TEXT: f"'{path}' column '{text_col}'",
        }
        d = (_width(src, img, where[S.IMAGE]), _width(src, txt, where[S.TEXT]))
        if src.num_rows == 0:
            pass  # an empty input has no widths to compare; it is refused as an empty split
        elif dims is not None and d != dims:
            raise FeatureStoreError(
                f"'{path}' has feature widths image {d[0]}, text {d[1]}; the other inputs have "
                f"{dims[0]}, {dims[1]}"
            )
        else:
            dims = d
        feat_cols[path] = (img, txt)
        if use_split_col:
            sc = cols[split_col]
            names = np.asarray(sc if isinstance(sc, np.ndarray) else sc.to_pylist(), dtype=object)
            for value in dict.fromkeys(names.tolist()):
                rows = np.flatnonzero(names == value)
                per_split.setdefault(str(value), []).append((src, rows, raw, label_where, ids))
        else:
            per_split.setdefault(str(fixed_split), []).append((src, None, raw, label_where, ids))
    if len(kinds) > 1:
        raise FeatureStoreError(
            f"the inputs' label columns differ in format ({sorted(kinds)}); use one format"
        )
    if not per_split:
        raise FeatureStoreError(
            f"{', '.join(repr(str(p)) for _, p in files)} has no data rows (only a header?); "
            "an import needs items"
        )
    kind = kinds.pop()

    # the label space
    if kind == "multi-hot":
        widths = {np.asarray(r).shape[1] for parts in per_split.values() for _, _, r, _, _ in parts}
        if len(widths) > 1:
            raise FeatureStoreError(f"label vectors have different lengths {sorted(widths)}")
        k = num_classes or widths.pop()
        base = 0
    else:
        flat = [
            (r if kind == "index" else np.concatenate([*r, np.zeros(0, np.int64)]))
            for parts in per_split.values()
            for _, _, r, _, _ in parts
        ]
        base = resolve_label_base(flat, label_base)
        labelled = {id(r): (w, r) for parts in per_split.values() for _, _, r, w, _ in parts}
        k = num_classes or infer_num_classes(list(labelled.values()), base)

    # assemble splits
    splits: dict[str, SplitPlan] = {}
    next_id = 0
    for name, parts in per_split.items():
        if len(parts) > 1:
            raise FeatureStoreError(f"split '{name}' is given by more than one input file")
        src, rows, raw, where, ids = parts[0]
        if rows is not None:
            raw = raw[rows] if kind != "indices" else [raw[i] for i in rows]
            ids = None if ids is None else ids[rows]
        labels = _to_multi_hot(kind, raw, base=base, k=k, where=where)
        n = labels.shape[0]
        if ids is None:
            if rows is not None:
                ids = (rows + next_id).astype(np.int64)
            else:
                ids = np.arange(next_id, next_id + n, dtype=np.int64)
        img, txt = feat_cols[src.path]
        feats = _TableFeatures(
            src,
            img,
            txt,
            rows,
            dims or (0, 0),
            {
                S.IMAGE: f"'{src.path}' column '{image_col}' (split '{name}')",
                S.TEXT: f"'{src.path}' column '{text_col}' (split '{name}')",
            },
        )
        splits[name] = SplitPlan(ids, labels, feats)
        if rows is None:
            next_id += n
    if label_kind == "auto":
        counts = [sp.clean_label.sum(axis=1).max(initial=0) for sp in splits.values()]
        label_kind = S.MULTI if max(counts, default=0) > 1 else S.SINGLE
    order = [s for s in S.allowed_splits(label_kind) if s in splits]
    unknown = [s for s in splits if s not in S.allowed_splits(label_kind)]
    if unknown:
        raise FeatureStoreError(
            f"split value(s) {unknown} in {[str(p) for _, p in files]} are not splits of a "
            f"{label_kind}-label dataset ({list(S.allowed_splits(label_kind))}); fix the split "
            "column or the SPLIT= names"
        )
    source = {
        "kind": "plain",
        "paths": [str(p.resolve()) for _, p in files],
        "sha256": {str(p.resolve()): file_sha256(p) for _, p in files if p.is_file()},
        "columns": {"image": image_col, "text": text_col, "label": label_col, "id": id_col},
    }
    if len(files) == 1:
        source["path"] = str(files[0][1].resolve())
    protocol: dict[str, Any] = {
        "retrieval": (
            "test-vs-test, cross-modal"
            if label_kind == S.SINGLE
            else "query-vs-database, cross-modal"
        ),
        "label_format": kind,
    }
    if kind != "multi-hot":
        protocol["label_base"] = base
    plan = ImportPlan({s: splits[s] for s in order}, label_kind, source, protocol)
    if valid_from_test:
        if "valid" in plan.splits:
            raise FeatureStoreError("the input has a valid split already; drop --valid-from-test")
        carve(
            plan, into="valid", source_split="test", count=valid_from_test, option="valid_from_test"
        )
    if valid_from_query:
        if "valid" in plan.splits:
            raise FeatureStoreError("the input has a valid split already; drop --valid-from-query")
        carve(
            plan,
            into="valid",
            source_split="query",
            count=valid_from_query,
            option="valid_from_query",
        )
    return plan
