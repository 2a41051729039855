"""RSHNL losses, one function per equation of the paper (no Ray, no MLflow).

Shapes: B items in a batch, M modalities, L bits, K classes. Codes are the continuous,
L2-normalised outputs of the hash heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def ell_max(r: float, num_modalities: int = 2) -> float:
    """ℓ_i^max = M(r² − r + 1)/r of Eq 14: the upper bound of ℓ_i, hence of a useful γ."""
    return num_modalities * (r * r - r + 1.0) / r


@dataclass
class LossTerms:
    """The objective of Eq 9 and its parts for one batch."""

    total: torch.Tensor
    chl: torch.Tensor
    center: torch.Tensor  # L_p in warm-up, L_S after
    ell: torch.Tensor  # per-item ℓ_i (detached)
    weights: torch.Tensor  # per-item w_i (Eq 12), also computed during warm-up for monitoring
    warmup: bool


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
) -> LossTerms:
    """L of Eq 9: L_p + α L_C while epoch < N_w (0-based), then L_S + α L_C.

    ``all_codes``/``offset``: CHL negatives from every worker (see ``chl_probabilities``).
    Variants for ablations and baselines after warm-up: ``weighting`` "spl" (Eq 12), "hard"
    (RSHNL-S), "none" (L_p throughout, RSHNL-3 / plain), "small_loss" (keep ``keep_rate`` of the
    batch with the smallest ℓ_i, mean over the kept); ``loss_form`` "ce" swaps the robust terms
    of Eq 3/7 for −log p.
    """
    codes = [h_image, h_text]
    l_c = chl_loss(codes, tau, r, exclude_self, all_codes, offset, loss_form)
    ell = pair_losses(codes, centers, labels, tau, r, loss_form)
    w = spl_weights(ell, gamma)
    warm = epoch < warmup_epochs
    if warm or weighting == "none":
        center = center_aggregation_loss(ell)
    elif weighting == "spl":
        center = self_paced_loss(ell, w, gamma)
    elif weighting == "hard":
        w = hard_weights(ell, gamma)
        center = (w * ell).mean()
    elif weighting == "small_loss":
        w = small_loss_weights(ell, keep_rate)
        center = (w * ell).sum() / w.sum().clamp_min(1.0)
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    if weighting == "none" and not warm:
        w = torch.ones_like(ell)
    return LossTerms(
        total=center + alpha * l_c,
        chl=l_c.detach(),
        center=center.detach(),
        ell=ell.detach(),
        weights=w,
        warmup=warm,
    )
