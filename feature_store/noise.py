"""Label noise injection for training splits, seeded and recorded per item.

Every model draws exactly ``round(rate * n)`` training items with a seeded permutation and
corrupts only those; the clean labels are kept, ``is_noisy`` marks the items whose observed label
vector differs from the clean one, and the returned spec records mode, rate, seed and counts.

- ``symmetric`` (single-label, the paper's protocol): each drawn item gets a class drawn uniformly
  from all K classes. The draw may hit the true class, so the realised share of wrong labels is
  about ``rate * (K - 1) / K``.
- ``asymmetric`` (single-label): each drawn item of class c gets class ``flip_map[c]``; the default
  map sends every class to the next one (c → c + 1 mod K). Classes that map to themselves stay.
- ``multilabel`` (multi-label): each drawn item has one of its present classes removed and one
  absent class added (its label vector always changes and never becomes empty); the rate is the
  share of corrupted items.

Noise is applied to the train split only; evaluation splits keep their clean labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from feature_store.errors import FeatureStoreError
from feature_store.schema import MULTI, SINGLE, SplitArrays

NOISE_MODES = ("none", "symmetric", "asymmetric", "multilabel")


def default_mode(label_kind: str) -> str:
    """The noise model used when only a rate is given."""
    return "multilabel" if label_kind == MULTI else "symmetric"


def parse_flip_map(text: str | None, num_classes: int) -> dict[int, int] | None:
    """``"0:1,1:2"`` (or ``"next"``) as a class→class map; unmapped classes map to themselves."""
    if text is None or text.strip() in ("", "next"):
        return None
    out: dict[int, int] = {}
    for part in text.split(","):
        src, sep, dst = part.strip().partition(":")
        try:
            a, b = int(src), int(dst)
        except ValueError:
            a = b = -1
        if not sep or not (0 <= a < num_classes and 0 <= b < num_classes):
            raise FeatureStoreError(
                f"flip map entry '{part.strip()}' is not SRC:DST with classes in [0, "
                f"{num_classes}); write e.g. --flip-map 0:1,1:2,2:0"
            )
        if a in out:
            raise FeatureStoreError(f"flip map names class {a} twice; give each class once")
        out[a] = b
    return out


def check_noise(
    mode: str,
    rate: float,
    *,
    label_kind: str,
    num_classes: int,
    flip_map: dict[int, int] | None = None,
) -> None:
    """Refuse a noise request that does not fit the data, before any work."""
    if mode not in NOISE_MODES:
        raise FeatureStoreError(f"noise mode '{mode}' is not one of {list(NOISE_MODES)}")
    if not 0.0 <= rate <= 1.0:
        raise FeatureStoreError(f"noise rate {rate} is outside [0, 1]; pass a share such as 0.4")
    if mode in ("symmetric", "asymmetric") and label_kind != SINGLE:
        raise FeatureStoreError(
            f"{mode} noise is defined for single-label data only; use --noise-mode multilabel "
            "for a multi-label dataset"
        )
    if mode == "multilabel" and label_kind != MULTI:
        raise FeatureStoreError(
            "multilabel noise is for multi-label data; use --noise-mode symmetric or asymmetric "
            "for a single-label dataset"
        )
    if mode == "asymmetric" and num_classes < 2 and rate > 0:
        raise FeatureStoreError("asymmetric noise needs at least 2 classes")
    if flip_map is not None and mode != "asymmetric":
        raise FeatureStoreError("--flip-map only applies to --noise-mode asymmetric")
    if flip_map:
        bad = {
            a: b for a, b in flip_map.items() if not (0 <= a < num_classes and 0 <= b < num_classes)
        }
        if bad:
            raise FeatureStoreError(f"flip map {bad} names classes outside [0, {num_classes})")


def _chosen(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n)[: round(rate * n)]


def _spec(mode: str, rate: float, seed: int, chosen: int, clean: np.ndarray, noisy: np.ndarray):
    n = clean.shape[0]
    flipped = int(np.any(noisy != clean, axis=1).sum())
    return {
        "mode": mode,
        "rate": rate,
        "seed": seed,
        "num_corrupted": chosen,
        "num_noisy": flipped,
        "realised_rate": flipped / n if n else 0.0,
    }


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
    chosen = _chosen(n, rate, rng)
    new_class = rng.integers(0, k, size=chosen.shape[0])
    noisy = clean_label.copy()
    noisy[chosen] = 0
    noisy[chosen, new_class] = 1
    spec = _spec("symmetric", rate, seed, int(chosen.shape[0]), clean_label, noisy)
    spec["num_resampled"] = int(chosen.shape[0])
    return noisy, spec


def asymmetric_noise(
    clean_label: np.ndarray, rate: float, seed: int, flip_map: dict[int, int] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A ``rate`` share of items of class c gets class ``flip_map[c]`` (default: c → c+1 mod K)."""
    if not 0.0 <= rate <= 1.0:
        raise FeatureStoreError(f"noise rate {rate} is outside [0, 1]")
    n, k = clean_label.shape
    table = (np.arange(k) + 1) % k
    if flip_map is not None:
        table = np.arange(k)
        for a, b in flip_map.items():
            table[a] = b
    rng = np.random.default_rng(seed)
    chosen = _chosen(n, rate, rng)
    noisy = clean_label.copy()
    src = clean_label[chosen].argmax(axis=1)
    noisy[chosen] = 0
    noisy[chosen, table[src]] = 1
    spec = _spec("asymmetric", rate, seed, int(chosen.shape[0]), clean_label, noisy)
    spec["flip_map"] = {str(i): int(table[i]) for i in range(k)}
    return noisy, spec


