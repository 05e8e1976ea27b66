"""Implicit reward margin (TIF paper): IRM(d) = Δ_θ(d), the DPO margin of the policy against the reference."""

from __future__ import annotations

import numpy as np

from prefsift.scorers.base import Scorer, ScoringContext, implicit_reward_margin, register


@register
class ImplicitRewardMarginScorer(Scorer):
    name = "irm"
    needs = ("policy", "reference")
    columns = ("irm",)
    default_rule = {"rule": "band"}  # the paper keeps the middle band

    def score(self, context: ScoringContext) -> dict[str, np.ndarray]:
        margin = implicit_reward_margin(context.logps("policy"), context.logps("reference"), context.beta)
        return {"irm": margin}
