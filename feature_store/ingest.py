"""Imports and noisy copies as new versions: the target is checked before any input is read, the
train labels get the requested noise, and the version is written (or nothing is). An import can
bring label copies of its own (published noisy labels), written after it as overlays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from feature_store.errors import FeatureStoreError
from feature_store.noise import parse_flip_map
from feature_store.plan import ImportPlan
from feature_store.store import (
    check_target,
    open_dataset,
    write_label_copy,
    write_noisy_copy,
    write_version,
)


def import_version(
    store: str,
    name: str,
    read_plan: Callable[[], ImportPlan],
    *,
    version: int | None = None,
    rows_per_group: int | None = None,
    noise_mode: str | None = None,
    noise_rate: float = 0.0,
    noise_seed: int = 0,
    flip_map: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write the plan ``read_plan()`` reads as version ``version`` (default: the next) of
    ``name`` in ``store``, its train labels noised; returns (the version's URI, the noise spec).

    A bad target is refused before ``read_plan`` runs, so no input is read for nothing.
    """
    uris, noise = import_with_label_copies(
        store,
        name,
        read_plan,
        lambda plan: [],
        version=version,
        rows_per_group=rows_per_group,
        noise_mode=noise_mode,
        noise_rate=noise_rate,
        noise_seed=noise_seed,
        flip_map=flip_map,
    )
    return uris[0], noise


def import_with_label_copies(
    store: str,
    name: str,
    read_plan: Callable[[], ImportPlan],
    read_copies: Callable[[ImportPlan], list[tuple[np.ndarray, dict[str, Any]]]],
    *,
    version: int | None = None,
    rows_per_group: int | None = None,
    noise_mode: str | None = None,
    noise_rate: float = 0.0,
    noise_seed: int = 0,
    flip_map: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """:func:`import_version`, then one copy of it per (train labels, noise spec) that
    ``read_copies(plan)`` returns (e.g. published noisy labels), each a label overlay sharing the
    import's features; returns (the import's URI and then the copies', the import's noise spec).

    The target is checked first and every input (the plan and all copies' labels) is read and
    checked before anything is written; the copies are the versions after the import's.
    """
    if rows_per_group is not None and rows_per_group < 1:
        raise FeatureStoreError("--row-group-rows must be >= 1")
    check_target(store, name, version)
    plan = read_plan()
    copies = read_copies(plan)
    noise = plan.apply_noise(
        noise_mode,
        noise_rate,
        noise_seed,
        flip_map=None if flip_map is None else parse_flip_map(flip_map, plan.num_classes),
    )
    uri = write_version(store, name, plan, version=version, rows_per_group=rows_per_group)
    return [uri, *(write_label_copy(uri, label, spec) for label, spec in copies)], noise


def noisy_copy(
    uri: str,
    *,
    mode: str | None,
    rate: float,
    seed: int,
    flip_map: str | None = None,
    name: str | None = None,
    version: int | None = None,
) -> str:
    """A copy of version ``uri`` with new noisy train labels (features shared); returns its URI.

    ``flip_map`` (``"0:1,1:2"``) is read against the base version's number of classes.
    """
    flips = None
    if flip_map is not None:
        flips = parse_flip_map(flip_map, open_dataset(uri, verify=False).num_classes)
    return write_noisy_copy(
        uri, mode=mode, rate=rate, seed=seed, flip_map=flips, name=name, version=version
    )
