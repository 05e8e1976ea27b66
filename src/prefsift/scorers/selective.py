"""Selective DPO (Gao et al., ICML 2025, "Principled Data Selection for Alignment: The Hidden Risks of Difficult
Examples"): a pair's difficulty is its held-out DPO loss, and training keeps the easiest, dropping the pairs too
hard for the model's capacity (and, in the paper, trains on them easiest first: `prefsift train --order selective`).

Cross-fitting: the training pairs are split into `folds` parts; for each part a copy of the reference (SFT) model is
trained by DPO (prefsift.train, TRL) on the other parts, and the held-out part's DPO loss −log σ(β·Δ) is computed
under that copy against the reference. Each pair is held out once a seed; the score is its loss averaged over
`seeds` (a fresh split and training seed each). Lower loss = easier, and the rule keeps the bottom.

The defaults are the authors' (github.com/glorgao/SelectiveDPO, curriculum-lens): two halves, each model validated
on the half it did not see, three seeds (six models), the losses averaged; they keep the easiest 50%
(`prefsift select --fraction 0.5`) and train on it easiest first with a SequentialSampler (`--order selective`).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from prefsift.config import TrainConfig
from prefsift.errors import PrefsiftError
from prefsift.maths import dpo_loss, implicit_reward_margin
from prefsift.scorers.base import Scorer, ScorerParams, register
from prefsift.scorers.random import seeded_uniform
from prefsift.settings import option


@dataclasses.dataclass
class SelectiveParams(ScorerParams):
    """The cross-fitting and the trainings it runs (β, max_length and precision are the engine's)."""

    folds: int = option(2, "Parts the pairs are split into; each is scored by a model trained on the others (the "
                           "paper: 2 halves).", low=2)
    seeds: int = option(3, "Repetitions with a fresh split and training seed; the score averages them.", low=1)
    epochs: float = option(1.0, "DPO epochs of each cross-fitting model.", low=0, low_open=True)
    learning_rate: float = option(1e-6, "Learning rate of each cross-fitting model (TRL's default 1e-6).", low=0,
                                  low_open=True)
    batch_size: int = option(8, "Pairs per training step.", low=1)
    lora: bool = option(False, "Train each cross-fitting model as a LoRA adapter (peft) instead of all weights.")


def fold_of(pair_ids, rows: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold (0..folds−1) of each of `rows`: the rows ordered by a seeded hash of their pair_id and dealt round-robin,
    so the folds are balanced and a pair's fold does not depend on the table's row order."""
    keys = seeded_uniform([pair_ids[i] for i in rows], seed)
    fold = np.empty(len(rows), dtype=int)
    fold[np.argsort(keys, kind="stable")] = np.arange(len(rows)) % folds
    return fold


@register
class SelectiveScorer(Scorer):
    name = "selective"
    needs = ("reference",)  # the SFT model the paper's cross-fitting models start from
    columns = ("selective",)
    Params = SelectiveParams

    def selection_rule(self) -> dict:
        return {"rule": "bottom", "column": "selective"}  # the easiest pairs: lowest held-out loss

    def compute_passes(self, n_pairs: int, n_validation: int) -> float:
        """Per seed, `folds` trainings on (folds−1)/folds of the pairs (3 passes a pair a step: forward and backward)
        and one log-prob pass over every held-out pair."""
        p = self.params
        return p.seeds * n_pairs * (3.0 * p.epochs * (p.folds - 1) + 1.0)

    def score(self, resources) -> dict[str, np.ndarray]:
        from prefsift.engine import Engine
        from prefsift.models import LoadedModel
        from prefsift.output import cheaper, progress
        from prefsift.train import train

        p, engine = self.params, resources.engine
        reference = resources.model("reference")
        ref = resources.logps("reference")
        pairs = resources.pairs.pairs
        pair_ids = pairs["pair_id"]
        rows = np.flatnonzero(~np.isnan(ref[:, 0]))  # a pair TRL drops is neither trained on nor scored
        if len(rows) < p.folds:
            raise PrefsiftError(f"method 'selective' splits the pairs into folds={p.folds} parts: it needs at least "
                                f"that many pairs (got {len(rows)} that fit max_length)")
        losses = np.full((p.seeds, len(pairs)), np.nan)
        # the trainings are quiet (TRL's bars would be 2 a seed); one bar over them, with its cost once it is known
        with progress(total=p.seeds * p.folds, desc="selective cross-fitting", unit="training",
                       cheaper=f"fewer --param selective.seeds (now {p.seeds}) or folds (now {p.folds}), "
                               + cheaper(engine.max_length, engine.device)) as bar:
            for s in range(p.seeds):
                seed = resources.seed + s
                fold = fold_of(pair_ids, rows, p.folds, seed)
                config = TrainConfig(learning_rate=p.learning_rate, epochs=p.epochs, batch_size=p.batch_size, seed=seed,
                                     lora=p.lora, gradient_checkpointing=False)
                for k in range(p.folds):
                    fit, held = rows[fold != k], rows[fold == k]
                    copy_ = LoadedModel(copy.deepcopy(reference.model), reference.tokenizer, reference.source,
                                        f"{reference.fingerprint}:selective-{seed}-{k}")
                    trained = train(copy_, pairs.select(fit.tolist()), config, engine, ref_logps=ref[fit],
                                    quiet=True).model
                    held_logps = Engine(engine).logps(trained, reference.tokenizer, pairs.select(held.tolist()),
                                                      desc=f"selective seed {s} fold {k}")
                    losses[s, held] = dpo_loss(implicit_reward_margin(held_logps, ref[held], engine.beta))
                    del trained, copy_
                    bar.update(1)
        scored = ~np.isnan(losses)  # every seed scores every kept pair; a dropped pair stays NaN
        mean = np.where(scored, losses, 0.0).sum(axis=0) / np.maximum(scored.sum(axis=0), 1)
        return {"selective": np.where(scored.any(axis=0), mean, np.nan)}
