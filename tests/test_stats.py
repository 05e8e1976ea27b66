"""Intervals and paired differences against closed forms and simulation."""

from __future__ import annotations

import numpy as np
import pytest

from prefsift.stats import bootstrap_interval, paired_difference, summarize


def test_one_seed_matches_the_normal_interval_of_a_mean():
    rng = np.random.default_rng(0)
    outcomes = (rng.random(2000) < 0.3).astype(float)
    interval = bootstrap_interval(outcomes)
    p, n = outcomes.mean(), len(outcomes)
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # the closed form for a proportion
    assert interval.mean == pytest.approx(p)
    assert interval.half_width == pytest.approx(half, rel=0.1)


def test_covers_a_mean_with_seed_level_noise():
    """Three seeds, each shifting every item's success probability (training noise): the two-stage interval keeps
    its 95% coverage where an items-only interval would not."""
    rng = np.random.default_rng(1)
    covered = 0
    trials = 100
    for t in range(trials):
        shifts = rng.normal(0, 0.05, size=(4, 1))
        outcomes = (rng.random((4, 300)) < 0.6 + shifts).astype(float)
        interval = bootstrap_interval(outcomes, n_bootstrap=600, seed=t)
        covered += interval.low <= 0.6 <= interval.high
    assert 0.85 <= covered / trials <= 1.0


def test_paired_difference_cancels_what_the_two_share():
    rng = np.random.default_rng(2)
    base = (rng.random((3, 400)) < 0.5).astype(float)
    same = paired_difference(base, base)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.significant
    better = base.copy()
    better[:, :40] = 1.0  # 40 prompts a seed turned into wins
    diff = paired_difference(better, base)
    assert diff.mean == pytest.approx((better - base).mean())
    assert diff.significant and diff.low > 0
    with pytest.raises(ValueError, match="same"):
        paired_difference(base, base[:, :10])


def test_summarize_pairs_by_seed_and_budget():
    def record(method, budget, seed, wins, compute):
        return {"method": method, "budget": budget, "fraction": 0.1, "seed": seed, "start_from": "warmup",
                "n_pairs": 10, "compute": compute, "win_outcomes": wins}

    rng = np.random.default_rng(3)
    base = {s: (rng.random(200) < 0.5).astype(float).tolist() for s in (0, 1)}
    records = [record("full", "full", s, base[s], 100.0) for s in (0, 1)]
    records += [record("random", "0.1", s, base[s], 40.0) for s in (0, 1)]
    records += [record("oracle", "0.1", s, [1.0] * 200, 50.0) for s in (0, 1)]
    rows = {r["method"]: r for r in summarize(records, ceilings={"oracle"})}
    assert rows["oracle"]["ceiling"] and not rows["random"]["ceiling"]
    assert rows["oracle"]["win_rate"] == 1.0 and rows["oracle"]["win_rate_vs_random_significant"]
    assert rows["oracle"]["compute_ratio"] == 0.5 and rows["random"]["compute_ratio"] == 0.4
    assert "win_rate_vs_random" not in rows["random"]  # not against itself
    assert rows["random"]["win_rate_vs_full"] == 0.0 and not rows["random"]["win_rate_vs_full_significant"]
