"""Intervals, paired differences, p-values and corrections against closed forms, numerical integration and
simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as scipy_stats

from prefsift.stats import (
    _threshold,
    adjust,
    annotate,
    bootstrap_interval,
    claims,
    estimate,
    p_values,
    paired_difference,
    summarize,
)


def test_one_seed_matches_the_normal_interval_of_a_mean():
    rng = np.random.default_rng(0)
    outcomes = (rng.random(2000) < 0.3).astype(float)
    interval = estimate(outcomes).interval()
    p, n = outcomes.mean(), len(outcomes)
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # the closed form for a proportion
    assert interval.mean == pytest.approx(p)
    assert interval.half_width == pytest.approx(half, rel=0.01)
    assert estimate(outcomes).df_seeds == 0 and estimate(outcomes).var_seeds == 0.0


def test_the_two_parts_are_the_standard_errors_of_the_seed_means_and_the_item_means():
    rng = np.random.default_rng(1)
    matrix = rng.random((3, 40))
    e = estimate(matrix)
    assert e.var_seeds == pytest.approx(matrix.mean(axis=1).var(ddof=1) / 3)
    assert e.var_items == pytest.approx(matrix.mean(axis=0).var(ddof=1) / 40)
    assert (e.df_seeds, e.df_items) == (2, 39)
    # both parts at the level's t quantiles, combined as Banerjee's interval
    half = np.sqrt(scipy_stats.t.isf(0.025, 2) ** 2 * e.var_seeds + scipy_stats.t.isf(0.025, 39) ** 2 * e.var_items)
    assert e.interval().half_width == pytest.approx(half)
    with_gap = matrix.copy()
    with_gap[1, 5] = np.nan  # an item one seed did not evaluate is left out for every seed
    assert estimate(with_gap).df_items == 38
    assert estimate(with_gap).mean == pytest.approx(np.delete(matrix, 5, axis=1).mean())


def test_holds_its_level_under_seed_level_noise_where_the_bootstrap_does_not():
    """A null difference whose noise is mostly the seeds' (each of 3 training seeds shifts every item: the
    training noise of the demo's seed-dominated contrasts): our test rejects at most about 5% of the time; the
    two-way bootstrap, resampling 3 seeds into 10 distinct draws, excludes 0 about a fifth of the time."""
    rng = np.random.default_rng(1)
    trials = 200
    differences = rng.normal(0, 0.1, (trials, 3, 1)) + rng.normal(0, 0.5, (trials, 3, 500))
    ours = np.mean([estimate(d).p_value() < 0.05 for d in differences])
    boot = np.mean([bootstrap_interval(d, n_bootstrap=400, seed=t).significant for t, d in enumerate(differences)])
    assert ours <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / trials)
    assert boot >= 0.15


def test_the_test_holds_its_level_whichever_part_dominates():
    """Banerjee's test with 3 seeds (2 degrees of freedom) and the items' part known: its rejection rate, integrated
    exactly over the seeds' chi-square, stays at or below alpha for every split of the variance between seeds and
    items, down to the levels a correction for hundreds of tests uses."""
    for df in (1, 2, 4):
        for alpha in (0.05, 1e-3, 1e-5):
            for rho in np.logspace(-3, 4, 15):  # var(seed part) / var(item part)

                def rejection(w, alpha=alpha, rho=rho, df=df):  # w: the seed part's chi-square over its df
                    threshold = _threshold(alpha, rho * w, 1.0, df, 10**9, 2)
                    return 2 * scipy_stats.norm.sf(threshold / np.sqrt(rho + 1)) * scipy_stats.chi2.pdf(w * df,
                                                                                                       df) * df

                size = integrate.quad(rejection, 0, np.inf, limit=400, epsabs=alpha * 1e-6)[0]
                assert size <= alpha * 1.01, (df, alpha, rho, size / alpha)


def test_seed_dominated_nulls_simulated():
    """Under a null whose noise is mostly the seeds' (and one where it is the items'), the p-value is uniform or
    conservative at the levels used: simulated over 8 000 paired (3, 500) matrices each."""
    rng = np.random.default_rng(2)
    seeds, items, n = 3, 500, 8000
    for shift_sd in (0.0, 0.1):
        d = rng.normal(0, shift_sd, (n, seeds, 1)) + rng.normal(0, 0.5, (n, seeds, items))
        mean = d.mean(axis=(1, 2))
        var_seeds = d.mean(axis=2).var(axis=1, ddof=1) / seeds
        var_items = d.mean(axis=1).var(axis=1, ddof=1) / items
        p = p_values(np.abs(mean), var_seeds, var_items, seeds - 1, items - 1)
        for alpha in (0.05, 0.01):
            assert (p < alpha).mean() <= alpha + 2.6 * np.sqrt(alpha * (1 - alpha) / n), (shift_sd, alpha)


def test_p_values_invert_the_interval():
    rng = np.random.default_rng(3)
    for _ in range(20):
        e = paired_difference(rng.random((3, 200)) + rng.normal(0.05, 0.05), rng.random((3, 200)))
        interval = e.interval()
        assert (e.p_value() < 0.05) == (interval.low > 0 or interval.high < 0)
        for alpha in (0.3, 0.01):  # at its p-value the threshold equals the distance from 0
            assert np.isclose(float(_threshold(e.p_value(), e.var_seeds, e.var_items, 2, 199, 2)), abs(e.mean),
                              rtol=1e-6) or e.p_value() in (0.0, 1.0), alpha
    one_sided = e.p_value(null=e.mean - 0.01, alternative="greater")
    assert one_sided == pytest.approx(e.p_value(null=e.mean - 0.01) / 2, rel=1e-6)
    assert e.p_value(null=e.mean + 0.01, alternative="greater") == 1.0


def test_paired_difference_cancels_what_the_two_share():
    rng = np.random.default_rng(2)
    base = (rng.random((3, 400)) < 0.5).astype(float)
    same = paired_difference(base, base)
    interval = same.interval()
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0) and same.p_value() == 1.0
    better = base.copy()
    better[:, :40] = 1.0  # 40 prompts a seed turned into wins
    diff = paired_difference(better, base)
    assert diff.mean == pytest.approx((better - base).mean())
    # the same 40 prompts on every seed: the seeds agree, and the items' part carries the test; a p-value that small
    # is as far as 2 degrees of freedom for the seeds' (tiny) part let it go
    assert diff.p_value() < 1e-3 and diff.interval().low > 0
    with pytest.raises(ValueError, match="same"):
        paired_difference(base, base[:, :10])


def test_holm_and_benjamini_hochberg_adjusted_p_values():
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 4·0.005, 3·0.01, max(2·0.03, ·), 1·0.04
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert len(adjust([], "holm")) == 0
    with pytest.raises(ValueError, match="holm"):
        adjust(p, "bonferroni")


def _record(method, budget, seed, wins, compute, start="warmup"):
    return {"method": method, "budget": budget, "fraction": 0.1, "seed": seed, "start_from": start,
            "n_pairs": 10, "compute": compute, "win_outcomes": wins}


def test_summarize_pairs_by_seed_and_budget():
    rng = np.random.default_rng(3)
    base = {s: (rng.random(200) < 0.5).astype(float).tolist() for s in (0, 1)}
    records = [_record("full", "full", s, base[s], 100.0) for s in (0, 1)]
    records += [_record("random", "0.1", s, base[s], 40.0) for s in (0, 1)]
    records += [_record("oracle", "0.1", s, [1.0] * 200, 50.0) for s in (0, 1)]
    rows = {r["method"]: r for r in summarize(records, ceilings={"oracle"})}
    assert rows["oracle"]["ceiling"] and not rows["random"]["ceiling"]
    assert rows["oracle"]["win_rate"] == 1.0 and rows["oracle"]["win_rate_vs_random_low"] > 0
    assert "win_rate_vs_random_verdict" not in rows["oracle"]  # a ceiling is outside the family: no verdict
    assert rows["oracle"]["compute_ratio"] == 0.5 and rows["random"]["compute_ratio"] == 0.4
    assert "win_rate_vs_random" not in rows["random"]  # not against itself
    assert rows["random"]["win_rate_vs_full"] == 0.0 and rows["random"]["win_rate_vs_full_verdict"] is None
    assert rows["random"]["win_rate_vs_full_p"] == 1.0 and rows["random"]["win_rate_vs_full_df_seeds"] == 1
    # identical outcomes: non-inferior to full at any margin, and so shown
    assert rows["random"]["win_rate_vs_full_noninferior"] is True
    assert not any(k.endswith("_significant") for row in rows.values() for k in row)  # no uncorrected flags


def test_differences_pair_the_same_seeds_when_a_row_lacks_one():
    """A row trained under seeds {0, 1} against random trained under {0, 2} (a training that moved nothing leaves no
    record): its difference from random pairs seed 0 with seed 0 only, and from full seeds 0 and 1, never seed 1 with
    seed 2 by position."""
    rng = np.random.default_rng(5)
    outcomes = {(m, s): (rng.random(300) < p).astype(float).tolist()
                for m, p in (("full", 0.6), ("random", 0.5), ("x", 0.7)) for s in (0, 1, 2)}
    records = [_record("full", "full", s, outcomes["full", s], 100.0) for s in (0, 1, 2)]
    records += [_record("random", "0.1", s, outcomes["random", s], 40.0) for s in (0, 2)]
    records += [_record("x", "0.1", s, outcomes["x", s], 40.0) for s in (0, 1)]
    row = next(r for r in summarize(records) if r["method"] == "x")
    alone = paired_difference(np.asarray([outcomes["x", 0]]), np.asarray([outcomes["random", 0]]))
    assert row["win_rate_vs_random"] == pytest.approx(alone.as_dict("d")["d"])
    assert row["win_rate_vs_random_seeds"] == 1
    both = paired_difference(np.asarray([outcomes["x", 0], outcomes["x", 1]]),
                             np.asarray([outcomes["full", 0], outcomes["full", 1]]))
    assert row["win_rate_vs_full"] == pytest.approx(both.as_dict("d")["d"])
    assert "win_rate_vs_full_seeds" not in row


def test_a_summary_without_variance_parts_makes_no_claims():
    old = [{"start_from": "warmup", "method": "irm", "budget": "0.1", "n_seeds": 3, "win_rate": 0.5,
            "win_rate_vs_random": 0.1, "win_rate_vs_random_low": 0.05, "win_rate_vs_random_high": 0.15,
            "win_rate_vs_random_significant": True}]
    family = claims(old)
    assert family.claims == () and annotate(old, family) == old
    assert "No differences to test" in family.legend()


def test_claims_settings_are_checked():
    with pytest.raises(ValueError, match="correction"):
        claims([], correction="none")
    with pytest.raises(ValueError, match="alpha"):
        claims([], alpha=1.5)
