"""LossDiff (TIF paper): ℓ(θ; d) − ℓ(θ_val; d), the DPO loss under the policy minus under the validation model.

θ_val is θ trained further on the validation pairs, so a pair whose loss the validation step lowered (negative
LossDiff) agrees with the validation set. Both losses use the same reference model.
"""

from __future__ import annotations

import numpy as np

from prefsift.scorers.base import Scorer, ScoringContext, dpo_loss, implicit_reward_margin, register


def loss_difference(policy: np.ndarray, validation: np.ndarray, reference: np.ndarray, beta: float) -> np.ndarray:
    return dpo_loss(implicit_reward_margin(policy, reference, beta)) - dpo_loss(
        implicit_reward_margin(validation, reference, beta))


@register
class LossDiffScorer(Scorer):
    name = "lossdiff"
    needs = ("policy", "reference", "validation")
    columns = ("lossdiff",)
    default_rule = {"rule": "band"}

    def score(self, context: ScoringContext) -> dict[str, np.ndarray]:
        reference = context.logps("reference")
        return {"lossdiff": loss_difference(context.logps("policy"), context.logps("validation"), reference,
                                            context.beta)}
