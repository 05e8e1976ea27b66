"""Margin: the dataset's own rating difference (e.g. UltraFeedback's score_chosen − score_rejected), or a
sequence-classification reward model's score difference between chosen and rejected."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefsift.errors import PrefsiftError
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.settings import option

RATING_COLUMNS = ("score_chosen", "score_rejected")


@dataclass
class MarginParams(ScorerParams):
    batch_size: int = option(16, "Pairs per reward-model batch.", low=1)


@register
class MarginScorer(Scorer):
    name = "margin"
    needs = ()  # a reward model is optional: without one, the dataset's rating columns are used
    inputs = "--reward-model, or the data's columns score_chosen and score_rejected"
    columns = ("margin",)
    Params = MarginParams

    def missing_input(self, has_reward_model: bool, columns: list[str]) -> str | None:
        if has_reward_model or all(c in columns for c in RATING_COLUMNS):
            return None
        return f"method '{self.name}' needs a --reward-model or the columns {' and '.join(RATING_COLUMNS)}"

    def score(self, resources) -> dict[str, np.ndarray]:
        if resources.has("reward_model"):
            # one batched pass with resumable shards; chosen_reward / rejected_reward are stored beside the margin
            rewards = resources.rewards("reward_model", batch_size=self.params.batch_size)
            return {"margin": rewards[:, 0] - rewards[:, 1]}
        raw = resources.pairs.raw
        if raw is None or not all(c in raw.column_names for c in RATING_COLUMNS):
            known = ", ".join(raw.column_names) if raw is not None else "none"
            raise PrefsiftError(f"method '{self.name}' needs a --reward-model or the columns score_chosen and "
                                f"score_rejected (columns: {known})")
        try:
            chosen, rejected = (np.asarray(raw[c], dtype=float) for c in RATING_COLUMNS)
        except (TypeError, ValueError):
            raise PrefsiftError("score_chosen and score_rejected must be numbers") from None
        return {"margin": chosen - rejected}
