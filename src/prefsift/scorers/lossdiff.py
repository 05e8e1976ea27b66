"""LossDiff (TIF paper): ℓ(θ; d) − ℓ(θ_val; d), the DPO loss under the policy minus under the validation model.

θ_val is θ trained further on the validation pairs, so a pair whose loss the validation step lowered (positive
LossDiff) agrees with the validation set. Both losses use the same reference model. It is the preference-pair
form of reducible holdout loss (RHO-LOSS, Mindermann et al. 2022), which keeps the top; the TIF paper keeps the
middle band, arguing that the top overfits the validation set.
"""

from __future__ import annotations

import numpy as np

from prefsift.maths import dpo_loss, implicit_reward_margin
from prefsift.scorers.base import BandParams, Scorer, register


def loss_difference(policy: np.ndarray, validation: np.ndarray, reference: np.ndarray, beta: float) -> np.ndarray:
    return dpo_loss(implicit_reward_margin(policy, reference, beta)) - dpo_loss(
        implicit_reward_margin(validation, reference, beta))


@register
class LossDiffScorer(Scorer):
    name = "lossdiff"
    needs = ("policy", "reference", "validation")
    columns = ("lossdiff",)
    Params = BandParams

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"lossdiff": loss_difference(resources.logps("policy"), resources.logps("validation"),
                                            resources.logps("reference"), resources.engine.beta)}
