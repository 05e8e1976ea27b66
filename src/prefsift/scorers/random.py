"""Uniform random scores: the baseline every selection must beat."""

from __future__ import annotations

import hashlib

import numpy as np

from prefsift.scorers.base import Scorer, ScoringContext, register


@register
class RandomScorer(Scorer):
    name = "random"
    columns = ("random",)
    default_rule = {"rule": "top"}

    def score(self, context: ScoringContext) -> dict[str, np.ndarray]:
        # Hash of (seed, pair_id): a pair keeps its score whatever the order or size of the table it sits in.
        values = [int.from_bytes(hashlib.sha256(f"{context.seed}:{pid}".encode()).digest()[:8], "big") / 2**64
                  for pid in context.pairs["pair_id"]]
        return {"random": np.asarray(values)}
