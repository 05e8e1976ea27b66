"""Density sampling (Sachdeva et al. 2024, "How to Train Data-Efficient LLMs"): the ISA paper's strongest baseline.

A kernel density sketch over the embeddings: R rows of locality-sensitive hashes, each row K concatenated p-stable
(Gaussian) projections floor((a·x + b) / w) (Datar et al. 2004). Two items share a row's bucket with probability
k(‖x − y‖)^K, k the p-stable collision probability, so an item's bucket counts averaged over the rows, over n,
estimate its kernel density (the kernel sum, the item itself included). The sampler draws items with probability
proportional to the inverse propensity 1 / density: rare regions up, redundant ones down.

Buckets are counted exactly (no modulo-B table: the data fit in memory); `estimator="exact"` computes the kernel
sums the sketch estimates, O(n²). The bucket width w is `bandwidth` × the median distance between items, so one
setting suits unit-norm sentence vectors and LLM hidden states alike. Defaults K = 4, w = 1 × median, R = 256,
measured on MiniLM vectors of HH-RLHF completions (bench/results/isa*.txt): on all 4,616 items they spread the
weights by p90/p10 1.53 (max/min 2.7), the sketch ranks items as the exact kernel sums do (Spearman 0.94) and the
weights follow the mean distance to the 10 nearest items (Spearman 0.64); K = 1-2 spread the weights by under
1.3x (close to random sampling). A larger K narrows the kernel until an item's own term dominates its sum:
K = 8 spreads more on 4,616 items (1.85, Spearman 0.96 and 0.73) but on 300 items even its exact sums spread by
only 1.12 (K = 4: 1.43), so K = 4 is the default; raise it for tens of thousands of items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from prefsift.engine.embeddings import ITEMS, embed_items
from prefsift.errors import ConfigError
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.scorers.random import seeded_uniform
from prefsift.settings import option

ESTIMATORS = ("sketch", "exact")
# The sketch holds R x K Gaussian projections of each embedding (8 bytes an item and hash): bounded, so a typo'd
# `--param rows=` is one line, not an allocation of terabytes. The defaults (256 x 4) are far inside.
MAX_ROWS, MAX_HASHES, MAX_HASHES_TOTAL = 4096, 64, 16384


@dataclass
class DensityParams(ScorerParams):
    item: str = option("completion", "What one embedding is: completion (prompt + one response; a pair's density "
                                      "is its two sides' mean) or pair.", choices=ITEMS)
    rows: int = option(256, "Hash rows R of the sketch (more: less sketch noise).", low=1, high=MAX_ROWS)
    hashes_per_row: int = option(4, "p-stable hashes concatenated per row K (more: a narrower kernel).", low=1,
                                 high=MAX_HASHES)
    bandwidth: float = option(1.0, "Bucket width w as a multiple of the median distance between items.", low=0,
                              low_open=True)
    estimator: str = option("sketch", "sketch (LSH bucket counts, the paper) or exact (the kernel sums, O(n²)).",
                            choices=ESTIMATORS)
    pca_dim: int | None = option(None, "Reduce the embeddings to this many PCA components first (None: no).", low=1)
    batch_size: int = option(32, "Items per embedding batch.", low=1)

    def check(self) -> None:
        super().check()
        if self.rows * self.hashes_per_row > MAX_HASHES_TOTAL:
            raise ConfigError(f"rows x hashes_per_row must be <= {MAX_HASHES_TOTAL} (got {self.rows} x "
                              f"{self.hashes_per_row}): the sketch holds that many numbers an item")


def median_distance(vectors: np.ndarray, seed: int = 0, sample: int = 2000) -> float:
    """Median Euclidean distance between distinct items, over a seeded sample of at most `sample` of them."""
    rng = np.random.default_rng(seed)
    x = vectors if len(vectors) <= sample else vectors[rng.choice(len(vectors), sample, replace=False)]
    squared = (x * x).sum(1)
    d2 = squared[:, None] + squared[None, :] - 2 * x @ x.T
    upper = d2[np.triu_indices(len(x), 1)]
    return float(np.sqrt(max(np.median(np.clip(upper, 0, None)), 0.0))) if len(upper) else 1.0


def lsh_codes(vectors: np.ndarray, rows: int, hashes_per_row: int, width: float, seed: int = 0) -> np.ndarray:
    """(n, rows, hashes_per_row) integer codes floor((a·x + b) / w), a ~ N(0, I), b ~ U[0, w)."""
    rng = np.random.default_rng(seed)
    d = vectors.shape[1]
    a = rng.standard_normal((d, rows * hashes_per_row))
    b = rng.uniform(0, width, rows * hashes_per_row)
    codes = np.floor((vectors @ a + b) / width).astype(np.int64)
    return codes.reshape(len(vectors), rows, hashes_per_row)


def sketch_density(codes: np.ndarray) -> np.ndarray:
    """Per item: the mean over rows of the number of items sharing its bucket, over n."""
    n, rows, _ = codes.shape
    total = np.zeros(n)
    for r in range(rows):
        _, inverse, counts = np.unique(codes[:, r, :], axis=0, return_inverse=True, return_counts=True)
        total += counts[inverse.reshape(-1)]
    return total / (rows * n)


def collision_probability(distance: np.ndarray, width: float) -> np.ndarray:
    """P[two points at `distance` share a p-stable (Gaussian) hash of width w] (Datar et al. 2004, eq. for p=2):
    1 − 2Φ(−w/c) − 2/(√(2π)·w/c)·(1 − exp(−(w/c)²/2)); 1 at distance 0."""
    c = np.asarray(distance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = width / c
        p = 1 - 2 * ndtr(-t) - 2 / (np.sqrt(2 * np.pi) * t) * (1 - np.exp(-t * t / 2))
    return np.where(c <= 0, 1.0, p)


def exact_density(vectors: np.ndarray, hashes_per_row: int, width: float, chunk: int = 1024) -> np.ndarray:
    """What the sketch estimates: (1/n) Σ_j k(‖x_i − x_j‖)^K."""
    squared = (vectors * vectors).sum(1)
    out = np.zeros(len(vectors))
    for lo in range(0, len(vectors), chunk):
        d2 = squared[lo:lo + chunk, None] + squared[None, :] - 2 * vectors[lo:lo + chunk] @ vectors.T
        out[lo:lo + chunk] = (collision_probability(np.sqrt(np.clip(d2, 0, None)), width) ** hashes_per_row).sum(1)
    return out / len(vectors)


def sampling_keys(weights: np.ndarray, keys, seed: int) -> np.ndarray:
    """Efraimidis-Spirakis keys log(u)/w (the log of u^(1/w)): the k largest are a weighted sample of k without
    replacement. u is uniform, seeded per key, so the sample does not depend on the table's order."""
    u = np.clip(seeded_uniform([f"density:{k}" for k in keys], seed), 1e-300, None)
    return np.log(u) / np.asarray(weights, dtype=np.float64)


