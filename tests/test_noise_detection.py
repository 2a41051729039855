"""Noise-detection metrics against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.retrieval import metrics as E


def _brute_auc(scores, positive):
    """Share of (noisy, clean) pairs ranked correctly, ties ½, by looping over every pair."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_value_with_ties():
    # noisy scores (3, 2), clean (2, 1): pairs 3>2, 3>1, 2=2 (½), 2>1 → 3.5 / 4
    assert E.roc_auc([3, 2, 2, 1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert E.roc_auc([1, 1, 1], [1, 0, 0]) == pytest.approx(0.5)  # all tied
    assert E.roc_auc([0, 1], [1, 0]) == 0.0
    assert np.isnan(E.roc_auc([0.1, 0.2], [0, 0]))  # no noisy item


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = 60
    scores = rng.integers(0, 6, n).astype(float)  # many ties
    if seed % 2:
        scores += rng.normal(0, 0.1, n)
    noisy = rng.random(n) < 0.4
    assert E.roc_auc(scores, noisy) == pytest.approx(_brute_auc(scores, noisy), abs=1e-12)


def test_detection_report_hand_values():
    w = np.array([0.0, 0.0, 0.5, 1.0, 0.0, 0.8])
    ell = np.array([5.0, 4.0, 2.0, 1.0, 3.0, 1.5])
    noisy = np.array([1, 1, 0, 0, 0, 1], dtype=bool)
    d = E.noise_detection_report(w, ell, noisy)
    # flagged (w ≤ 0): items 0, 1, 4 → 2 of them noisy; 2 of 3 noisy items found
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["zero_weight_share"] == pytest.approx(0.5) and d["flagged_share"] == 0.5
    assert d["clean_mean_weight"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert d["noisy_mean_weight"] == pytest.approx(0.8 / 3)
    # ℓ: noisy (5, 4, 1.5) vs clean (2, 1, 3): wins 3+3+1 = 7 of 9
    assert d["auc"] == pytest.approx(7 / 9)
    assert d["weight_auc"] == pytest.approx(_brute_auc(-w, noisy))
    # a threshold of ½ (mixture posteriors) flags w ≤ ½: items 0, 1, 2, 4
    d5 = E.noise_detection_report(w, ell, noisy, threshold=0.5)
    assert d5["flagged_share"] == pytest.approx(4 / 6) and d5["precision"] == pytest.approx(0.5)
