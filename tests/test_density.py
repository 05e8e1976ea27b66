"""Density sampling: the sketch against brute force and against the kernel it estimates, the kernel against Monte
Carlo hashing, and the realised inclusion frequencies of the seeded top-k against the weighted sampling it
stands for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from datasets import Dataset
from helpers import TableEmbedder, make_pairs

from prefsift.data import load_pairs
from prefsift.engine.embeddings import item_texts
from prefsift.resources import Resources
from prefsift.scorers import get_scorer
from prefsift.scorers.density import (
    collision_probability,
    exact_density,
    lsh_codes,
    median_distance,
    sampling_keys,
    sketch_density,
)
from prefsift.scorers.random import seeded_uniform
from prefsift.select import select_indices


def points(n: int = 60, d: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.normal(0, 0.3, (n - 5, d))
    sparse = rng.normal(0, 3.0, (5, d))
    return np.concatenate([dense, sparse])


def test_sketch_counts_equal_a_brute_force_count_of_shared_buckets():
    x = points()
    codes = lsh_codes(x, rows=20, hashes_per_row=2, width=1.0, seed=1)
    n = len(x)
    shared = np.zeros(n)
    for i in range(n):
        for j in range(n):
            shared[i] += sum(bool((codes[i, r] == codes[j, r]).all()) for r in range(20))
    np.testing.assert_allclose(sketch_density(codes), shared / (20 * n))


@pytest.mark.parametrize("distance", [0.3, 1.0, 2.5])
def test_collision_probability_matches_monte_carlo_hashing(distance):
    rng = np.random.default_rng(0)
    width, m = 1.0, 400_000
    projected = rng.standard_normal(m) * distance  # a·(x − y) with a ~ N(0, I)
    offset = rng.uniform(0, width, m)  # b, and the first point's own projection, absorbed by the uniform offset
    same = np.floor(offset / width) == np.floor((offset + projected) / width)
    assert same.mean() == pytest.approx(float(collision_probability(distance, width)), abs=4e-3)
    assert collision_probability(0.0, width) == 1.0


def test_the_sketch_estimates_the_kernel_sums():
    x = points()
    width = median_distance(x)
    for k in (1, 2):
        estimate = sketch_density(lsh_codes(x, rows=3000, hashes_per_row=k, width=width, seed=2))
        exact = exact_density(x, k, width)
        np.testing.assert_allclose(estimate, exact, rtol=0.08)
    # brute force of the kernel sums themselves
    distances = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(exact_density(x, 2, width, chunk=7), (collision_probability(distances, width) ** 2)
                               .mean(1), rtol=1e-6)  # ‖x‖² + ‖y‖² − 2x·y rounds near 0
    assert width == pytest.approx(np.median(distances[np.triu_indices(len(x), 1)]), rel=1e-9)


def successive_sampling_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """Exact inclusion probabilities of drawing k items without replacement, each draw ∝ weight of those left."""
    n = len(weights)
    inclusion = np.zeros(n)
    for sequence in itertools.permutations(range(n), k):
        p, left = 1.0, weights.sum()
        for i in sequence:
            p *= weights[i] / left
            left -= weights[i]
        inclusion[list(sequence)] += p
    return inclusion


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_of_the_keys_realises_weighted_sampling(k):
    weights = np.array([1.0, 2.0, 4.0, 0.5, 8.0, 1.5])
    ids = [f"p{i}" for i in range(len(weights))]
    runs = 4000
    counts = np.zeros(len(weights))
    for seed in range(runs):
        keys = sampling_keys(weights, ids, seed)
        counts[select_indices({"pair_id": ids, "density": keys}, "top", column="density", count=k)] += 1
    expected = successive_sampling_inclusion(weights, k)
    assert expected.sum() == pytest.approx(k)
    sigma = np.sqrt(expected * (1 - expected) / runs)
    np.testing.assert_array_less(np.abs(counts / runs - expected), 4 * sigma + 1e-9)
    if k == 1:
        np.testing.assert_allclose(expected, weights / weights.sum())


def scored(item: str, n: int = 40, seed: int = 0, **params):
    rows = make_pairs(n, seed=seed)
    data = load_pairs(Dataset.from_list(rows))
    rng = np.random.default_rng(seed)
    texts = item_texts(data.pairs, item)
    table = {}
    for values in texts.values():
        vectors = rng.normal(0, 0.2, (len(values), 4)).astype(np.float32)
        vectors[:3] += 5.0  # the first three pairs are far from the rest
        table.update(zip(values, vectors, strict=True))
    scorer = get_scorer("density", item=item, **params)
    out = scorer.score(Resources(data, sources={"embedder": TableEmbedder(table)}, seed=7))
    return data, table, scorer, out


@pytest.mark.parametrize("item", ["completion", "pair"])
def test_rare_pairs_get_the_largest_weights_and_keys_follow_the_seed(item):
    data, table, scorer, out = scored(item, estimator="exact")
    assert set(out) == set(scorer.columns)
    assert out["density_weight"][:3].min() > out["density_weight"][3:].max()
    ids = list(data.pairs["pair_id"])
    u = seeded_uniform([f"density:{i}" for i in ids], 7)
    np.testing.assert_allclose(out["density"], np.log(u) * out["density_kde"], rtol=1e-12)
    texts = item_texts(data.pairs, item)
    vectors = np.concatenate([np.stack([table[t] for t in v]) for v in texts.values()]).astype(np.float64)
    width = median_distance(vectors, 7)
    kde = np.split(exact_density(vectors, scorer.params.hashes_per_row, width), len(texts))
    np.testing.assert_allclose(out["density_kde"], np.mean(kde, axis=0), rtol=1e-12)
    if item == "completion":
        u_chosen = seeded_uniform([f"density:{i}:chosen" for i in ids], 7)
        np.testing.assert_allclose(out["density_chosen"], np.log(u_chosen) * kde[0], rtol=1e-12)
    assert scorer.selection_rule() == {"rule": "top", "column": "density"}


def test_the_sketch_scorer_agrees_with_the_exact_kernel_sums():
    *_, sketch = scored("pair", rows=2000)
    *_, exact = scored("pair", estimator="exact")
    np.testing.assert_allclose(sketch["density_kde"], exact["density_kde"], rtol=0.15)
