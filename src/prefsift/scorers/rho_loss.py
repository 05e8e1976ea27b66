"""RHO-LOSS (Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth Learning, and Not
Yet Learnt") for preference pairs: reducible holdout loss, the training loss minus the loss under a model trained on
holdout data. For a DPO pair and the TIF pipeline's validation model that is LossDiff,
ℓ(θ; d) − ℓ(θ_val; d), under its own name and column; the rule keeps the top: the pairs whose loss the trusted
validation pairs lowered most. A pair whose label disagrees with them (a flip) tends to have its loss raised by
θ_val and to rank low. The paper selects online, each batch by the current model, against a model trained on the
holdout data alone; this is one static selection by the warm-up θ against θ further trained on the validation
pairs, the TIF pipeline's models, so that its two ends cost the same passes. The TIF paper keeps LossDiff's middle
band, arguing that the top overfits the validation set; which end wins on which data is measured
(docs/pipeline.md), not assumed.
"""

from __future__ import annotations

import numpy as np

from prefsift.scorers.base import Scorer, register
from prefsift.scorers.lossdiff import loss_difference


@register
class ReducibleHoldoutLossScorer(Scorer):
    name = "rho-loss"
    needs = ("policy", "reference", "validation")
    columns = ("rho_loss",)  # the base class's rule: top

    def score(self, resources) -> dict[str, np.ndarray]:
        return {"rho_loss": loss_difference(resources.logps("policy"), resources.logps("validation"),
                                            resources.logps("reference"), resources.engine.beta)}
