"""Read MATLAB files of both generations through one interface, in MATLAB's orientation.

- v4/v5/v7 files are read with SciPy (in memory; only the variables asked for are loaded).
- v7.3 files are HDF5 and are read lazily with h5py. MATLAB stores an m×n matrix as an HDF5
  dataset of shape (n, m); datasets that carry MATLAB's ``MATLAB_class`` attribute (or live in a
  file with MATLAB's 512-byte header) are transposed back. Plain HDF5 files written with h5py by
  Python code (the multi-label ``ImgTrain``/``LabTrain`` layout) are used as they are.

Rows are read on demand from HDF5, so a large v7.3 file streams; cell arrays (XMediaNet) come
back as lists of matrices. Damaged or truncated files raise one FeatureStoreError.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from feature_store.errors import FeatureStoreError

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def v5_read_errors() -> tuple[type[BaseException], ...]:
    """What SciPy raises on a damaged or truncated v5 file (a file cut inside its 128-byte header
    fails with IndexError, a cut stream with EOFError)."""
    from scipy.io.matlab import MatReadError

    return (MatReadError, ValueError, OSError, TypeError, NotImplementedError, IndexError, EOFError)


def v5_reason(e: BaseException, path: Path) -> str:
    """A short reason for a v5 read error; a cut file is named as truncated with its size."""
    if isinstance(e, IndexError | EOFError):
        size = path.stat().st_size if path.is_file() else 0
        return f"truncated: {size} bytes"
    return str(e)


def is_hdf5(path: Path) -> bool:
    """Whether the file starts (at byte 0 or after MATLAB's 512-byte header) as HDF5."""
    with open(path, "rb") as f:
        head = f.read(520)
    return head[:8] == HDF5_SIGNATURE or head[512:520] == HDF5_SIGNATURE


class _HdfRows:
    """Row access to an HDF5 dataset, transposed for MATLAB-written data; read errors wrapped."""

    def __init__(self, ds: Any, *, transpose: bool, where: str) -> None:
        self._ds, self._t, self._where = ds, transpose, where
        shape = tuple(int(s) for s in ds.shape)
        self.shape = tuple(reversed(shape)) if transpose else shape
        self.dtype = ds.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        try:
            if self._t:
                return np.asarray(self._ds[..., rows]).T
            return np.asarray(self._ds[rows])
        except (OSError, RuntimeError, ValueError) as e:
            raise FeatureStoreError(
                f"{self._where}: cannot read rows {rows.start}..{rows.stop} ({e}); the HDF5 file "
                "is truncated or damaged, re-download or re-export it"
            ) from e

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[slice(0, self.shape[0])]
        return a.astype(dtype) if dtype is not None else a


class MatFile:
    """A MATLAB file (v5 or v7.3/HDF5) or a plain HDF5 file, opened for reading."""

    def __init__(self, path: str | Path, layout: str) -> None:
        self.path = Path(path)
        self.layout = layout
        if not self.path.is_file():
            raise FeatureStoreError(f"input file '{self.path}' does not exist")
        self._h5: Any = None
        self._v5: dict[str, Any] = {}
        if is_hdf5(self.path):
            import h5py

            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as e:
                raise FeatureStoreError(
                    f"'{self.path}' is a truncated or damaged HDF5 file ({e}); re-download or "
                    "re-export it"
                ) from e
            with open(self.path, "rb") as f:
                self._matlab = f.read(10) == b"MATLAB 7.3"
            self._names = sorted(k for k in self._h5.keys() if not k.startswith("#"))
        else:
            import scipy.io as sio

            try:
                self._names = sorted(n for n, _, _ in sio.whosmat(str(self.path)))
            except v5_read_errors() as e:
                raise FeatureStoreError(
                    f"'{self.path}' is not a readable MATLAB .mat file "
                    f"({v5_reason(e, self.path)}); v7.3 files must "
                    "be HDF5, other files need the matching importer"
                ) from e
            self._matlab = True

    @property
    def kind(self) -> str:
        return "hdf5" if self._h5 is not None else "mat-v5"

    def names(self) -> list[str]:
        return list(self._names)

    def require(self, names: list[str]) -> None:
        """Refuse a file of this layout that lacks any of the variables."""
        missing = [n for n in names if n not in self._names]
        if missing:
            raise FeatureStoreError(
                f"'{self.path}' lacks variable(s) {missing} of the {self.layout} layout (found "
                f"{self._names}); export the complete file or use the importer for its layout"
            )
        if self._h5 is None:
            import scipy.io as sio

            wanted = [n for n in names if n not in self._v5]
            if wanted:
                try:
                    self._v5.update(sio.loadmat(str(self.path), variable_names=wanted))
                except v5_read_errors() as e:
                    raise FeatureStoreError(
                        f"'{self.path}' cannot be read ({v5_reason(e, self.path)}); the .mat "
                        "file is truncated or damaged, re-download or re-export it"
                    ) from e
        else:
            for n in names:
                self._probe(n)

    def _probe(self, name: str) -> None:
        """Read the last element of a dataset so truncation shows before any work."""
        obj = self._h5[name]
        if not hasattr(obj, "shape"):
            return
        try:
            if obj.size:
                obj[tuple(slice(s - 1, s) for s in obj.shape)]
        except (OSError, RuntimeError) as e:
            raise FeatureStoreError(
                f"'{self.path}' variable '{name}' cannot be read ({e}); the HDF5 file is "
                "truncated or damaged, re-download or re-export it"
            ) from e

    def _where(self, name: str) -> str:
        return f"'{self.path}' variable '{name}'"

    def matrix(self, name: str) -> Any:
        """A 2-D variable with items as rows (as MATLAB shows it); lazy for HDF5."""
        if self._h5 is None:
            a = self._v5[name]
            if hasattr(a, "toarray"):
                a = a.toarray()
            a = np.asarray(a)
            if a.dtype == object:
                raise FeatureStoreError(
                    f"{self._where(name)} is a cell or struct, expected a numeric matrix"
                )
            return a if a.ndim == 2 else a.reshape(a.shape[0], -1)
        return self._hdf_matrix(self._h5[name], self._where(name))

    def _hdf_matrix(self, ds: Any, where: str) -> Any:
        if not hasattr(ds, "shape") or ds.dtype.kind not in "biuf":
            raise FeatureStoreError(f"{where} is not a numeric matrix (got {ds})")
        if "MATLAB_sparse" in ds.attrs or (hasattr(ds, "keys") and "ir" in ds):
            raise FeatureStoreError(f"{where} is a sparse matrix; save it dense (full()) instead")
        transpose = self._matlab or "MATLAB_class" in ds.attrs
        rows = _HdfRows(ds, transpose=transpose, where=where)
        if len(rows.shape) != 2:
            raise FeatureStoreError(f"{where} has shape {rows.shape}, expected a 2-D matrix")
        return rows

    def vector(self, name: str) -> np.ndarray:
        """A variable read whole (labels): items × 1, 1 × items, or items × K."""
        m = self.matrix(name)
        return np.asarray(m)

    def cell(self, name: str) -> list[Any]:
        """The elements of a cell array variable, in MATLAB's (column-major) order."""
        if self._h5 is None:
            a = self._v5[name]
            if a.dtype != object:
                raise FeatureStoreError(f"{self._where(name)} is not a cell array")
            out = []
            for i, el in enumerate(a.ravel(order="F")):
                el = el.toarray() if hasattr(el, "toarray") else np.asarray(el)
                if el.dtype == object or el.ndim != 2:
                    raise FeatureStoreError(
                        f"{self._where(name)}{{{i + 1}}} is not a numeric matrix"
                    )
                out.append(el)
            return out
        import h5py

        ds = self._h5[name]
        if ds.dtype != h5py.ref_dtype and ds.dtype.kind != "O":
            raise FeatureStoreError(f"{self._where(name)} is not a cell array")
        refs = np.asarray(ds[()]).ravel(order="C")  # HDF5 holds MATLAB's transpose
        return [
            self._hdf_matrix(self._h5[r], f"{self._where(name)}{{{i + 1}}}")
            for i, r in enumerate(refs)
        ]

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()

    def __enter__(self) -> MatFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
