"""PNG plots of a training run (matplotlib's non-interactive Agg canvas; no pyplot state).

``history`` is a dict of per-epoch lists: ``epoch``, ``loss``, its two terms (``loss_chl`` and
``loss_center``, or SCBCH's ``loss_bsch`` and ``loss_cscc``), ``valid_map_i2t``,
``valid_map_t2i``, ``valid_map_mean``, ``zero_weight_share``,
``noise_precision``, ``noise_recall``; ``weight_hist_edges`` (bin edges over [0, 1]) and
``weight_hist_clean`` / ``weight_hist_noisy`` (one list of counts per epoch). ``pr_curves`` is
``{"i2t": curve, "t2i": curve}`` with curves from
:func:`pipeline.retrieval.metrics.precision_recall_curve`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

VALID_MAP_PNG = "valid_map.png"
LOSSES_PNG = "loss_terms.png"
PR_PNG = "pr_curves.png"
WEIGHTS_PNG = "spl_weight_density.png"
NOISE_PNG = "noise_detection.png"

_COLORS = {"i2t": "tab:blue", "t2i": "tab:orange", "mean": "tab:gray"}


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _epochs(history: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    y = _floats(history[key])
    x = _floats(history.get("epoch") or range(1, len(y) + 1))
    if x.shape != y.shape:
        raise ValueError(f"history '{key}' has {y.size} values but 'epoch' has {x.size}")
    return x, y


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _warmup_line(ax: Any, warmup_epochs: int | None) -> None:
    if warmup_epochs:
        ax.axvline(warmup_epochs + 0.5, color="0.6", ls=":", lw=1)
        ax.text(
            warmup_epochs + 0.5,
            0.98,
            " weighting on",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="0.4",
        )


def plot_valid_map(
    history: dict[str, Any], path: Path, *, warmup_epochs: int | None = None
) -> Path:
    """Validation MAP per epoch, I2T and T2I (and their mean), best epoch marked."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (("i2t", "image→text"), ("t2i", "text→image"), ("mean", "mean")):
        name = f"valid_map_{key}"
        if name in history:
            x, y = _epochs(history, name)
            ls = "--" if key == "mean" else "-"
            ax.plot(x, y, ls, marker="o", ms=3, color=_COLORS[key], label=f"{label}")
    if "valid_map_mean" in history:
        x, y = _epochs(history, "valid_map_mean")
        if np.isfinite(y).any():
            best = int(np.nanargmax(y))
            ax.plot(
                x[best], y[best], "*", ms=12, color="tab:red", label=f"best (epoch {x[best]:g})"
            )
    _warmup_line(ax, warmup_epochs)
    ax.set(xlabel="epoch", ylabel="MAP (validation)", title="Validation MAP per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


LOSS_TERMS = {
    "loss": "total",
    "loss_chl": "contrastive (CHL)",
    "loss_center": "center aggregation (CAL)",
    "loss_bsch": "bidirectional soft contrastive (BSCH)",
    "loss_cscc": "reliability-weighted classification (CSCC)",
}


def plot_losses(history: dict[str, Any], path: Path, *, warmup_epochs: int | None = None) -> Path:
    """Total loss and its terms per epoch (RSHNL: CHL and center aggregation; SCBCH: BSCH and
    the reliability-weighted classification)."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for key, label in LOSS_TERMS.items():
        if key in history:
            x, y = _epochs(history, key)
            ax.plot(x, y, marker="o", ms=3, label=label)
    _warmup_line(ax, warmup_epochs)
    ax.set(xlabel="epoch", ylabel="mean loss per item", title="Loss terms per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pr_curves(pr_curves: dict[str, Any], path: Path) -> Path:
    """Precision–recall by Hamming radius for each retrieval direction."""
    fig = Figure(figsize=(9.6, 4.0), layout="constrained")
    ax, ax_r = fig.subplots(1, 2)
    for key, curve in pr_curves.items():
        p, r = _floats(curve["precision"]), _floats(curve["recall"])
        ok = np.isfinite(p) & np.isfinite(r)
        label = {"i2t": "image→text", "t2i": "text→image"}.get(key, key)
        color = _COLORS.get(key)
        ax.plot(r[ok], p[ok], marker=".", ms=4, color=color, label=label)
        radius = np.asarray(curve["radius"])
        ax_r.plot(radius[ok], p[ok], color=color, label=f"{label} precision")
        ax_r.plot(radius, r, "--", color=color, label=f"{label} recall")
    bits = next(iter(pr_curves.values()), {}).get("bits", "?")
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title="PR curve (Hamming radius 0..L)",
    )
    ax_r.set(xlabel=f"Hamming radius ({bits} bits)", ylabel="value", ylim=(0, 1.02))
    ax_r.set_title("Precision and recall by radius")
    for a in (ax, ax_r):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def _select_epochs(n: int, at_most: int) -> list[int]:
    if n <= at_most:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, at_most).round()})


def plot_weight_density(history: dict[str, Any], path: Path, *, panels: int = 8) -> Path:
    """SPL weight density per epoch for items with clean vs noisy labels (cf. the paper's Fig. 3).

    One panel per epoch (at most ``panels``, evenly spaced, first and last included); each shows
    the density of the weights of clean-label and of noisy-label items over [0, 1].
    """
    edges = _floats(history["weight_hist_edges"])
    clean = [_floats(h) for h in history["weight_hist_clean"]]
    noisy = [_floats(h) for h in history["weight_hist_noisy"]]
    if len(clean) != len(noisy):
        raise ValueError("weight_hist_clean and weight_hist_noisy have different epoch counts")
    if any(h.size != edges.size - 1 for h in clean + noisy):
        raise ValueError(f"weight histograms must have {edges.size - 1} bins (edges − 1)")
    epochs = list(history.get("epoch") or range(1, len(clean) + 1))
    pick = _select_epochs(len(clean), panels)
    cols = min(4, max(1, len(pick)))
    rows = -(-len(pick) // cols) if pick else 1
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    widths = np.diff(edges)
    for ax, i in zip(axes, pick, strict=False):
        for counts, color, label in (
            (clean[i], "tab:blue", "clean"),
            (noisy[i], "tab:red", "noisy"),
        ):
            total = counts.sum()
            density = counts / (total * widths) if total > 0 else np.zeros_like(counts)
            ax.stairs(density, edges, fill=True, alpha=0.35, color=color)
            ax.stairs(density, edges, color=color, label=f"{label} (n={int(total)})")
        ax.set_title(f"epoch {epochs[i]}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(pick) :]:
        ax.set_visible(False)
    fig.supxlabel("pair weight w_i")
    fig.supylabel("density")
    fig.suptitle("Pair weight density per epoch: clean vs noisy labels")
    return _save(fig, path)


def plot_noise_detection(
    history: dict[str, Any], path: Path, *, warmup_epochs: int | None = None
) -> Path:
    """Precision and recall of "weight = 0" as a noisy-label detector, and the zero-weight share."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (
        ("noise_precision", "precision of the flagged items (low weight ⇒ noisy)"),
        ("noise_recall", "recall of noisy items"),
        ("zero_weight_share", "share of items with weight 0"),
    ):
        if key in history:
            x, y = _epochs(history, key)
            ax.plot(x, y, marker="o", ms=3, label=label)
    _warmup_line(ax, warmup_epochs)
    ax.set(xlabel="epoch", ylabel="value", ylim=(-0.02, 1.02), title="Noise detection by weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_run_plots(
    out_dir: Path,
    *,
    history: dict[str, Any] | None = None,
    pr_curves: dict[str, Any] | None = None,
    warmup_epochs: int | None = None,
) -> tuple[list[Path], list[str]]:
    """Every plot the inputs allow, into ``out_dir``; return (written files, problems).

    A plot whose inputs are missing is skipped; one whose inputs are malformed is reported in
    the problems list instead of failing the others.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Any]] = []
    h = history or {}
    if "valid_map_i2t" in h or "valid_map_t2i" in h:
        jobs.append((VALID_MAP_PNG, lambda p: plot_valid_map(h, p, warmup_epochs=warmup_epochs)))
    if any(k in h for k in LOSS_TERMS):
        jobs.append((LOSSES_PNG, lambda p: plot_losses(h, p, warmup_epochs=warmup_epochs)))
    if all(k in h for k in ("weight_hist_edges", "weight_hist_clean", "weight_hist_noisy")):
        jobs.append((WEIGHTS_PNG, lambda p: plot_weight_density(h, p)))
    if any(k in h for k in ("noise_precision", "noise_recall", "zero_weight_share")):
        jobs.append((NOISE_PNG, lambda p: plot_noise_detection(h, p, warmup_epochs=warmup_epochs)))
    if pr_curves:
        jobs.append((PR_PNG, lambda p: plot_pr_curves(pr_curves, p)))
    written: list[Path] = []
    problems: list[str] = []
    for name, fn in jobs:
        try:
            written.append(fn(out_dir / name))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            log.warning("plot %s skipped: %s", name, e)
            problems.append(f"{name}: {type(e).__name__}: {e}")
    return written, problems
