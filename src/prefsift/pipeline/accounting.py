"""What a run's row cost, all of it: the compute column of every results table.

Two measures of the same parts. `measured_compute` is the column: seconds the run itself measured for each part
(a training's own wall time, a pass's own wall time), so a training counts at what it actually cost on this
machine, not at a fixed multiple of a forward pass (one epoch of DPO training cost 7.7 scoring passes of the same
pairs on an H200, not 3). The same parts in the CPU seconds the process spent on them (`compute_cpu`) sit beside it:
on a machine others share, wall seconds swing with their load and CPU seconds much less. `pair_passes` is the
nominal count beside them (one forward pass over one pair's tokens; a
DPO step on a pair taken as three), for reading a table across machines.

Shared work (the reference pass, the warm-up, the validation model, a scoring pass) is charged in full to every row
that used it: a row's cost is what a user running that row alone would pay. A method scoring a candidate pool
(RunConfig.score_share < 1) is charged the reference pass and its scoring passes over the pool alone, which is what
a run of it alone would compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefsift.config import RunConfig


@dataclass(frozen=True)
class Arm:
    """What a row used: the roles its score needed, whether it trains completions with KTO, whether it starts from
    the warm-up model, and the pairs it trained on (`n_subset` from the training split, `n_validation_pairs` from the
    validation split, which the validation-pair baselines train on)."""

    needs: tuple[str, ...] = ()
    kto: bool = False
    start: str = "reference"
    n_subset: int = 0
    n_validation_pairs: int = 0
    extra_passes: float = 0.0  # a scorer's own passes (influence's, an embedder's), in pair passes
    n_scored: int | None = None  # the pairs its score passed over: the candidate pool (None: every training pair)

    @property
    def uses_warmup(self) -> bool:
        return self.start == "warmup" or bool({"policy", "validation"} & set(self.needs))

    def reference_rows(self, n_train: int) -> int:
        """Training pairs whose reference log-probs the row needs: all it scored (every training pair, or the
        candidate pool, which holds the warm-up's pairs) for the warm-up and for a score against the reference, its
        own subset otherwise (KTO runs its own reference pass inside its training)."""
        if self.uses_warmup or "reference" in self.needs:
            return n_train if self.n_scored is None else self.n_scored
        return 0 if self.kto else self.n_subset

    def reference_share(self, n_train: int) -> float:
        """Share of the training split's reference pass the row needs (`reference_rows` of n_train)."""
        if self.n_scored is None and (self.uses_warmup or "reference" in self.needs):
            return 1.0
        return self.reference_rows(n_train) / max(1, n_train)


@dataclass
class Measured:
    """Seconds the run measured for its shared parts (one seed's; the reference passes are shared by every seed
    and charged at the time the first one took)."""

    reference: float = 0.0  # the reference pass over the training split
    validation_reference: float = 0.0  # the reference pass over the validation pairs
    warmup: float = 0.0  # the warm-up DPO
    validation: float = 0.0  # DPO on the validation pairs from the warm-up model
    scoring: dict[str, float] = field(default_factory=dict)  # method -> its passes and its own scoring time
    reference_rows: int | None = None  # pairs `reference` passed over: the candidate pool alone (None: n_train)


def measured_compute(arm: Arm, measured: Measured, method: str, train_seconds: float, n_train: int
                     ) -> dict[str, float]:
    """A row's cost in measured seconds, by part: the reference passes it needed, the warm-up when it starts from it
    or its score needs it, the validation model when its score needs it, its scoring, its own training."""
    share = (arm.reference_share(n_train) if measured.reference_rows is None  # a share of the pass it measured
             else arm.reference_rows(n_train) / max(1, measured.reference_rows))
    parts = {"reference": measured.reference * share}
    if arm.n_validation_pairs:
        parts["reference"] += measured.validation_reference
    if arm.uses_warmup:
        parts["warmup"] = measured.warmup
    if "validation" in arm.needs:
        parts["validation"] = measured.validation + measured.validation_reference
    parts["scoring"] = measured.scoring.get(method, 0.0)
    parts["train"] = train_seconds
    return {k: round(v, 3) for k, v in parts.items()}


def pair_passes(config: RunConfig, arm: Arm, n_train: int, n_warmup: int, n_validation: int) -> dict[str, float]:
    """The nominal count of the same parts in pair passes (one forward pass over one pair's tokens; a DPO training
    step on a pair is three: forward and backward). A KTO row's 2·n_subset completions cost as many pair passes as
    n_subset DPO pairs, plus KTO's forward over mismatched completions for its KL estimate (one more pass over the
    same tokens, and TRL's reference pass over them)."""
    n_trained = arm.n_subset + arm.n_validation_pairs
    units = {"reference": float(arm.reference_rows(n_train) + arm.n_validation_pairs),
             "train": (5.0 if arm.kto else 3.0) * n_trained * config.train.epochs}
    if arm.uses_warmup:
        units["warmup"] = 3.0 * n_warmup * config.warmup_epochs
    if "validation" in arm.needs:
        units["validation"] = 3.0 * n_validation * config.validation_epochs + n_validation
    n_scored = n_train if arm.n_scored is None else arm.n_scored
    units["scoring"] = float(n_scored * (("policy" in arm.needs) + ("validation" in arm.needs))) + arm.extra_passes
    return units
