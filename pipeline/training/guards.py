"""Checks that a trained model is fit to be registered: finite losses and weights, live codes.

No Ray, no MLflow: the training driver encodes the test split with :class:`CheckedEncoder` and
calls :func:`model_problems` before it logs or registers anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from pipeline.method.weights import encode


class UnfitModelError(RuntimeError):
    """A trained model failed the checks before registration."""


class TrainingError(RuntimeError):
    """Training did not complete or produced an unusable model; the message says why."""


# The codes must hold at least this share of min(1 bit, the labels' entropy).
MIN_INFORMATION_SHARE = 0.5


def nonfinite_losses(history: Mapping[str, Any]) -> list[str]:
    """One line per loss term (history keys ``loss*``) that is NaN or infinite in some epoch."""
    out = []
    for key in sorted(k for k in history if k.startswith("loss")):
        values = list(history[key] or [])
        bad = [i for i, v in enumerate(values) if not _finite(v)]
        if bad:
            epochs = history.get("epoch") or list(range(1, len(values) + 1))
            first = epochs[bad[0]] if bad[0] < len(epochs) else bad[0] + 1
            out.append(
                f"{key} is {values[bad[0]]} at epoch {first} "
                f"({len(bad)} of {len(values)} epochs non-finite)"
            )
    return out


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """One line naming the arrays (e.g. a model's ``state_dict().items()``) with NaN or infinity,
    or none when every array is finite."""
    bad, total = [], 0
    for name, value in named:
        a = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        total += 1
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad.append(name)
    if not bad:
        return []
    return [f"{len(bad)} of {total} weight tensors hold non-finite values (first: {bad[0]})"]


class CheckedEncoder:
    """``encode_fn(x, modality)`` for :meth:`~pipeline.retrieval.protocol.EvalProtocol.encode`:
    ±1 int8 codes, counting the items whose continuous embedding has a NaN or infinite entry."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 2048) -> None:
        self.model = model
        self.batch_size = batch_size
        self.nonfinite: dict[str, int] = {}
        self.items: dict[str, int] = {}

    def __call__(self, x: np.ndarray, modality: str) -> np.ndarray:
        bad = 0

        def count(h: torch.Tensor) -> None:
            nonlocal bad
            bad += int((~torch.isfinite(h)).any(dim=1).sum())

        codes = encode(self.model, x, modality, self.batch_size, on_embedding=count)
        self.nonfinite[modality] = self.nonfinite.get(modality, 0) + bad
        self.items[modality] = self.items.get(modality, 0) + x.shape[0]
        return codes

    def problems(self) -> list[str]:
        """One line per modality with non-finite embeddings."""
        return [
            f"{m} embeddings are non-finite for {n} of {self.items[m]} test items"
            for m, n in sorted(self.nonfinite.items())
            if n
        ]


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _entropy_bits(rows: np.ndarray) -> float:
    """Entropy (bits) of the empirical distribution of the rows of ``rows`` (n, d)."""
    if rows.shape[0] == 0:
        return 0.0
    _, counts = np.unique(rows.reshape(rows.shape[0], -1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


def code_collapse(codes: np.ndarray, labels: np.ndarray) -> str | None:
    """Why ``codes`` (n, bits) of one modality carry no information, or None when they do.

    Criterion: the entropy of the codes' empirical distribution is below half of min(1 bit,
    the entropy of the labels). One code for every item (0 bits) ties every item in Hamming
    ranking, so retrieval is a random ordering; a code shared by nearly all items is
    almost that. A working model, even an undertrained one, spreads items over several codes
    (at least as many as it separates classes), which is at least the labels' own entropy.
    A split with a single label (0 bits) is never called collapsed.
    """
    n = codes.shape[0]
    if n < 2:
        return None
    h_codes = _entropy_bits(np.asarray(codes))
    h_labels = _entropy_bits(np.asarray(labels))
    floor = MIN_INFORMATION_SHARE * min(1.0, h_labels)
    if h_codes >= floor or floor == 0.0:
        return None
    distinct = len(np.unique(np.asarray(codes).reshape(n, -1), axis=0))
    return (
        f"{distinct} distinct code(s) over {n} items ({h_codes:.3f} bits; labels "
        f"{h_labels:.3f} bits, needed ≥ {floor:.3f})"
    )


def collapsed_codes(codes: tuple[Any, Any]) -> list[str]:
    """One line per modality whose query or database codes collapsed (see :func:`code_collapse`).

    ``codes`` is :meth:`~pipeline.retrieval.protocol.EvalProtocol.encode` output:
    ``((img, txt, labels), ...)`` for the query set and the database (the same tuple for
    set-vs-itself).
    """
    out = []
    query, database = codes
    sets = [("query", query)] if database is query else [("query", query), ("database", database)]
    for split, (img, txt, labels) in sets:
        for modality, c in (("image", img), ("text", txt)):
            why = code_collapse(np.asarray(c), np.asarray(labels))
            if why:
                out.append(f"{split} {modality} codes collapsed: {why}")
    return out


def model_problems(
    history: Mapping[str, Any],
    model: torch.nn.Module,
    encoder: CheckedEncoder,
    codes: tuple[Any, Any],
) -> list[str]:
    """Everything that makes a trained model unfit to register: non-finite loss terms in any
    epoch, non-finite weights or test embeddings, collapsed test codes. Empty when it is fit.

    ``codes`` are the test codes ``encoder`` produced."""
    return (
        nonfinite_losses(history)
        + nonfinite_tensors(model.state_dict().items())
        + encoder.problems()
        + collapsed_codes(codes)
    )
