"""RSHNL losses, one function per equation of the paper (no Ray, no MLflow).

Shapes: B items in a batch, M modalities, L bits, K classes. Codes are the continuous,
L2-normalised outputs of the hash heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


def robust_term(p: torch.Tensor, r: float) -> torch.Tensor:
    """(1 − r)(1 − p^r)/r + r(1 − p): the per-term form shared by Eq 3, 6 and 7."""
    return (1.0 - r) * (1.0 - p.pow(r)) / r + r * (1.0 - p)


def ce_term(p: torch.Tensor) -> torch.Tensor:
    """−log p: the limit of ``robust_term`` as r → 0, i.e. plain cross-entropy (baselines)."""
    return -torch.log(p.clamp_min(1e-12))


def per_term(p: torch.Tensor, r: float, loss_form: str = "robust") -> torch.Tensor:
    """``robust_term`` (the paper's) or ``ce_term`` (the non-robust baseline)."""
    return robust_term(p, r) if loss_form == "robust" else ce_term(p)


def chl_probabilities(
    codes: list[torch.Tensor],
    tau: float = 1.0,
    exclude_self: bool = False,
    all_codes: list[torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """q(i | x_i^m) of Eq 2 for the anchors ``codes`` (M tensors of (B, L)), returned as (M, B).

    The denominator runs over ``all_codes`` (M tensors of (N, L), default: the anchors themselves),
    whose rows ``offset .. offset+B-1`` are the anchors' own items: with codes gathered from every
    worker, N workers × B items give the same q as one batch of N·B.
    As written, the sums over modalities j include j = m, so each code's similarity with itself is
    in both numerator and denominator; ``exclude_self=True`` drops it, as the authors' code does.
    """
    if all_codes is None:
        all_codes, offset = codes, 0
    M, B, N = len(codes), codes[0].shape[0], all_codes[0].shape[0]
    anchors = torch.cat(codes, dim=0)  # row m·B + i is b_i^m
    keys = torch.cat(all_codes, dim=0)  # row j·N + z is b_z^j
    e = torch.exp(anchors @ keys.T / tau)
    dev = anchors.device
    row_item = torch.arange(M * B, device=dev) % B + offset
    row_mod = torch.arange(M * B, device=dev) // B
    col_item = torch.arange(M * N, device=dev) % N
    col_mod = torch.arange(M * N, device=dev) // N
    same_item = row_item[:, None] == col_item[None, :]
    if exclude_self:
        e = e.masked_fill(same_item & (row_mod[:, None] == col_mod[None, :]), 0.0)
    numer = (e * same_item).sum(dim=1)  # Σ_j over the M codes of item i
    denom = e.sum(dim=1)  # Σ_j Σ_z
    return (numer / denom).view(M, B)


def chl_loss(
    codes: list[torch.Tensor],
    tau: float,
    r: float,
    exclude_self: bool = False,
    all_codes: list[torch.Tensor] | None = None,
    offset: int = 0,
    loss_form: str = "robust",
) -> torch.Tensor:
    """L_C of Eq 3: (1/N) Σ_i Σ_m robust_term(q(i | x_i^m)), averaged over the anchors given."""
    q = chl_probabilities(codes, tau, exclude_self, all_codes, offset)
    return per_term(q, r, loss_form).sum(dim=0).mean()


def center_probabilities(h: torch.Tensor, centers: torch.Tensor, tau: float) -> torch.Tensor:
    """p(k | x_i^m) of Eq 4: softmax over the K centers of b_i^m · c_k / τ, shape (B, K)."""
    return torch.softmax(h @ centers.T / tau, dim=1)


def aggregation_probability(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """v_i^m of Eq 5: Σ_k y_ik p(k | x_i^m), shape (B,)."""
    return (labels.to(p.dtype) * p).sum(dim=1)


def pair_losses(
    codes: list[torch.Tensor],
    centers: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    r: float,
    loss_form: str = "robust",
) -> torch.Tensor:
    """ℓ_i of Eq 7 (the summand of Eq 6): Σ_m robust_term(v_i^m), shape (B,)."""
    terms = [
        per_term(
            aggregation_probability(center_probabilities(h, centers, tau), labels), r, loss_form
        )
        for h in codes
    ]
    return torch.stack(terms, dim=0).sum(dim=0)


def predicted_class(codes: list[torch.Tensor], centers: torch.Tensor, tau: float) -> torch.Tensor:
    """argmax_k Σ_m p(k | x_i^m) (Eq 4 summed over modalities), shape (B,), detached."""
    with torch.no_grad():
        return sum(center_probabilities(h, centers, tau) for h in codes).argmax(dim=1)


def center_aggregation_loss(ell: torch.Tensor) -> torch.Tensor:
    """L_p of Eq 6: (1/N) Σ_i ℓ_i."""
    return ell.mean()


def spl_weights(ell: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_i* = max(0, 1 − ℓ_i/γ) of Eq 12; a closed form, so it is not back-propagated through."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return (1.0 - ell.detach() / gamma).clamp_min(0.0)


def hard_weights(ell: torch.Tensor, gamma: float) -> torch.Tensor:
    """RSHNL-S: 1 where Eq 12 gives a positive weight (ℓ_i < γ), else 0."""
    return (ell.detach() < gamma).to(ell.dtype)


def small_loss_weights(ell: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Small-loss selection: 1 for the ⌈keep_rate·B⌉ items of the batch with the smallest ℓ_i."""
    n = ell.shape[0]
    keep = min(n, max(1, math.ceil(keep_rate * n - 1e-9))) if n else 0
    w = torch.zeros_like(ell)
    if keep:
        w[torch.argsort(ell.detach(), stable=True)[:keep]] = 1.0
    return w


def spl_regularizer(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """R(w_i, γ) = γ(½ w_i² − w_i) of Eq 8, per item."""
    return gamma * (0.5 * w * w - w)


def self_paced_loss(ell: torch.Tensor, w: torch.Tensor, gamma: float) -> torch.Tensor:
    """L_S of Eq 7: (1/N) Σ_i w_i ℓ_i + (1/N) Σ_i R(w_i, γ)."""
    return (w * ell).mean() + spl_regularizer(w, gamma).mean()


@dataclass(frozen=True)
class LossMixture:
    """Two-component 1-D Gaussian mixture on ℓ_i: component 0 (lower mean) is "clean".

    A data-driven replacement for the fixed γ of Eq 12, fitted on the previous epoch's ℓ_i of the
    whole training set (every rank fits the same gathered values, so every rank gets the same fit).
    """

    pi: tuple[float, float]
    mean: tuple[float, float]
    var: tuple[float, float]

    def clean_posterior(self, ell: torch.Tensor) -> torch.Tensor:
        """P(clean | ℓ_i), with ℓ_i clipped to [mean_0, mean_1] so the weight falls with ℓ_i."""
        if not self.mean[1] > self.mean[0]:
            return torch.ones_like(ell)
        x = ell.detach().double().clamp(self.mean[0], self.mean[1])
        logs = [
            math.log(self.pi[c]) - 0.5 * math.log(2 * math.pi * self.var[c])
            - (x - self.mean[c]) ** 2 / (2 * self.var[c])
            for c in (0, 1)
        ]  # fmt: skip
        return torch.sigmoid(logs[0] - logs[1]).to(ell.dtype)

    def boundary(self) -> float:
        """The ℓ in [mean_0, mean_1] where P(clean | ℓ) = ½ (bisection); γ for ``gamma_mode``."""
        lo, hi = self.mean
        if not hi > lo:
            return float("inf")
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            p = float(self.clean_posterior(torch.tensor([mid], dtype=torch.float64))[0])
            lo, hi = (mid, hi) if p > 0.5 else (lo, mid)
        return 0.5 * (lo + hi)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossMixture:
        return cls(**{k: tuple(float(v) for v in d[k]) for k in ("pi", "mean", "var")})


def fit_loss_mixture(
    ell: Any, iters: int = 100, var_floor: float = 1e-6, min_pi: float = 1e-3
) -> LossMixture:
    """EM for a two-component Gaussian mixture on ℓ_i (float64, deterministic).

    Starts from the lower and upper halves of the sorted values (means and variances of each
    half, equal shares); component 0 is the one with the lower mean.
    """
    x = np.sort(np.asarray(ell, dtype=np.float64).ravel())
    if x.size < 2 or float(x[-1] - x[0]) <= 0.0:
        m = float(x.mean()) if x.size else 0.0
        return LossMixture((0.5, 0.5), (m, m), (1.0, 1.0))
    floor = max(var_floor, 1e-6 * float(x.var()))
    h = x.size // 2
    mean = np.array([x[:h].mean(), x[h:].mean()])
    var = np.maximum(np.array([x[:h].var(), x[h:].var()]), floor)
    pi = np.array([0.5, 0.5])
    for _ in range(iters):
        logp = np.log(pi) - 0.5 * np.log(2 * np.pi * var) - (x[:, None] - mean) ** 2 / (2 * var)
        logp -= logp.max(axis=1, keepdims=True)
        resp = np.exp(logp)
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        pi = np.clip(nk / x.size, min_pi, 1.0 - min_pi)
        mean = (resp * x[:, None]).sum(axis=0) / nk
        var = np.maximum((resp * (x[:, None] - mean) ** 2).sum(axis=0) / nk, floor)
    o = np.argsort(mean, kind="stable")
    return LossMixture(
        tuple(float(v) for v in pi[o]), tuple(float(v) for v in mean[o]),
        tuple(float(v) for v in var[o]),
    )  # fmt: skip


@dataclass
class LossTerms:
    """The objective of Eq 9 and its parts for one batch."""

    total: torch.Tensor
    chl: torch.Tensor
    center: torch.Tensor  # L_p in warm-up, L_S after
    ell: torch.Tensor  # per-item ℓ_i (detached)
    weights: torch.Tensor  # per-item w_i (Eq 12), also computed during warm-up for monitoring
    warmup: bool
    predicted: torch.Tensor | None = None  # per-item class argmax_k Σ_m p(k | x_i^m), for reports


@dataclass(frozen=True)
class WeightingInputs:
    """What a weighting sees of one batch after warm-up."""

    ell: torch.Tensor  # per-item ℓ_i (Eq 10)
    gamma: float
    keep_rate: float
    mixture: LossMixture | None
    # ℓ_i of each pair toward the model's predicted class (pseudo-labels), computed on demand
    ell_predicted: Callable[[], torch.Tensor] | None = None


def mixture_weights(ell: torch.Tensor, mixture: LossMixture | None) -> torch.Tensor:
    """w_i = P(clean | ℓ_i) under the previous epoch's mixture; all ones without one."""
    return mixture.clean_posterior(ell) if mixture is not None else torch.ones_like(ell)


def _spl(x: WeightingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    w = spl_weights(x.ell, x.gamma)
    return w, self_paced_loss(x.ell, w, x.gamma)


def _hard(x: WeightingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    w = hard_weights(x.ell, x.gamma)
    return w, (w * x.ell).mean()


def _none(x: WeightingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones_like(x.ell), center_aggregation_loss(x.ell)


def _small_loss(x: WeightingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    w = small_loss_weights(x.ell, x.keep_rate)
    return w, (w * x.ell).sum() / w.sum().clamp_min(1.0)


def _mixture(x: WeightingInputs) -> tuple[torch.Tensor, torch.Tensor]:
    w = mixture_weights(x.ell, x.mixture)
    center = (w * x.ell).mean()
    if x.ell_predicted is not None:
        center = center + ((1.0 - w) * x.ell_predicted()).mean()
    return w, center


# After warm-up: weighting name → (w_i, the center term). "spl" is Eq 12 / L_S of Eq 13;
# "hard" RSHNL-S; "none" L_p throughout (RSHNL-3, plain); "small_loss" keeps ``keep_rate`` of
# the batch with the smallest ℓ_i (mean over the kept); "mixture" w_i = P(clean | ℓ_i).
WEIGHTINGS: dict[str, Callable[[WeightingInputs], tuple[torch.Tensor, torch.Tensor]]] = {
    "spl": _spl,
    "hard": _hard,
    "none": _none,
    "small_loss": _small_loss,
    "mixture": _mixture,
}


def rshnl_objective(
    h_image: torch.Tensor,
    h_text: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    warmup_epochs: int,
    gamma: float,
    alpha: float,
    r: float,
    tau: float = 1.0,
    exclude_self: bool = False,
    all_codes: list[torch.Tensor] | None = None,
    offset: int = 0,
    weighting: str = "spl",
    loss_form: str = "robust",
    keep_rate: float = 1.0,
    tau_center: float = 0.0,
    mixture: LossMixture | None = None,
    pseudo_labels: bool = False,
) -> LossTerms:
    """L of Eq 9: L_p + α L_C while epoch < N_w (0-based), then the ``weighting``'s center term
    (:data:`WEIGHTINGS`; "spl": L_S of Eq 13) + α L_C.

    ``all_codes``/``offset``: CHL negatives from every worker (see ``chl_probabilities``).
    ``loss_form`` "ce" swaps the robust terms of Eq 3/7 for −log p. ``tau_center`` > 0 is τ of
    Eq 4 alone (0: ``tau``). During warm-up the weights are still computed, for monitoring.
    ``pseudo_labels`` (mixture weighting, after warm-up): each pair's remaining weight 1 − w_i
    goes to ℓ_i of the model's predicted class (``predicted_class``), so a suspect pair is
    pulled to the center it sits nearest instead of being dropped.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}")
    codes = [h_image, h_text]
    tau_c = tau_center or tau
    l_c = chl_loss(codes, tau, r, exclude_self, all_codes, offset, loss_form)
    ell = pair_losses(codes, centers, labels, tau_c, r, loss_form)
    predicted = predicted_class(codes, centers, tau_c)
    warm = epoch < warmup_epochs
    if warm:
        w = mixture_weights(ell, mixture) if weighting == "mixture" else spl_weights(ell, gamma)
        center = center_aggregation_loss(ell)
    else:

        def ell_predicted() -> torch.Tensor:
            pred = torch.nn.functional.one_hot(predicted, centers.shape[0]).to(ell.dtype)
            return pair_losses(codes, centers, pred, tau_c, r, loss_form)

        inputs = WeightingInputs(
            ell, gamma, keep_rate, mixture, ell_predicted if pseudo_labels else None
        )
        w, center = WEIGHTINGS[weighting](inputs)
    return LossTerms(
        total=center + alpha * l_c,
        chl=l_c.detach(),
        center=center.detach(),
        ell=ell.detach(),
        weights=w,
        warmup=warm,
        predicted=predicted,
    )