def multilabel_noise(
    clean_label: np.ndarray, rate: float, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """A ``rate`` share of items swaps one present class for one absent class."""
    if not 0.0 <= rate <= 1.0:
        raise FeatureStoreError(f"noise rate {rate} is outside [0, 1]")
    n = clean_label.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.sort(_chosen(n, rate, rng))
    noisy = clean_label.copy()
    # one uniform draw per item for the class to drop and one for the class to add
    u_drop = rng.random(chosen.shape[0])
    u_add = rng.random(chosen.shape[0])
    for j, i in enumerate(chosen.tolist()):
        on = np.flatnonzero(noisy[i])
        off = np.flatnonzero(noisy[i] == 0)
        if off.size:
            noisy[i, off[int(u_add[j] * off.size)]] = 1
        if on.size and (off.size or on.size > 1):
            noisy[i, on[int(u_drop[j] * on.size)]] = 0
    return noisy, _spec("multilabel", rate, seed, int(chosen.shape[0]), clean_label, noisy)


def corrupt(
    clean_label: np.ndarray,
    mode: str,
    rate: float,
    seed: int,
    *,
    label_kind: str,
    flip_map: dict[int, int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Observed labels for a train split and the noise spec to record in the manifest."""
    check_noise(
        mode, rate, label_kind=label_kind, num_classes=clean_label.shape[1], flip_map=flip_map
    )
    if mode == "none" or rate == 0.0:
        return clean_label.copy(), {"mode": "none", "rate": 0.0, "seed": seed, "num_noisy": 0}
    if mode == "symmetric":
        return symmetric_noise(clean_label, rate, seed)
    if mode == "asymmetric":
        return asymmetric_noise(clean_label, rate, seed, flip_map)
    return multilabel_noise(clean_label, rate, seed)


def apply_noise(
    train: SplitArrays,
    mode: str,
    rate: float,
    seed: int,
    *,
    flip_map: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Corrupt ``train.label`` in place from its clean labels; return the noise spec."""
    if mode not in NOISE_MODES:
        raise FeatureStoreError(f"noise mode '{mode}' is not one of {NOISE_MODES}")
    kind = MULTI if train.clean_label.sum(axis=1).max(initial=0) > 1 else SINGLE
    if mode == "symmetric" and kind == MULTI and rate > 0:
        raise FeatureStoreError("symmetric noise is defined for single-label data only")
    if mode == "multilabel":
        kind = MULTI
    train.label, spec = corrupt(
        train.clean_label, mode, rate, seed, label_kind=kind, flip_map=flip_map
    )
    train.is_noisy = np.any(train.label != train.clean_label, axis=1)
    return spec
