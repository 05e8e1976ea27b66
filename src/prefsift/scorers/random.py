"""Uniform random scores: the baseline every selection must beat."""

from __future__ import annotations

import hashlib

import numpy as np

from prefsift.scorers.base import Scorer, register


def seeded_uniform(keys, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per key from a hash of (seed, key): independent of the order and size of the table."""
    return np.asarray([int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
                       for key in keys])


@register
class RandomScorer(Scorer):
    name = "random"
    columns = ("random",)

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"random": seeded_uniform(resources.pairs.pairs["pair_id"], resources.seed)}
