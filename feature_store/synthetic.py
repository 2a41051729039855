"""Synthetic class-structured two-modality data: the project's embedded default dataset.

Each item has a latent code: the mean of its classes' centres plus Gaussian noise. Each modality
is a fixed random projection of that code through tanh, plus modality-specific noise. Two knobs
set how hard retrieval is:

- ``class_sep`` — distance between class centres in units of the within-class spread. Smaller
  means more class overlap (harder); 0 makes the classes indistinguishable.
- ``modality_gap`` — scale of the noise each modality adds on its own after the projection.
  Larger means image and text of the same item agree less (harder); 0 means no gap.

``difficulty`` in [0, 1] sets both at once: ``class_sep = 1.6 (1 - d)`` and
``modality_gap = 3 d``; 0.5 gives the defaults (0.8, 1.5).

``label_kind="multi"`` gives every item between 1 and ``max_labels`` distinct classes (uniform
count, uniform classes) and splits train / query / database, as the multi-label benchmarks have.

Rows are generated in fixed blocks of ``BLOCK_ROWS`` from seeds derived from (seed, split, block),
so the data depends only on the parameters, never on how it is read, and any size streams.

:func:`modality_from_labels` generates one modality by the same model from labels given to it: a
stand-in for a real dataset's missing features (MIRFlickr-25K without its VGG image features),
recorded as synthetic wherever it is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from feature_store import schema as S
from feature_store.errors import FeatureStoreError
from feature_store.plan import GeneratedFeatures, ImportPlan, SplitPlan

BLOCK_ROWS = 8192
_PARAMS, _LABELS, _FEATURES = 0, 1, 2


def difficulty_params(difficulty: float) -> tuple[float, float]:
    """(class_sep, modality_gap) for a difficulty in [0, 1]."""
    if not 0.0 <= difficulty <= 1.0:
        raise FeatureStoreError(f"difficulty {difficulty} is outside [0, 1]")
    return 1.6 * (1.0 - difficulty), 3.0 * difficulty


def split_counts(
    label_kind: str, *, train: int, valid: int, test: int, query: int, database: int
) -> dict[str, int]:
    """Split sizes of a ``label_kind`` set: train/valid/test, or train/[valid/]query/database
    (multi-label sets have a validation split only when ``valid`` > 0)."""
    if label_kind == S.SINGLE:
        return {"train": train, "valid": valid, "test": test}
    return {
        "train": train,
        **({"valid": valid} if valid > 0 else {}),
        "query": query,
        "database": database,
    }


def _labels(
    seed: int, split_no: int, n: int, k: int, label_kind: str, max_labels: int
) -> np.ndarray:
    out = np.zeros((n, k), dtype=np.uint8)
    for block, a in enumerate(range(0, n, BLOCK_ROWS)):
        b = min(a + BLOCK_ROWS, n)
        rng = np.random.default_rng([seed, _LABELS, split_no, block])
        if label_kind == S.SINGLE:
            out[np.arange(a, b), rng.integers(0, k, size=b - a)] = 1
        else:
            m = rng.integers(1, max_labels + 1, size=b - a)
            order = np.argsort(rng.random((b - a, k), dtype=np.float32), axis=1)
            ranks = np.argsort(order, axis=1)
            out[a:b] = (ranks < m[:, None]).astype(np.uint8)
    return out


def generate_plan(
    *,
    num_classes: int = 10,
    counts: dict[str, int] | None = None,
    image_dim: int = 128,
    text_dim: int = 100,
    latent_dim: int = 32,
    class_sep: float = 0.8,
    modality_gap: float = 1.5,
    difficulty: float | None = None,
    label_kind: str = S.SINGLE,
    max_labels: int = 3,
    seed: int = 0,
) -> ImportPlan:
    """A synthetic dataset as an import plan (features generated block by block on demand)."""
    if label_kind not in S.LABEL_KINDS:
        raise FeatureStoreError(f"label kind '{label_kind}' must be single or multi")
    if difficulty is not None:
        class_sep, modality_gap = difficulty_params(difficulty)
    if num_classes < 1 or image_dim < 1 or text_dim < 1 or latent_dim < 1:
        raise FeatureStoreError("num_classes, image_dim, text_dim and latent_dim must be >= 1")
    if label_kind == S.MULTI and not 1 <= max_labels <= num_classes:
        raise FeatureStoreError(f"max_labels {max_labels} must be in [1, {num_classes}]")
    default = (
        {"train": 2000, "valid": 200, "test": 500}
        if label_kind == S.SINGLE
        else {"train": 2000, "query": 200, "database": 1000}
    )
    counts = dict(counts or default)
    if any(n < 0 for n in counts.values()):
        raise FeatureStoreError(f"split sizes {counts} must be >= 0")
    rng = np.random.default_rng([seed, _PARAMS])
    means = rng.normal(size=(num_classes, latent_dim)) * (class_sep / np.sqrt(2 * latent_dim))
    proj_img = rng.normal(size=(latent_dim, image_dim)) / np.sqrt(latent_dim)
    proj_txt = rng.normal(size=(latent_dim, text_dim)) / np.sqrt(latent_dim)

    def block(split_no: int, labels: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
        a = b * BLOCK_ROWS
        y = labels[a : a + BLOCK_ROWS].astype(np.float64)
        r = np.random.default_rng([seed, _FEATURES, split_no, b])
        n = y.shape[0]
        z = (y @ means) / np.maximum(y.sum(axis=1, keepdims=True), 1.0)
        z += r.normal(size=(n, latent_dim)) / np.sqrt(latent_dim)
        img = np.tanh(z @ proj_img)
        img += (modality_gap / np.sqrt(image_dim)) * r.normal(size=(n, image_dim))
        txt = np.tanh(z @ proj_txt)
        txt += (modality_gap / np.sqrt(text_dim)) * r.normal(size=(n, text_dim))
        return img.astype(np.float32), txt.astype(np.float32)

    def maker(split_no: int, labels: np.ndarray):
        def make(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            first, last = start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS
            parts = [block(split_no, labels, b) for b in range(first, last + 1)]
            img = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            txt = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            off = start - first * BLOCK_ROWS
            return img[off : off + stop - start], txt[off : off + stop - start]

        return make

    splits: dict[str, SplitPlan] = {}
    next_id = 0
    for split_no, (split, n) in enumerate(counts.items()):
        labels = _labels(seed, split_no, n, num_classes, label_kind, max_labels)
        feats = GeneratedFeatures(maker(split_no, labels), n, image_dim, text_dim)
        splits[split] = SplitPlan(np.arange(next_id, next_id + n, dtype=np.int64), labels, feats)
        next_id += n
    params: dict[str, Any] = {
        "num_classes": num_classes,
        "counts": counts,
        "image_dim": image_dim,
        "text_dim": text_dim,
        "latent_dim": latent_dim,
        "class_sep": class_sep,
        "modality_gap": modality_gap,
        "difficulty": difficulty,
        "label_kind": label_kind,
        "max_labels": max_labels if label_kind == S.MULTI else 1,
        "seed": seed,
        "block_rows": BLOCK_ROWS,
    }
    retrieval = (
        "test-vs-test, cross-modal" if label_kind == S.SINGLE else "query-vs-database, cross-modal"
    )
    return ImportPlan(
        splits, label_kind, {"kind": "synthetic", "params": params}, {"retrieval": retrieval}
    )


def generate(**kwargs: Any) -> tuple[dict[str, S.SplitArrays], dict[str, Any]]:
    """The synthetic dataset in memory: (splits, {"source", "protocol"}); see generate_plan."""
    plan = generate_plan(**kwargs)
    return plan.to_arrays(), {"source": plan.source, "protocol": plan.protocol}


LABEL_MODALITY_BLOCK_ROWS = 1024
_LABEL_MODALITY = 3


def modality_from_labels(
    labels: np.ndarray,
    *,
    dim: int,
    difficulty: float = 0.5,
    latent_dim: int = 32,
    seed: int = 0,
) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """One feature modality generated from given label vectors (e.g. a real dataset's labels) by
    the model of :func:`generate_plan`'s image modality; returns (rows → features, parameters).

    Row r: ``z = mean of its classes' centres + N(0, I/latent_dim)``, then
    ``x = tanh(z P) + (modality_gap / sqrt(dim)) N(0, I)``, with centres of scale ``class_sep``
    and ``class_sep, modality_gap = difficulty_params(difficulty)``; an all-zero label row gets
    the noise alone. Rows are drawn in blocks of ``LABEL_MODALITY_BLOCK_ROWS`` seeded by (seed,
    block), so row r's vector depends only on the seed and the labels of its block: the same
    item gets the same vector in every split it is in, however the rows are asked for.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or dim < 1 or latent_dim < 1:
        raise FeatureStoreError(
            f"labels of shape {labels.shape}, dim {dim}, latent_dim {latent_dim}: need items × "
            "classes labels and dims >= 1"
        )
    class_sep, gap = difficulty_params(difficulty)
    n, k = labels.shape
    rng = np.random.default_rng([seed, _LABEL_MODALITY, _PARAMS])
    means = rng.normal(size=(k, latent_dim)) * (class_sep / np.sqrt(2 * latent_dim))
    proj = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
    rows_per_block = LABEL_MODALITY_BLOCK_ROWS

    @functools.lru_cache(maxsize=8)
    def block(b: int) -> np.ndarray:
        y = labels[b * rows_per_block : (b + 1) * rows_per_block].astype(np.float64)
        r = np.random.default_rng([seed, _LABEL_MODALITY, _FEATURES, b])
        z = (y @ means) / np.maximum(y.sum(axis=1, keepdims=True), 1.0)
        z += r.normal(size=(y.shape[0], latent_dim)) / np.sqrt(latent_dim)
        x = np.tanh(z @ proj) + (gap / np.sqrt(dim)) * r.normal(size=(y.shape[0], dim))
        return x.astype(np.float32)

    def rows(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise FeatureStoreError(f"rows {idx.min()}..{idx.max()} are outside 0..{n - 1}")
        out = np.empty((idx.size, dim), dtype=np.float32)
        blocks = idx // rows_per_block
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            out[sel] = block(b)[idx[sel] - b * rows_per_block]
        return out

    params = {
        "dim": dim,
        "difficulty": difficulty,
        "class_sep": class_sep,
        "modality_gap": gap,
        "latent_dim": latent_dim,
        "seed": seed,
        "block_rows": rows_per_block,
    }
    return rows, params
