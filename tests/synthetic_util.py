"""Small synthetic datasets written to a store for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_synthetic(
    store: Path, name: str, *, noise: tuple[str, float, int] = ("none", 0.0, 0), **gen: Any
) -> str:
    """Generate (``feature_store.synthetic.generate(**gen)``), add ``noise`` (mode, rate, seed)
    to the train split, write it as ``store/name/v1`` and return its URI."""
    from feature_store.noise import apply_noise
    from feature_store.store import write_dataset
    from feature_store.synthetic import generate

    splits, meta = generate(**gen)
    mode, rate, seed = noise
    spec = apply_noise(splits["train"], mode, rate, seed=seed)
    return write_dataset(
        str(store), name, splits, source=meta["source"], noise=spec,
        label_kind=gen.get("label_kind", "single"), protocol=meta["protocol"],
    )  # fmt: skip
