"""Synthetic class-structured two-modality data: the project's embedded default dataset."""

from __future__ import annotations

from typing import Any

import numpy as np

from feature_store.schema import SplitArrays, make_split


def generate(
    *,
    num_classes: int = 10,
    counts: dict[str, int] | None = None,
    image_dim: int = 128,
    text_dim: int = 100,
    latent_dim: int = 32,
    class_sep: float = 0.8,
    modality_gap: float = 1.5,
    seed: int = 0,
) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """Items share a latent class code; each modality is a fixed random projection of it plus noise.

    ``class_sep`` is the distance between class means in units of within-class spread (smaller is
    harder); ``modality_gap`` is the per-modality noise added after projection (larger is harder).
    """
    counts = counts or {"train": 2000, "valid": 200, "test": 500}
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, latent_dim))
    means *= class_sep / np.sqrt(2 * latent_dim)
    proj_img = rng.normal(size=(latent_dim, image_dim)) / np.sqrt(latent_dim)
    proj_txt = rng.normal(size=(latent_dim, text_dim)) / np.sqrt(latent_dim)
    splits: dict[str, SplitArrays] = {}
    next_id = 0
    for split, n in counts.items():
        y = rng.integers(0, num_classes, size=n)
        z = means[y] + rng.normal(size=(n, latent_dim)) / np.sqrt(latent_dim)
        img = np.tanh(z @ proj_img) + modality_gap * rng.normal(size=(n, image_dim)) / np.sqrt(
            image_dim
        )
        txt = np.tanh(z @ proj_txt) + modality_gap * rng.normal(size=(n, text_dim)) / np.sqrt(
            text_dim
        )
        onehot = np.eye(num_classes, dtype=np.uint8)[y]
        splits[split] = make_split(np.arange(next_id, next_id + n), img, txt, onehot)
        next_id += n
    source = {
        "kind": "synthetic",
        "params": {
            "num_classes": num_classes,
            "counts": counts,
            "image_dim": image_dim,
            "text_dim": text_dim,
            "latent_dim": latent_dim,
            "class_sep": class_sep,
            "modality_gap": modality_gap,
            "seed": seed,
        },
    }
    return splits, {"source": source, "protocol": {"retrieval": "test-vs-test, cross-modal"}}
