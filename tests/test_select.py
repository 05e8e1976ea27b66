"""Selection rules: against hand-built expectations."""

from __future__ import annotations

import numpy as np
import pytest

from prefsift.errors import ConfigError
from prefsift.select import percentile_ranks, select_indices


def table(values, ids=None):
    ids = ids or [f"p{i:02d}" for i in range(len(values))]
    return {"pair_id": ids, "s": np.asarray(values, dtype=float)}


def test_top_and_bottom_break_ties_by_pair_id():
    scores = table([1.0, 3.0, 3.0, 2.0, 3.0], ["e", "c", "a", "d", "b"])
    assert select_indices(scores, "top", column="s", count=2).tolist() == [2, 4]  # pair_ids a and b of the 3.0s
    assert select_indices(scores, "bottom", column="s", count=2).tolist() == [0, 3]
    assert select_indices(scores, "top", column="s", fraction=0.6).tolist() == [1, 2, 4]


def test_band_by_fraction_is_the_middle_of_the_ranking():
    scores = table(np.arange(10.0))
    assert select_indices(scores, "band", column="s", fraction=0.4).tolist() == [3, 4, 5, 6]


def test_band_by_cutoffs_uses_percentile_ranks():
    values = np.random.default_rng(0).normal(size=101)
    scores = table(values)
    rows = select_indices(scores, "band", column="s", low=0.1, high=0.9)
    lo, hi = np.sort(values)[10], np.sort(values)[90]
    assert set(rows) == set(np.flatnonzero((values >= lo) & (values <= hi)))
    assert len(rows) == 81


def test_intersection_by_cutoffs_is_the_and_of_bands():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200), rng.normal(size=200)
    scores = {"pair_id": [f"{i:03d}" for i in range(200)], "a": a, "b": b}
    rows = select_indices(scores, "intersection", columns=["a", "b"], low=0.1, high=0.9)
    # continuous scores have no ties: rank r/199 in [0.1, 0.9] is r in 20..179 of each sorted column
    inside = [(v >= np.sort(v)[20]) & (v <= np.sort(v)[179]) for v in (a, b)]
    assert rows.tolist() == np.flatnonzero(inside[0] & inside[1]).tolist()
    assert 0.55 < len(rows) / 200 < 0.75  # independent scores: ~0.8 × 0.8


def test_intersection_by_count_is_a_symmetric_trim():
    rng = np.random.default_rng(2)
    scores = {"pair_id": [f"{i:03d}" for i in range(300)], "a": rng.normal(size=300), "b": rng.normal(size=300)}
    rows = select_indices(scores, "intersection", columns=["a", "b"], count=120)
    assert len(rows) == 120
    ranks = np.stack([percentile_ranks(scores["a"]), percentile_ranks(scores["b"])])
    extremeness = np.abs(ranks - 0.5).max(axis=0)
    outside = np.setdiff1d(np.arange(300), rows)
    assert extremeness[rows].max() <= extremeness[outside].min()


def test_nan_scores_are_never_selected():
    scores = table([np.nan, 5.0, 1.0, np.nan, 3.0])
    assert select_indices(scores, "top", column="s", count=10).tolist() == [1, 2, 4]
    assert 0 not in select_indices(scores, "band", column="s", low=0.0, high=1.0)


def test_same_scores_in_another_order_give_the_same_subset():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 5, size=50).astype(float)  # many ties
    ids = [f"id{i}" for i in range(50)]
    perm = rng.permutation(50)
    first = {ids[i] for i in select_indices(table(values, ids), "band", column="s", fraction=0.3)}
    shuffled = table(values[perm], [ids[i] for i in perm])
    second = {shuffled["pair_id"][i] for i in select_indices(shuffled, "band", column="s", fraction=0.3)}
    assert first == second


@pytest.mark.parametrize("kwargs, message", [
    ({"rule": "top", "column": "s", "fraction": 0.0}, "fraction must be in"),
    ({"rule": "top", "column": "s", "fraction": 1.5}, "fraction must be in"),
    ({"rule": "top", "column": "s"}, "exactly one of"),
    ({"rule": "nope", "column": "s", "count": 1}, "unknown rule 'nope'"),
    ({"rule": "top", "column": "zz", "count": 1}, "no score column 'zz' \\(columns: s\\)"),
    ({"rule": "band", "column": "s", "low": 0.9, "high": 0.1}, "0 <= low < high <= 1"),
    ({"rule": "intersection", "columns": ["s"], "count": 1}, "at least two columns"),
])
def test_bad_selection_options(kwargs, message):
    rule = kwargs.pop("rule")
    with pytest.raises(ConfigError, match=message):
        select_indices(table([1.0, 2.0]), rule, **kwargs)
