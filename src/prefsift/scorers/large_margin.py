"""Large margin (Deng et al. 2025, "Less is More: Improving LLM Alignment via Preference Data Selection"): the
margin-maximization principle keeps the pairs with the LARGEST reward margin, since noisy (small or reversed)
margins shrink DPO's parameters.

The margin is signed: a pair the model ranks the wrong way (negative margin, a likely flipped label) is the last
kept, as the paper's principle wants. The paper aggregates several margin sources (external reward models and the
implicit DPO margin) into one preference probability; this scorer is its implicit-margin source alone,
IRM(d) = β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))] (`reward-margin` is the external one).
The rule keeps the top.
"""

from __future__ import annotations

import numpy as np

from prefsift.maths import implicit_reward_margin
from prefsift.scorers.base import Scorer, register


@register
class LargeMarginScorer(Scorer):
    name = "large-margin"
    needs = ("policy", "reference")
    columns = ("large_margin",)  # the base class's rule: top

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"large_margin": implicit_reward_margin(resources.logps("policy"), resources.logps("reference"),
                                                       resources.engine.beta)}
