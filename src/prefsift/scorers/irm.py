"""Implicit reward margin (TIF paper): IRM(d) = Δ_θ(d), the DPO margin of the policy against the reference."""

from __future__ import annotations

import numpy as np

from prefsift.maths import implicit_reward_margin
from prefsift.scorers.base import BandParams, Scorer, register


@register
class ImplicitRewardMarginScorer(Scorer):
    name = "irm"
    needs = ("policy", "reference")
    columns = ("irm",)
    Params = BandParams  # the paper keeps the middle band

    def score(self, resources) -> dict[str, np.ndarray]:
        margin = implicit_reward_margin(resources.logps("policy"), resources.logps("reference"),
                                        resources.engine.beta)
        return {"irm": margin}
