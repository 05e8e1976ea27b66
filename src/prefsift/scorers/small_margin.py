"""Small margin (Qi et al. 2025, "Difficulty-Based Preference Data Selection by DPO Implicit Reward Gap"; Yang et al.
2024): keep the pairs with the smallest implicit reward margin, the ones the model finds hardest.

IRM(d) = β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]. The authors' selection script
(github.com/Difficulty-Based-Preference-Data-Select, `src/data_select,py`) sorts the SIGNED gap ascending and keeps the
head, so a pair the model ranks the wrong way comes first: that is the default (`margin=signed`). `margin=absolute`
ranks by |IRM| instead (the pairs closest to a tie; a confidently reversed pair, a likely flipped label, then counts
as easy to tell apart). The rule keeps the bottom at a fraction or count; `band_high` turns it into a percentile band
(e.g. 0.05-0.5 of |IRM|: the smaller half without the near-exact ties).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from prefsift.errors import ConfigError
from prefsift.maths import check_band, implicit_reward_margin
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.settings import option


@dataclasses.dataclass
class SmallMarginParams(ScorerParams):
    """Bottom of the (signed or absolute) IRM, the paper's rule, or a percentile band of it."""

    margin: str = option("signed", "signed: the smallest IRM first, reversed pairs included (the authors' script); "
                                   "absolute: the smallest |IRM| first (closest to a tie).",
                         choices=("signed", "absolute"))
    band_low: float = option(0.0, "Lower percentile of the score kept when band_high is set.", low=0.0, high=1.0)
    band_high: float | None = option(None, "Upper percentile of the score kept; unset: keep the bottom at the "
                                           "--fraction/--count asked (the paper's rule).", low=0.0, high=1.0)

    def check(self) -> None:
        if self.band_high is not None:
            check_band(self.band_low, self.band_high)
        elif self.band_low != 0.0:
            raise ConfigError(f"band_low={self.band_low} needs band_high (a percentile band); without band_high "
                              "the rule keeps the bottom")


@register
class SmallMarginScorer(Scorer):
    name = "small-margin"
    needs = ("policy", "reference")
    columns = ("small_margin",)
    Params = SmallMarginParams

    def selection_rule(self) -> dict[str, Any]:
        if self.params.band_high is not None:
            return {"rule": "band", "column": "small_margin", "low": self.params.band_low,
                    "high": self.params.band_high}
        return {"rule": "bottom", "column": "small_margin"}

    def score(self, resources) -> dict[str, np.ndarray]:
        margin = implicit_reward_margin(resources.logps("policy"), resources.logps("reference"),
                                        resources.engine.beta)
        return {"small_margin": np.abs(margin) if self.params.margin == "absolute" else margin}
