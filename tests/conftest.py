"""Shared fixtures: small datasets written by the project's own importers, and one Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synthetic_util import write_synthetic

REPO = Path(__file__).resolve().parent.parent
WIKI_MAT = Path(
    os.environ.get("RSHNL_WIKI_MAT", REPO.parent / "shared" / "datasets" / "wikipedia" / "wiki.mat")
)


@pytest.fixture(scope="session")
def wiki_mat() -> Path:
    if not WIKI_MAT.is_file():
        pytest.skip(f"real Wikipedia file not present at {WIKI_MAT} (../shared is absent)")
    return WIKI_MAT


_TINY = {
    "num_classes": 6,
    "counts": {"train": 192, "valid": 48, "test": 48},
    "image_dim": 24,
    "text_dim": 16,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small noisy synthetic dataset (single-label, 6 classes)."""
    return write_synthetic(
        tmp_path_factory.mktemp("store"), "tiny", noise=("symmetric", 0.4, 1), seed=3, **_TINY
    )


@pytest.fixture(scope="session")
def tiny_clean(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small clean synthetic dataset (single-label, 6 classes) for making noisy copies of."""
    return write_synthetic(tmp_path_factory.mktemp("clean-store"), "clean", seed=4, **_TINY)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session; logical CPUs above the worker count (Ray Data needs some)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
