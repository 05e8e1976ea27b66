"""Reward margin (the TIF paper's strongest baseline, its "reward-model filter"): reward(chosen) − reward(rejected)
from a sequence-classification reward model (`--reward-model`, scored in batches by `prefsift.engine.reward`), or,
without one, the dataset's own ratings (e.g. UltraFeedback's score_chosen − score_rejected). The rule keeps the top.

`margin` is the same scorer under its older name (kept so configs that name it still run); this one writes its own
column, `reward_margin`, so the two can sit in one scores file.
"""

from __future__ import annotations

import numpy as np

from prefsift.scorers.base import register
from prefsift.scorers.margin import MarginScorer


@register
class RewardMarginScorer(MarginScorer):
    name = "reward-margin"
    columns = ("reward_margin",)

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"reward_margin": super().score(resources)["margin"]}
