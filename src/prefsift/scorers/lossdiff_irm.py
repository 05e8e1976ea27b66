"""LossDiff-IRM (TIF paper): keep a pair only if both LossDiff and IRM fall in their middle bands."""

from __future__ import annotations

import numpy as np

from prefsift.maths import band_mask, implicit_reward_margin
from prefsift.scorers.base import BandParams, Scorer, register
from prefsift.scorers.lossdiff import loss_difference


@register
class LossDiffIRMScorer(Scorer):
    name = "lossdiff-irm"
    needs = ("policy", "reference", "validation")
    columns = ("lossdiff", "irm", "lossdiff_irm")
    Params = BandParams

    def selection_rule(self) -> dict:
        # Bands of 10-90% on each score keep 64% when the scores are independent (the paper's headline share);
        # correlated scores keep more.
        return {"rule": "intersection", "columns": ["lossdiff", "irm"], "low": self.params.band_low,
                "high": self.params.band_high}

    def score(self, resources) -> dict[str, np.ndarray]:
        policy, reference = resources.logps("policy"), resources.logps("reference")
        beta = resources.engine.beta
        lossdiff = loss_difference(policy, resources.logps("validation"), reference, beta)
        irm = implicit_reward_margin(policy, reference, beta)
        ids = resources.pairs.pairs["pair_id"]
        low, high = self.params.band_low, self.params.band_high
        keep = band_mask(lossdiff, low, high, ids) & band_mask(irm, low, high, ids)
        return {"lossdiff": lossdiff, "irm": irm, "lossdiff_irm": keep.astype(np.float64)}
