"""Exact influence (TIF paper): `if` keeps the top of IF(d) = β(1 − σ(Δ_θ(d)))·⟨ḡ_val, g_w − g_l⟩, `tif` its middle
band (the paper's truncated influence: the top overfits the validation set, the bottom is noise).

Computed at forward-pass cost by `prefsift.engine.influence`: one backward pass over the validation pairs for ḡ_val,
then a central difference (two log-prob passes on perturbed weights), a one-sided one (one pass, against the
policy's own) or forward-mode AD a training pair.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prefsift.engine.influence import DEFAULT_STEP, METHODS, SCOPES
from prefsift.scorers.base import BandParams, Scorer, ScorerParams, register
from prefsift.settings import option


@dataclasses.dataclass
class InfluenceParams(ScorerParams):
    """How ⟨ḡ_val, g_w − g_l⟩ is computed and over which parameters."""

    method: str = option("finite-difference", "finite-difference: two fp32 log-prob passes on weights moved by "
                         "±ε·ḡ_val; one-sided: the +ε pass only, against the policy's own pass; jvp: forward-mode AD "
                         "(exact; eager attention); per-example: one backward pass a pair (slow, the reference).",
                         choices=METHODS)
    step: float | None = option(None, "Finite-difference step relative to the weights: ε·‖ḡ_val‖ = step·‖θ_scope‖. "
                                "Unset: chosen once on the 4 check pairs against their per-example gradients, a decade "
                                f"at a time from {DEFAULT_STEP:g} (one-sided wants a smaller one: on SmolLM2 9% error "
                                "at 1e-5, 0.9% at the chosen 1e-6; bench/results/influence-smollm2-adaptive.json).",
                                low=0.0, high=1.0, low_open=True)
    scope: str = option("all", "Parameters the gradients are taken over: all, lora (names with 'lora_'), last_k "
                        "(the last k transformer layers).", choices=SCOPES)
    last_k: int = option(2, "Transformer layers in scope when scope is last_k.", low=1)


@dataclasses.dataclass
class TruncatedInfluenceParams(InfluenceParams, BandParams):
    """The influence parameters and the percentile band kept."""


def influence_column(resources, params: InfluenceParams, info: dict | None = None) -> np.ndarray:
    """IF of every scored pair under the policy θ, with ḡ_val over the validation pairs; resumable shards (and the
    direction ḡ_val) under resources.out_dir."""
    from prefsift.manifest import tokenizer_fingerprint

    loaded = resources.model("policy")
    validation = resources.get("validation_pairs")
    engine = resources.engine
    # every unperturbed pass first: the policy may be the reference's very object, and its weights move below
    policy, reference = resources.logps("policy"), resources.logps("reference")
    validation_reference = resources.logps("reference", pairs=validation, tag="validation-reference")
    identity = {"fingerprint": loaded.fingerprint, "reference": resources.model("reference").fingerprint,
                "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "max_length": engine.max_length,
                "batch_tokens": engine.batch_tokens, "dtype": str(next(loaded.model.parameters()).dtype),
                "data": resources.pairs.data_hash, "validation": validation.data_hash, "beta": engine.beta,
                "messages": [resources.pairs.conversational, validation.conversational]}
    from prefsift.engine import Engine

    return Engine(engine).influence(loaded.model, loaded.tokenizer, resources.pairs.pairs, validation.pairs,
                                    policy_logps=policy, reference_logps=reference,
                                    validation_reference_logps=validation_reference, beta=engine.beta,
                                    method=params.method, step=params.step, scope=params.scope,
                                    last_k=params.last_k, run_dir=resources.out_dir, identity=identity, info=info)


def influence_passes(params: InfluenceParams, n_pairs: int, n_validation: int) -> float:
    """Pair passes beyond the policy's log-prob pass, as measured on SmolLM2 on a CPU (bench/results/influence.txt):
    ḡ_val, a forward and a backward over the validation pairs' packed rows (2.6-3.2 passes a pair), and per training
    pair two perturbed passes (finite difference), one (one-sided: the policy's own pass is the other side), a dual
    forward (jvp: 2.9-3.6) or a forward and a backward on
    TRL's rows (per-example: 5.4-7.6)."""
    per_pair = {"finite-difference": 2.0, "one-sided": 1.0, "jvp": 3.0, "per-example": 6.0}[params.method]
    return per_pair * n_pairs + 3.0 * n_validation


@register
class InfluenceScorer(Scorer):
    name = "if"
    needs = ("policy", "reference", "validation_pairs")
    columns = ("influence",)
    Params = InfluenceParams  # the top of the influence: the pairs whose step lowers the validation loss most

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        return influence_passes(self.params, n_pairs, n_validation)

    def score(self, resources) -> dict[str, np.ndarray]:
        self.taken: dict = {}  # the step the pass took (chosen on the check pairs when `step` is unset)
        return {"influence": influence_column(resources, self.params, self.taken)}

    def describe(self) -> dict:
        return {**super().describe(), **{f"{k}_taken" if k == "step" else k: v
                                         for k, v in getattr(self, "taken", {}).items()}}


@register
class TruncatedInfluenceScorer(Scorer):
    name = "tif"
    needs = ("policy", "reference", "validation_pairs")
    columns = ("influence",)
    Params = TruncatedInfluenceParams  # a BandParams: the base class's band rule on `influence`

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        return influence_passes(self.params, n_pairs, n_validation)

    def score(self, resources) -> dict[str, np.ndarray]:
        self.taken: dict = {}  # the step the pass took (chosen on the check pairs when `step` is unset)
        return {"influence": influence_column(resources, self.params, self.taken)}

    def describe(self) -> dict:
        return {**super().describe(), **{f"{k}_taken" if k == "step" else k: v
                                         for k, v in getattr(self, "taken", {}).items()}}
