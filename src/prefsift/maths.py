"""Shared maths below every stage: the DPO margin and loss, and percentile ranks with their middle bands.

Scorers, selection, training and evaluation all import from here; nothing here imports a stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefsift.errors import ConfigError


def implicit_reward_margin(policy: np.ndarray, reference: np.ndarray, beta: float) -> np.ndarray:
    """Δ = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))], from (n, 2) log-prob arrays."""
    return beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))


def dpo_loss(margin: np.ndarray) -> np.ndarray:
    """−log σ(Δ), computed stably; NaN (a pair TRL drops) stays NaN without a warning."""
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, -margin)


def tie_keys(pair_ids: Sequence[str] | None, n: int) -> np.ndarray:
    return np.asarray(pair_ids, dtype=object) if pair_ids is not None else np.arange(n)


def percentile_ranks(values: np.ndarray, pair_ids: Sequence[str] | None = None) -> np.ndarray:
    """Rank of each value among the non-NaN ones, scaled to [0, 1]; NaN stays NaN. Ties ordered by pair_id, so
    the same scores give the same ranks whatever the row order."""
    values = np.asarray(values, dtype=float)
    valid = np.flatnonzero(~np.isnan(values))
    keys = tie_keys(pair_ids, len(values))[valid]
    order = valid[np.lexsort((keys.astype(str), values[valid]))]
    ranks = np.full(len(values), np.nan)
    ranks[order] = np.arange(len(order)) / max(len(order) - 1, 1)
    return ranks


def check_band(low: float, high: float) -> None:
    if not (0.0 <= low < high <= 1.0):
        raise ConfigError(f"band cut-offs must satisfy 0 <= low < high <= 1 (got low={low}, high={high})")


def band_mask(values: np.ndarray, low: float, high: float, pair_ids: Sequence[str] | None = None) -> np.ndarray:
    """True where the value's percentile rank lies in [low, high]."""
    check_band(low, high)
    ranks = percentile_ranks(values, pair_ids)
    with np.errstate(invalid="ignore"):
        return (ranks >= low) & (ranks <= high)
