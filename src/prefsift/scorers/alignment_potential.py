"""Alignment potential (Huang et al., ICML 2025, "Larger or Smaller Reward Margins to Select Preferences for
Alignment?"): how far the model's implicit reward margin still is from the target that an external reward sets.

    M_AP(d) = z(Δr_ex(d)) − w · z(|Δr_θ(d)|)

Δr_ex = r_ex(x, y_w) − r_ex(x, y_l) is the external reward margin: a `--reward-model`'s, or the data's own
score_chosen − score_rejected (what `reward-margin` computes). Δr_θ is the implicit reward margin of the model being
aligned; for DPO that is IRM = β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]. z(·) standardizes
a column over the scored pairs (mean 0, population standard deviation 1) so reward-model units and nats compare.
The rule keeps the top: a large target margin the model has not learnt yet.

This follows the authors' selection script (github.com/Hesse73/Alignment-Potential-Metric, `metric_selection.py`,
metric `rm-logp`; `rm-xlogp` is the weight w, 1.0 there and 2.5 in their evolve-then-select run): the external
margin signed, the implicit one as an absolute value, both z-scored. Their runs follow SimPO's recipe, whose implicit
reward is the length-normalized log-prob without a reference; prefsift trains with DPO, so Δr_θ is DPO's IRM, the
same quantity for the objective being trained. A column with no spread (e.g. IRM when the policy is the reference)
standardizes to zeros: that term carries no information and drops out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prefsift.errors import PrefsiftError
from prefsift.maths import implicit_reward_margin
from prefsift.scorers.base import Scorer, register
from prefsift.scorers.margin import MarginParams, MarginScorer
from prefsift.settings import option


def zscore(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(v − mean) / std over `rows` (population std, as numpy's default); zeros when the column is constant there;
    NaN outside `rows`."""
    out = np.full(len(values), np.nan)
    spread = values[rows].std()
    out[rows] = (values[rows] - values[rows].mean()) / spread if spread > 0 else 0.0
    return out


@dataclasses.dataclass
class AlignmentPotentialParams(MarginParams):
    """The reward model's batch size (from `reward-margin`) and the implicit term's weight."""

    logp_weight: float = option(1.0, "Weight w of the implicit-margin term (the authors' rm-xlogp; 1.0 is their "
                                     "rm-logp).", low=0.0)


@register
class AlignmentPotentialScorer(Scorer):
    name = "alignment-potential"
    needs = ("policy", "reference")  # and a reward model or the data's rating columns (missing_input)
    inputs = "--reward-model, or the data's columns score_chosen and score_rejected"
    columns = ("alignment_potential",)
    Params = AlignmentPotentialParams

    missing_input = MarginScorer.missing_input  # the external margin's sources, named under this method's name

    def score(self, resources) -> dict[str, np.ndarray]:
        raw = resources.pairs.raw
        reason = self.missing_input(resources.has("reward_model"), list(raw.column_names) if raw is not None else [])
        if reason:
            raise PrefsiftError(reason)
        external = MarginScorer(MarginParams(batch_size=self.params.batch_size)).score(resources)["margin"]
        implicit = np.abs(implicit_reward_margin(resources.logps("policy"), resources.logps("reference"),
                                                 resources.engine.beta))
        rows = np.flatnonzero(np.isfinite(external) & np.isfinite(implicit))  # a pair TRL drops has no IRM
        potential = zscore(external, rows) - self.params.logp_weight * zscore(implicit, rows)
        return {"alignment_potential": potential}
