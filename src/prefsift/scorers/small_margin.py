"""Small margin (Qi et al. 2025, "Difficulty-Based Preference Data Selection by DPO Implicit Reward Gap"; the same
rule as Yang et al. 2024): keep the pairs whose implicit reward margin is closest to zero, the ones the model cannot
yet tell apart (the hard, informative ones in that reading).

The score is |IRM(d)| = |β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]|, so a pair the policy
ranks the wrong way by a wide margin (likely a flipped label) counts as easy to tell apart, not as small. The rule
keeps the bottom of |IRM| at a fraction or count; `band_high` turns it into a percentile band of |IRM| instead
(e.g. 0.05-0.5: the smaller half without the near-exact ties).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from prefsift.config import option
from prefsift.errors import ConfigError
from prefsift.maths import check_band, implicit_reward_margin
from prefsift.scorers.base import Scorer, ScorerParams, register


@dataclasses.dataclass
class SmallMarginParams(ScorerParams):
    """Bottom of |IRM| (the paper's rule), or a percentile band of it."""

    band_low: float = option(0.0, "Lower percentile of |IRM| kept when band_high is set.", low=0.0, high=1.0)
    band_high: float | None = option(None, "Upper percentile of |IRM| kept; unset: keep the bottom of |IRM| at "
                                           "the --fraction/--count asked (the paper's rule).", low=0.0, high=1.0)

    def check(self) -> None:
        if self.band_high is not None:
            check_band(self.band_low, self.band_high)
        elif self.band_low != 0.0:
            raise ConfigError(f"band_low={self.band_low} needs band_high (a band of |IRM|); without band_high the "
                              "rule keeps the bottom of |IRM|")


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
        return {"small_margin": np.abs(margin)}
