"""Label noise injection for training splits, seeded and recorded per item."""

from __future__ import annotations

from typing import Any

import numpy as np

from feature_store.errors import FeatureStoreError
from feature_store.schema import SplitArrays

NOISE_MODES = ("none", "symmetric")


def symmetric_noise(
    clean_label: np.ndarray, rate: float, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """A ``rate`` share of items gets a class drawn uniformly from all K classes (paper protocol).

    The drawn class may equal the true one, so the realised share of wrong labels is about
    ``rate * (K - 1) / K``; both numbers are returned in the spec.
    """
    if not 0.0 <= rate <= 1.0:
        raise FeatureStoreError(f"noise rate {rate} is outside [0, 1]")
    n, k = clean_label.shape
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(n)[: round(rate * n)]
    new_class = rng.integers(0, k, size=chosen.shape[0])
    noisy = clean_label.copy()
    noisy[chosen] = 0
    noisy[chosen, new_class] = 1
    flipped = int(np.any(noisy != clean_label, axis=1).sum())
    spec = {
        "mode": "symmetric",
        "rate": rate,
        "seed": seed,
        "num_resampled": int(chosen.shape[0]),
        "num_noisy": flipped,
        "realised_rate": flipped / n if n else 0.0,
    }
    return noisy, spec


def apply_noise(train: SplitArrays, mode: str, rate: float, seed: int) -> dict[str, Any]:
    """Corrupt ``train.label`` in place from its clean labels; return the noise spec."""
    if mode not in NOISE_MODES:
        raise FeatureStoreError(f"noise mode '{mode}' is not one of {NOISE_MODES}")
    if mode == "none" or rate == 0.0:
        train.label = train.clean_label.copy()
        train.is_noisy = np.zeros(len(train), dtype=bool)
        return {"mode": "none", "rate": 0.0, "seed": seed, "num_noisy": 0}
    if train.clean_label.sum(axis=1).max() > 1:
        raise FeatureStoreError("symmetric noise is defined for single-label data only")
    train.label, spec = symmetric_noise(train.clean_label, rate, seed)
    train.is_noisy = np.any(train.label != train.clean_label, axis=1)
    return spec
