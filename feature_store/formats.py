"""Importers from the layouts public cross-modal benchmarks ship in, into the one schema.

Each ``plan_*`` function reads a file's labels and structure, checks that every variable of its
layout is there, and returns an :class:`~feature_store.plan.ImportPlan` whose features are read
lazily (HDF5 / v7.3 files stream; MATLAB v5 files are loaded by SciPy, variable by variable).

Layouts (rows are items; MATLAB v5 or v7.3/HDF5 unless noted):

=============== ===================================================================== ==========
importer        variables                                                             splits
=============== ===================================================================== ==========
wiki-mat        struct ``data``: X1 (d×n), X2, Y (K×n), split.ind_train/ind_test       tr/va/te
wiki-deep       train_imgs_deep, train_texts_doc, train_imgs_labels, test_* (same)     tr/va/te
xmedia          I_tr_CNN, I_te_CNN, T_tr_BOW, T_te_BOW, trImgCat, teImgCat             tr/va/te
inria           tr_img, tr_txt, tr_img_lab, val_img, val_txt, val_img_lab, te_*        tr/va/te
xmedianet       cells train, valid, test ({1} image, {2} text), *_labels cells         tr/va/te
multilabel-h5   ImgTrain/TagTrain/LabTrain, ImgQuery/TagQuery/LabQuery,                tr/q/db
                ImgDataBase/TagDataBase/LabDataBase (multi-hot, usually h5py-written)
=============== ===================================================================== ==========

Class-index labels are turned into one-hot vectors. ``label_base="auto"`` treats labels as 1-based
when their minimum over all splits is 1 (XMedia's categories are), else 0-based; the base used is
recorded in the manifest's protocol. A validation split is carved out of the test split (single-
label, ``valid_from_test``) or the query split (multi-label, ``valid_from_query``) when a layout
has none; the carve-out size is recorded too. Item ids are row numbers: the file's column index
for wiki-mat, otherwise a running number over the layout's splits in the order listed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.matfile import MatFile, v5_read_errors, v5_reason
from feature_store.plan import ArrayFeatures, ImportPlan, SplitPlan, carve

log = logging.getLogger(__name__)

WIKI_VALID_FROM_TEST = 231
XMEDIA_VALID_FROM_TEST = 500


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source(kind: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "path": str(path.resolve()), "sha256": file_sha256(path), **extra}


# ------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------


def _as_indices(values: np.ndarray, where: str) -> np.ndarray:
    """A label variable as a 1-D integer array; refuses NaN and non-integral values."""
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v) | (v != np.round(v))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise FeatureStoreError(
                f"{where} row {row} has label {v[row].item()!r}, not a whole class number; "
                "class labels must be integers"
            )
    elif v.dtype.kind not in "iub":
        raise FeatureStoreError(f"{where} has dtype {v.dtype}, expected integer class labels")
    return v.astype(np.int64)


def resolve_label_base(values: list[np.ndarray], label_base: str | int) -> int:
    """0 or 1: the given base, or for "auto" 1 when the smallest label of all splits is 1."""
    if label_base in (0, 1, "0", "1"):
        return int(label_base)
    if label_base != "auto":
        raise FeatureStoreError(f"label base '{label_base}' must be 0, 1 or auto")
    lo = min((int(v.min()) for v in values if v.size), default=0)
    return 1 if lo == 1 else 0


def _first_row(labels: Any, value: int) -> int:
    """The first row holding ``value`` (-1 if none) of a class vector or a list of class lists."""
    if isinstance(labels, np.ndarray):
        hit = np.flatnonzero(labels == value)
        return int(hit[0]) if hit.size else -1
    return next((r for r, a in enumerate(labels) if (a == value).any()), -1)


def infer_num_classes(parts: list[tuple[str, Any]], base: int) -> int:
    """K from class numbers used without --num-classes; refuses a gap in ``base..base+K-1``.

    ``parts`` holds (where, labels) with labels a 1-D integer array (one class per row) or a list
    of integer arrays (class lists per row). A gap usually means a stray label (e.g. one 99 among
    classes 0..5), which would otherwise silently add classes no item has.
    """
    flat = [
        v if isinstance(v, np.ndarray) else np.concatenate([*v, np.zeros(0, np.int64)])
        for _, v in parts
    ]
    used = np.unique(np.concatenate([*flat, np.zeros(0, np.int64)]))
    used = used[used >= base]  # below the base is refused later, with its row
    if not used.size:
        return 1
    k = int(used[-1]) - base + 1
    if used.size == k:
        return k
    first_gap = int(np.setdiff1d(np.arange(base, base + k), used)[0])
    stray = int(used[used > first_gap][0])
    where, row = next((w, _first_row(v, stray)) for w, v in parts if _first_row(v, stray) >= 0)
    below = f"{base}..{first_gap - 1}" if first_gap > base else "none"
    raise FeatureStoreError(
        f"{where} row {row} has label {stray}, but no item has class {first_gap} (classes "
        f"below it: {below}, label base {base}); class numbers must run from {base} without "
        "gaps: fix the label, or pass --num-classes K (and --label-base) to declare the classes"
    )


def one_hot(idx: np.ndarray, *, base: int, num_classes: int, where: str) -> np.ndarray:
    """Class numbers (with the given base) as one-hot rows; refuses labels outside [0, K)."""
    z = idx - base
    bad = (z < 0) | (z >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise FeatureStoreError(
            f"{where} row {row} has label {int(idx[row])}, outside [{base}, "
            f"{base + num_classes - 1}] (label base {base}, {num_classes} classes); fix the label "
            "or pass the right --num-classes / --label-base"
        )
    out = np.zeros((idx.shape[0], num_classes), dtype=np.uint8)
    out[np.arange(idx.shape[0]), z] = 1
    return out


def _multi_hot(values: Any, where: str, num_classes: int | None) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 2:
        raise FeatureStoreError(f"{where} has shape {a.shape}, expected items × classes")
    if num_classes is not None and a.shape[1] != num_classes:
        raise FeatureStoreError(
            f"{where} has {a.shape[1]} classes but --num-classes is {num_classes}; fix the flag"
        )
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            r, k = (int(x) for x in np.argwhere(bad)[0])
            raise FeatureStoreError(
                f"{where} row {r} class {k} is {a[r, k].item()!r}; labels must be 0/1"
            )
    bad = (a != 0) & (a != 1)
    if bad.any():
        r, k = (int(x) for x in np.argwhere(bad)[0])
        raise FeatureStoreError(
            f"{where} row {r} has value {a[r, k].item()!r} at class {k}; a multi-hot label "
            "matrix holds only 0 and 1"
        )
    return a.astype(np.uint8)


def _labels_of(
    raw: dict[str, np.ndarray],
    rows: dict[str, int],
    where: dict[str, str],
    *,
    label_base: str | int,
    num_classes: int | None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Class-index vectors (or one-hot matrices) of single-label splits as one-hot matrices."""
    matrices = {s: np.asarray(v) for s, v in raw.items()}
    as_matrix = {
        s: v.ndim == 2 and min(v.shape) > 1 and v.shape[0] == rows[s] for s, v in matrices.items()
    }
    if all(as_matrix.values()):
        out = {s: _multi_hot(v, where[s], num_classes) for s, v in matrices.items()}
        return out, {"label_format": "one-hot"}
    idx = {}
    for s, v in matrices.items():
        i = _as_indices(v, where[s])
        if i.shape[0] != rows[s]:
            raise FeatureStoreError(
                f"{where[s]} has {i.shape[0]} labels but the split has {rows[s]} feature rows; "
                "every item needs exactly one label"
            )
        idx[s] = i
    base = resolve_label_base(list(idx.values()), label_base)
    k = num_classes or infer_num_classes([(where[s], i) for s, i in idx.items()], base)
    out = {s: one_hot(i, base=base, num_classes=k, where=where[s]) for s, i in idx.items()}
    return out, {"label_base": base, "label_format": "class-index"}


