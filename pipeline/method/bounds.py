"""Closed-form bounds of the objective (plain floats, no torch: the config validates with them)."""

from __future__ import annotations


def ell_max(r: float, num_modalities: int = 2) -> float:
    """ℓ_i^max = M(r² − r + 1)/r of Eq 14: the upper bound of ℓ_i, hence of a useful γ."""
    return num_modalities * (r * r - r + 1.0) / r
