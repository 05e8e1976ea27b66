"""What a run's row cost, all of it, in pair passes: the compute column of every results table."""

from __future__ import annotations

from prefsift.config import RunConfig
from prefsift.scorers import Scorer


def compute_units(config: RunConfig, scorer: Scorer | None, start: str, n_train: int, n_warmup: int,
                  n_validation: int, n_subset: int) -> dict[str, float]:
    """What a row cost, all of it, in pair passes (one forward pass over one pair's tokens; a DPO training step on a
    pair is three: forward and backward). The reference pass over the training pairs is DPO's own and every row
    pays it; a row pays the warm-up when it starts from it or its score needs it, the validation model when its
    score needs it, each scoring pass, and its own training. A KTO row's 2·n_subset completions cost as many pair
    passes as n_subset DPO pairs, plus KTO's forward over mismatched completions for its KL estimate (one more
    pass over the same tokens, and TRL's reference pass over them)."""
    needs = scorer.needs if scorer is not None else ()
    uses_warmup = start == "warmup" or bool({"policy", "validation"} & set(needs))
    # the reference pass over every training pair is needed by the warm-up and by a score against the reference;
    # a row without either needs it over its own subset only
    kto = scorer is not None and scorer.completion_columns() is not None
    units = {"reference": float(n_train if uses_warmup or "reference" in needs else 0 if kto else n_subset),
             "train": (5.0 if kto else 3.0) * n_subset * config.train.epochs}
    if uses_warmup:
        units["warmup"] = 3.0 * n_warmup * config.warmup_epochs
    if "validation" in needs:
        units["validation"] = 3.0 * n_validation * config.validation_epochs + n_validation
    units["scoring"] = float(n_train * (("policy" in needs) + ("validation" in needs)))
    if scorer is not None:
        units["scoring"] += scorer.compute_passes(n_train, n_validation)
    return units