@register
class DensityScorer(Scorer):
    name = "density"
    needs = ("embedder",)
    columns = ("density", "density_weight", "density_kde", "density_chosen", "density_rejected")
    Params = DensityParams

    def __init__(self, params: DensityParams | None = None) -> None:
        super().__init__(params)
        if self.params.item == "pair":
            self.columns = ("density", "density_weight", "density_kde")  # type: ignore[misc]

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        # the embedding pass: two items a pair (each prompt + one response) or one (prompt + both)
        return (2.0 if self.params.item == "completion" else 1.0) * n_pairs

    def selection_rule(self) -> dict:
        return {"rule": "top", "column": "density"}

    def densities(self, vectors: np.ndarray, seed: int) -> np.ndarray:
        p = self.params
        width = p.bandwidth * median_distance(vectors, seed)
        if p.estimator == "exact":
            return exact_density(vectors, p.hashes_per_row, width)
        return sketch_density(lsh_codes(vectors, p.rows, p.hashes_per_row, width, seed))

    def score(self, resources) -> dict[str, np.ndarray]:
        p, seed = self.params, resources.seed
        sides = embed_items(resources, p.item, pca_dim=p.pca_dim, batch_size=p.batch_size)
        names = list(sides)
        kde = dict(zip(names, np.split(self.densities(np.concatenate([sides[s] for s in names]), seed), len(names)),
                       strict=True))
        ids = list(resources.pairs.pairs["pair_id"])
        if p.item == "pair":
            pair_kde = kde["pair"]
        else:
            pair_kde = (kde["chosen"] + kde["rejected"]) / 2
        out = {"density": sampling_keys(1 / pair_kde, ids, seed), "density_weight": 1 / pair_kde,
               "density_kde": pair_kde}
        if p.item == "completion":
            for side in ("chosen", "rejected"):
                out[f"density_{side}"] = sampling_keys(1 / kde[side], [f"{i}:{side}" for i in ids], seed)
        return out