def _single_label_plan(
    mf: MatFile,
    parts: dict[str, tuple[Any, Any, Any, dict[str, str]]],
    *,
    kind: str,
    label_base: str | int,
    num_classes: int | None,
    protocol: dict[str, Any],
) -> ImportPlan:
    """Splits given as (image rows, text rows, raw labels, where) → plan with running item ids."""
    rows = {}
    features = {}
    for s, (img, txt, _, where) in parts.items():
        features[s] = ArrayFeatures(img, txt, where=where)
        rows[s] = features[s].num_rows
    labels, label_meta = _labels_of(
        {s: p[2] for s, p in parts.items()},
        rows,
        {s: p[3][S.LABEL] for s, p in parts.items()},
        label_base=label_base,
        num_classes=num_classes,
    )
    splits, start = {}, 0
    for s in parts:
        n = rows[s]
        splits[s] = SplitPlan(np.arange(start, start + n, dtype=np.int64), labels[s], features[s])
        start += n
    return ImportPlan(
        splits,
        S.SINGLE,
        _source(kind, mf.path, container=mf.kind),
        {**protocol, **label_meta, "retrieval": "test-vs-test, cross-modal"},
    )


# ------------------------------------------------------------------------------------------
# The benchmark layouts
# ------------------------------------------------------------------------------------------


