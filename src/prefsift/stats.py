"""Seeds, intervals and paired differences: what makes a method comparison a claim rather than an anecdote.

An evaluation yields one outcome per (seed, item): a win rate's items are prompts (win 1, tie ½, loss 0, judged
against the reference policy's answer), a preference accuracy's are test pairs (1, ½ for a zero margin, 0). Two
methods compared at the same budget share seeds and items, so their difference is taken item by item and seed by
seed (paired), which removes the variance the items and the seeds have in common.

Intervals come from a two-way bootstrap: each replicate resamples the seeds and, independently, the items, and
uses the same item draw for every seed, since every seed is judged on the same prompts and test pairs (resampling
items within each seed apart would divide the items' variance by the number of seeds and make intervals too
narrow). It covers both sources of noise (which model the training seed produced, which prompts were drawn), where a
plain binomial interval over prompts would ignore the first. With one seed it reduces to the bootstrap over items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_BOOTSTRAP = 4000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def significant(self) -> bool:
        """For a difference: the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: round(self.mean, 4), f"{prefix}_low": round(self.low, 4), f"{prefix}_high": round(self.high, 4)}


def _as_matrix(outcomes) -> np.ndarray:
    """(seeds, items) float matrix; NaN marks an item a seed did not evaluate."""
    matrix = np.asarray(outcomes, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"outcomes must be (seeds, items) with at least one item, got shape {matrix.shape}")
    return matrix


def bootstrap_interval(outcomes, *, confidence: float = CONFIDENCE, n_bootstrap: int = N_BOOTSTRAP,
                       seed: int = 0) -> Interval:
    """Mean of a (seeds, items) matrix with a two-way percentile-bootstrap interval (seeds and shared items)."""
    matrix = _as_matrix(outcomes)
    rng = np.random.default_rng(seed)
    n_seeds, n_items = matrix.shape
    seed_draws = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    item_draws = rng.integers(0, n_items, size=(n_bootstrap, 1, n_items))  # one item draw for all the seeds
    resampled = matrix[seed_draws[:, :, None], item_draws]  # (B, seeds, items)
    means = np.nanmean(resampled.reshape(n_bootstrap, -1), axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(float(np.nanmean(matrix)), float(low), float(high))


def paired_difference(outcomes, baseline, **kwargs) -> Interval:
    """Mean of `outcomes − baseline`, paired by seed and item, with the same two-way bootstrap interval."""
    a, b = _as_matrix(outcomes), _as_matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same (seeds, items) shape: {a.shape} vs {b.shape}")
    return bootstrap_interval(a - b, **kwargs)


METRICS = {"win_rate": "win_outcomes", "pref_accuracy": "pref_outcomes"}


def _outcomes(records: list[dict], field: str) -> np.ndarray | None:
    if not records or any(field not in r for r in records):
        return None
    return np.asarray([r[field] for r in sorted(records, key=lambda r: r["seed"])], dtype=float)


def summarize(records: list[dict], ceilings: set[str] | frozenset = frozenset()) -> list[dict]:
    """One row per (start_from, method, budget) over its seeds: each metric's mean and interval, and its paired
    difference from random at the same budget and from the full data (same start, same seeds, same items), marked
    significant when the interval excludes 0. Rows of `ceilings` (selection by hidden labels) are marked."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["start_from"], record["method"], record["budget"]), []).append(record)
    rows = []
    for (start, method, budget), group in groups.items():
        row: dict = {"start_from": start, "method": method, "budget": budget, "ceiling": method in ceilings,
                     "n_seeds": len(group), "fraction": round(float(np.mean([r["fraction"] for r in group])), 3),
                     "n_pairs": round(float(np.mean([r["n_pairs"] for r in group])), 1),
                     "compute": float(np.mean([r["compute"] for r in group]))}
        full = groups.get((start, "full", "full"))
        if full:
            by_seed = {r["seed"]: r["compute"] for r in full}
            row["compute_ratio"] = round(float(np.mean([r["compute"] / by_seed[r["seed"]] for r in group])), 3)
        if all("flipped_kept" in r for r in group):
            row["flipped_kept"] = round(float(np.mean([r["flipped_kept"] for r in group])), 3)
        for metric, field in METRICS.items():
            mine = _outcomes(group, field)
            if mine is None:
                continue
            row.update(bootstrap_interval(mine).as_dict(metric))
            for other, label in (((start, "random", budget), "random"), ((start, "full", "full"), "full")):
                theirs = _outcomes(groups.get(other, []), field)
                if other == (start, method, budget) or theirs is None or theirs.shape != mine.shape:
                    continue
                diff = paired_difference(mine, theirs)
                row.update(diff.as_dict(f"{metric}_vs_{label}"))
                row[f"{metric}_vs_{label}_significant"] = diff.significant
        rows.append(row)
    return rows