def plan_wiki_mat(path: str | Path, *, valid_from_test: int = WIKI_VALID_FROM_TEST) -> ImportPlan:
    """Wikipedia shallow features: struct ``data`` with X1 (d×n), X2, Y (K×n), split (1-based).

    The first ``valid_from_test`` test items become the validation split (the paper's protocol).
    Item ids are the 0-based column indices in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureStoreError(f"input file '{path}' does not exist")
    import scipy.io as sio

    try:
        mat = sio.loadmat(str(path))
    except v5_read_errors() as e:
        raise FeatureStoreError(
            f"'{path}' is not a readable MATLAB v5 .mat file ({v5_reason(e, path)}); "
            "v7.3 files are HDF5 and need the HDF5 importer"
        ) from e
    if "data" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise FeatureStoreError(
            f"'{path}': no variable 'data' (found {found}); not the wiki layout, see "
            "`python -m jobs.ingest --help` for the other importers"
        )
    data = mat["data"]
    try:
        d = data[0, 0]
        fields = set(d.dtype.names or ())
    except (IndexError, TypeError, AttributeError) as e:
        raise FeatureStoreError(f"'{path}': variable 'data' is not a MATLAB struct") from e
    missing = {"X1", "X2", "Y", "split"} - fields
    if missing:
        raise FeatureStoreError(
            f"'{path}': struct 'data' lacks field(s) {sorted(missing)}; export the complete "
            "struct (X1, X2, Y, split)"
        )
    split = d["split"][0, 0]
    split_fields = set(split.dtype.names or ())
    if not {"ind_train", "ind_test"} <= split_fields:
        raise FeatureStoreError(
            f"'{path}': data.split lacks {sorted({'ind_train', 'ind_test'} - split_fields)}"
        )
    X1 = np.asarray(d["X1"], dtype=np.float64).T
    X2 = np.asarray(d["X2"], dtype=np.float64).T
    Y = d["Y"]
    Y = (Y.toarray() if hasattr(Y, "toarray") else np.asarray(Y)).T
    n = X1.shape[0]
    if X2.shape[0] != n or Y.shape[0] != n:
        raise FeatureStoreError(
            f"'{path}': X1, X2 and Y have {X1.shape[0]}, {X2.shape[0]}, {Y.shape[0]} columns; "
            "they must describe the same items"
        )
    ind_train = np.asarray(split["ind_train"]).ravel().astype(np.int64) - 1
    ind_test = np.asarray(split["ind_test"]).ravel().astype(np.int64) - 1
    for nm, ind in (("ind_train", ind_train), ("ind_test", ind_test)):
        if ind.size and (ind.min() < 0 or ind.max() >= n):
            raise FeatureStoreError(f"'{path}': split.{nm} has indices outside 1..{n}")
    if not 0 < valid_from_test < ind_test.size:
        raise FeatureStoreError(
            f"valid_from_test={valid_from_test} must be in (0, {ind_test.size}) for '{path}'"
        )
    labels = (Y != 0).astype(np.uint8)
    where = {S.IMAGE: f"'{path}' data.X1", S.TEXT: f"'{path}' data.X2"}

    def part(idx: np.ndarray) -> SplitPlan:
        return SplitPlan(idx, labels[idx], ArrayFeatures(X1[idx], X2[idx], where=where))

    splits = {
        "train": part(ind_train),
        "valid": part(ind_test[:valid_from_test]),
        "test": part(ind_test[valid_from_test:]),
    }
    protocol = {"valid_from_test": valid_from_test, "retrieval": "test-vs-test, cross-modal"}
    return ImportPlan(splits, S.SINGLE, _source("wiki-mat", path), protocol)


def read_wiki_mat(
    path: str | Path, *, valid_from_test: int = WIKI_VALID_FROM_TEST
) -> tuple[dict[str, S.SplitArrays], dict[str, Any]]:
    """The Wikipedia shallow-feature file as in-memory splits and its source/protocol metadata."""
    plan = plan_wiki_mat(path, valid_from_test=valid_from_test)
    return plan.to_arrays(), {"source": plan.source, "protocol": plan.protocol}


def plan_wiki_deep(
    path: str | Path,
    *,
    valid_from_test: int = WIKI_VALID_FROM_TEST,
    label_base: str | int = "auto",
    num_classes: int | None = None,
) -> ImportPlan:
    """Wikipedia deep features (VGG image, doc2vec text): train_* and test_* variables."""
    mf = MatFile(path, "Wikipedia deep-feature")
    names = {S.IMAGE: "imgs_deep", S.TEXT: "texts_doc", S.LABEL: "imgs_labels"}
    mf.require([f"{s}_{v}" for s in ("train", "test") for v in names.values()])
    parts = {}
    for s in ("train", "test"):
        where = {c: f"'{mf.path}' variable '{s}_{v}'" for c, v in names.items()}
        parts[s] = (
            mf.matrix(f"{s}_imgs_deep"),
            mf.matrix(f"{s}_texts_doc"),
            mf.vector(f"{s}_imgs_labels"),
            where,
        )
    plan = _single_label_plan(
        mf, parts, kind="wiki-deep", label_base=label_base, num_classes=num_classes, protocol={}
    )
    carve(plan, into="valid", source_split="test", count=valid_from_test, option="valid_from_test")
    return plan


def plan_xmedia(
    path: str | Path,
    *,
    valid_from_test: int = XMEDIA_VALID_FROM_TEST,
    label_base: str | int = "auto",
    num_classes: int | None = None,
) -> ImportPlan:
    """XMedia image CNN and text BOW features: I_tr_CNN, T_tr_BOW, trImgCat and the test ones."""
    mf = MatFile(path, "XMedia")
    vs = {
        "train": ("I_tr_CNN", "T_tr_BOW", "trImgCat"),
        "test": ("I_te_CNN", "T_te_BOW", "teImgCat"),
    }
    mf.require([v for t in vs.values() for v in t])
    parts = {}
    for s, (i, t, lab) in vs.items():
        where = {
            S.IMAGE: f"'{mf.path}' variable '{i}'",
            S.TEXT: f"'{mf.path}' variable '{t}'",
            S.LABEL: f"'{mf.path}' variable '{lab}'",
        }
        parts[s] = (mf.matrix(i), mf.matrix(t), mf.vector(lab), where)
    plan = _single_label_plan(
        mf, parts, kind="xmedia", label_base=label_base, num_classes=num_classes, protocol={}
    )
    carve(plan, into="valid", source_split="test", count=valid_from_test, option="valid_from_test")
    return plan


def plan_inria(
    path: str | Path, *, label_base: str | int = "auto", num_classes: int | None = None
) -> ImportPlan:
    """INRIA-Websearch: tr_img, tr_txt, tr_img_lab, val_*, te_* (its own validation split)."""
    mf = MatFile(path, "INRIA-Websearch")
    prefixes = {"train": "tr", "valid": "val", "test": "te"}
    mf.require([f"{p}_{v}" for p in prefixes.values() for v in ("img", "txt", "img_lab")])
    parts = {}
    for s, p in prefixes.items():
        where = {
            S.IMAGE: f"'{mf.path}' variable '{p}_img'",
            S.TEXT: f"'{mf.path}' variable '{p}_txt'",
            S.LABEL: f"'{mf.path}' variable '{p}_img_lab'",
        }
        parts[s] = (mf.matrix(f"{p}_img"), mf.matrix(f"{p}_txt"), mf.vector(f"{p}_img_lab"), where)
    return _single_label_plan(
        mf, parts, kind="inria", label_base=label_base, num_classes=num_classes, protocol={}
    )


def plan_xmedianet(
    path: str | Path, *, label_base: str | int = "auto", num_classes: int | None = None
) -> ImportPlan:
    """XMediaNet (5 views): cells train/valid/test ({1} image, {2} text) and *_labels cells."""
    mf = MatFile(path, "XMediaNet")
    splits = ("train", "valid", "test")
    mf.require([*splits, *(f"{s}_labels" for s in splits)])
    parts = {}
    for s in splits:
        views, labs = mf.cell(s), mf.cell(f"{s}_labels")
        if len(views) < 2 or not labs:
            raise FeatureStoreError(
                f"'{mf.path}' cell '{s}' has {len(views)} views and '{s}_labels' {len(labs)}; "
                "the XMediaNet layout needs {image, text, ...} views and their labels"
            )
        where = {
            S.IMAGE: f"'{mf.path}' variable '{s}'{{1}}",
            S.TEXT: f"'{mf.path}' variable '{s}'{{2}}",
            S.LABEL: f"'{mf.path}' variable '{s}_labels'{{1}}",
        }
        parts[s] = (views[0], views[1], np.asarray(labs[0]), where)
    return _single_label_plan(
        mf, parts, kind="xmedianet", label_base=label_base, num_classes=num_classes, protocol={}
    )


MULTILABEL_H5_VARS = {
    "train": ("ImgTrain", "TagTrain", "LabTrain"),
    "query": ("ImgQuery", "TagQuery", "LabQuery"),
    "database": ("ImgDataBase", "TagDataBase", "LabDataBase"),
}


def plan_multilabel_h5(
    path: str | Path, *, valid_from_query: int = 0, num_classes: int | None = None
) -> ImportPlan:
    """The multi-label HDF5 layout (MIRFlickr-25K, NUS-WIDE, MS-COCO, IAPR TC-12).

    Splits train/query/database; item ids number the rows train, then query, then database. The
    protocol samples the training set from the database, so the same picture appears in both
    under different ids: the file carries no ids to tell. ``valid_from_query`` moves the first N
    query items into a validation split (0 keeps the published protocol).
    """
    mf = MatFile(path, "multi-label HDF5")
    mf.require([v for t in MULTILABEL_H5_VARS.values() for v in t])
    splits, start = {}, 0
    for s, (i, t, lab) in MULTILABEL_H5_VARS.items():
        where = {
            S.IMAGE: f"'{mf.path}' variable '{i}'",
            S.TEXT: f"'{mf.path}' variable '{t}'",
        }
        f = ArrayFeatures(mf.matrix(i), mf.matrix(t), where=where)
        labels = _multi_hot(mf.vector(lab), f"'{mf.path}' variable '{lab}'", num_classes)
        if labels.shape[0] != f.num_rows:
            raise FeatureStoreError(
                f"'{mf.path}' variable '{lab}' has {labels.shape[0]} rows but '{i}' has "
                f"{f.num_rows}; labels and features must describe the same items"
            )
        splits[s] = SplitPlan(np.arange(start, start + f.num_rows, dtype=np.int64), labels, f)
        start += f.num_rows
    plan = ImportPlan(
        splits,
        S.MULTI,
        _source("multilabel-h5", mf.path, container=mf.kind),
        {"retrieval": "query-vs-database, cross-modal", "label_format": "multi-hot"},
    )
    plan.protocol["valid_from_query"] = valid_from_query
    if valid_from_query:
        carve(
            plan,
            into="valid",
            source_split="query",
            count=valid_from_query,
            option="valid_from_query",
        )
    return plan
