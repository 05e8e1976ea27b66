"""`prefsift run`: the TIF paper's pipeline from one config, each step a named function over the stages.

(Over 400 lines: the paper's steps and the per-seed loop that runs them, one function a step; the splits and the
compute accounting are their own modules.)

    split → reference passes → warm-up DPO (θ) → validation DPO from θ (θ_val) → score (one score path) →
    budgets → train each subset → evaluate each policy, over every seed → results.json (records and a summary
    with intervals and paired differences), timings.json, results.md, quality_vs_compute.png; per seed, each row's
    subset (seed-S/selected/), what its evaluation saw (seed-S/eval/) and, on request, its model (seed-S/models/)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from transformers import TrainerCallback

from prefsift import __version__
from prefsift.config import EngineConfig, RunConfig, TrainConfig
from prefsift.data import LoadedPairs, data_hash_of
from prefsift.errors import ConfigError, TrainingMovedNothing
from prefsift.evaluate import Judge, RewardModelJudge, evaluate, greedy_answers, write_eval_outputs
from prefsift.manifest import write_manifest
from prefsift.models import LoadedModel, fingerprint_files, load_model
from prefsift.pipeline.accounting import Arm, Measured, measured_compute, pair_passes
from prefsift.pipeline.splits import Splits, hash_order, make_splits, subset
from prefsift.report import NOT_TRAINED, not_trained_line, one_line, write_results
from prefsift.resources import Resources
from prefsift.run_report import summarizable
from prefsift.score import ScoreResult, score_pairs
from prefsift.scorers import Scorer, parse_methods
from prefsift.scorers.random import RandomScorer, seeded_uniform
from prefsift.select import SPLIT_COLUMNS, select_indices, target_count, write_subset
from prefsift.settings import from_dict
from prefsift.stats import settings_of, summarize
from prefsift.train import TrainResult, train


class CheckpointEvaluation(TrainerCallback):
    """Evaluates the model being trained at chosen shares of its steps: the ISA paper's scaling protocol, several
    points of the data-scaling curve from one training run (with one epoch, a share of the steps is a share of the
    data). `evaluate_at(model, share, train_seconds)` gets the model in eval mode with its own forward."""

    def __init__(self, shares: list[float], evaluate_at) -> None:
        self.shares, self.evaluate_at = sorted(shares), evaluate_at
        self.steps: dict[int, float] = {}
        self.started = self.paused = self.paused_cpu = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = {max(1, round(share * state.max_steps)): share for share in self.shares}
        self.started, self.paused, self.paused_cpu = time.perf_counter(), 0.0, 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        share = self.steps.get(state.global_step)
        if share is None:
            return
        began, began_cpu = time.perf_counter(), time.process_time()
        # TRL's fused LM head replaces the instance's forward for training (it returns no logits): generation and
        # the log-prob engine need the model's own forward while they evaluate
        patched = [m for m in {id(m): m for m in (model, getattr(model, "get_base_model", lambda: None)())}.values()
                   if m is not None and "forward" in m.__dict__]
        saved = [m.__dict__.pop("forward") for m in patched]
        model.eval()
        try:
            self.evaluate_at(model, share, began - self.started - self.paused)
        finally:
            model.train()
            for m, forward in zip(patched, saved, strict=True):
                m.forward = forward
            self.paused += time.perf_counter() - began
            self.paused_cpu += time.process_time() - began_cpu


@contextlib.contextmanager
def objects_frozen():
    """The objects alive before a training kept out of the garbage collector's scans while it trains: accelerate
    ends every Trainer.train with gc.collect(), which in a pipeline process (~440k objects: models, tables, scores)
    took 0.8-0.9 s a training on 2 CPU cores, about half of a 200-pair training's cost (bench/warmup_share.py).
    Objects the training creates are collected as usual; the frozen ones return to the collector after it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def trained_copy(parent: LoadedModel, tag: str, pairs, ref_logps: np.ndarray, config: TrainConfig,
                 engine: EngineConfig, save_dir: Path | None = None, callbacks: list | None = None
                 ) -> tuple[LoadedModel, TrainResult, float]:
    """Train a copy of `parent`; returns it, what the training measured and saw (seconds, rows, steps) and the CPU
    seconds this process spent on it (the share of the wall time it computed, on a machine others share). Saved,
    it is fingerprinted by content like any model on disk; in memory, by parent, recipe and data, so resumable
    shards of a run with another recipe are never taken for its own."""
    child = LoadedModel(copy.deepcopy(parent.model), parent.tokenizer, str(save_dir or f"{parent.source}#{tag}"), "")
    cpu = time.process_time()
    with objects_frozen():
        result = train(child, pairs, config, engine, ref_logps=ref_logps, quiet=True, callbacks=callbacks)
    cpu = time.process_time() - cpu
    if save_dir is not None:
        # the whole model (a LoRA adapter merged in): an adapter saved on a merged parent would name the SFT model
        # as its base and reload without the parent's own training
        child.model.save_pretrained(save_dir)
        child.tokenizer.save_pretrained(save_dir)
        child.fingerprint = fingerprint_files(str(save_dir), None)
    else:
        recipe = json.dumps([parent.fingerprint, asdict(config), asdict(engine), data_hash_of(pairs["pair_id"]),
                             __version__], sort_keys=True, default=str)
        child.fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return child, result, cpu


def train_warmup(config: RunConfig, base: LoadedModel, train_data: LoadedPairs, ref_train: np.ndarray, out: Path,
                 log, pool: np.ndarray | None = None) -> tuple[LoadedModel, float, float]:
    """Step 1 of the paper: DPO on (a share of) the training pairs → θ; with a candidate `pool` (its rows), on
    warmup_fraction · n of the pool's pairs, so no reference log-prob outside the pool is needed."""
    n = len(train_data.pairs)
    k = max(1, round(config.warmup_fraction * n))
    if pool is None:
        rows = np.sort(hash_order(list(train_data.pairs["pair_id"]), config.seed + 1)[:k])
    else:
        ids = np.asarray(train_data.pairs["pair_id"], dtype=object)[pool]
        rows = np.sort(pool[hash_order(list(ids), config.seed + 1)[:k]])
    log(f"warm-up DPO on {len(rows)} pairs" + (" of the candidate pool" if pool is not None else ""))
    tc = replace(config.train, seed=config.seed, epochs=config.warmup_epochs)
    model, result, cpu = trained_copy(base, "warmup", train_data.pairs.select(rows.tolist()), ref_train[rows], tc,
                                      config.engine, out / "models" / "warmup" if config.save_models else None)
    return model, result.seconds, cpu


def train_validation_model(config: RunConfig, warmup: LoadedModel, validation: LoadedPairs, ref_val: np.ndarray,
                           out: Path, log) -> tuple[LoadedModel, float, float]:
    """Step 2: DPO on the validation pairs from θ → θ_val (a LoRA adapter on θ, merged, with validation_lora)."""
    log(f"validation DPO on {len(validation.pairs)} pairs from the warm-up model"
        + (" (LoRA)" if config.validation_lora else ""))
    tc = replace(config.train, seed=config.seed, epochs=config.validation_epochs,
                 lora=config.train.lora or config.validation_lora)
    model, result, cpu = trained_copy(warmup, "validation", validation.pairs, ref_val, tc, config.engine,
                                      out / "models" / "validation" if config.save_models else None)
    return model, result.seconds, cpu


def budgets(config: RunConfig, scores: dict[str, np.ndarray], n_train: int, log, n_pool: int | None = None
            ) -> list[tuple[str, float, int | None]]:
    """Step 4: the sizes compared, (label, fraction, count): each fraction, and the share the LossDiff-IRM band rule
    keeps (its own count under each seed, so it is labelled, not numbered). With a candidate pool of `n_pool` pairs
    the rule keeps a share of the pool; its fraction is still written as a share of the training pairs."""
    plans: list[tuple[str, float, int | None]] = [(f"{f:g}", f, None) for f in config.fractions]
    if config.rule_share and "lossdiff_irm" in scores:
        keep = int((scores["lossdiff_irm"] == 1.0).sum())
        if n_pool is None:
            log(f"the LossDiff-IRM band rule keeps {keep} of {n_train} pairs ({keep / n_train:.1%})")
        else:
            log(f"the LossDiff-IRM band rule keeps {keep} of the candidate pool's {n_pool} pairs "
                f"({keep / n_pool:.1%}; {keep / n_train:.1%} of {n_train} training pairs)")
        if keep:
            plans.append(("lossdiff-irm rule", round(keep / n_train, 3), keep))
    return plans


def budget_count(n_usable: int, fraction: float, count: int | None) -> int:
    """Pairs a budget trains: its share of the usable pairs (those whose prompt fits max_length; a dropped pair is
    never selected, so a share of the whole split would train more of the usable ones than the budget says)."""
    return target_count(n_usable, None if count is not None else fraction, count)


def selected_rows(scorer: Scorer, scores: dict[str, np.ndarray], fraction: float, count: int | None,
                  n_usable: int) -> np.ndarray:
    rule = scorer.selection_rule()
    rule.pop("low", None), rule.pop("high", None)  # a budget replaces the rule's own cut-offs
    return select_indices(scores, rule.pop("rule"), **rule, count=budget_count(n_usable, fraction, count))


def selected_completions(scorer: Scorer, scores: dict[str, np.ndarray], fraction: float, count: int | None,
                         n_usable: int | None = None) -> np.ndarray:
    """Indices into the 2n completions (i < n: pair i's chosen, else pair i − n's rejected) that a completion-level
    rule keeps (ISA with KTO, as its paper): twice the pairs a pair-level rule keeps at the same budget, so every
    row of a budget trains on as many completions. `n_usable`: the pairs a fraction is a share of (default: those
    scored; a candidate pool's budget is a share of every usable training pair, which `run` passes)."""
    chosen, rejected = scorer.completion_columns()
    pair_ids = np.asarray(scores["pair_id"], dtype=object)
    n_valid = int(np.isfinite(np.asarray(scores[chosen], dtype=float)).sum())
    k = 2 * min(target_count(n_valid if n_usable is None else n_usable, None if count is not None else fraction,
                             count), n_valid)
    stacked = {"pair_id": np.concatenate([pair_ids + ":chosen", pair_ids + ":rejected"]),
               "completion": np.concatenate([scores[chosen], scores[rejected]])}
    return select_indices(stacked, scorer.selection_rule()["rule"], column="completion", count=min(k, 2 * n_valid))


def completion_items(pairs, items: np.ndarray):
    """KTO rows (prompt, completion, label, pair_id) of the selected completions: a chosen one is desirable."""
    from datasets import Dataset

    n = len(pairs)
    rows = [int(i) % n for i in items]
    picked = pairs.select(rows)
    desirable = [bool(i < n) for i in items]
    return Dataset.from_dict({
        "prompt": picked["prompt"],
        "completion": [c if d else r for c, r, d in zip(picked["chosen"], picked["rejected"], desirable, strict=True)],
        "label": desirable,
        "pair_id": [f"{pid}:{'chosen' if d else 'rejected'}" for pid, d in zip(picked["pair_id"], desirable,
                                                                              strict=True)]})


def _hidden_share(raw, rows: np.ndarray, column: str) -> float | None:
    """Share of the pairs flagged in a hidden column (e.g. the demo's is_flipped) that the subset kept."""
    if raw is None or column not in raw.column_names:
        return None
    flags = np.asarray(raw[column], dtype=bool)
    return float(flags[rows].sum() / flags.sum()) if flags.sum() else None



def artifact_name(method: str, budget: str) -> str:
    """A row's directory name: `irm-0.1`, `lossdiff-irm-rule`, `full`, `validation-only` (its budget is the validation
    split's size, not a share)."""
    if method == budget or budget == "validation":
        return method
    return f"{method}-{budget}".replace(" rule", "-rule").replace(" ", "-")


class Plan(NamedTuple):
    """One row's recipe: the method (a scorer's name, `full`, or a baseline arm of BASELINES), its scorer, its
    budget's label and size (a fraction, or the rule's own count)."""

    name: str
    scorer: Scorer | None
    budget: str
    fraction: float
    count: int | None = None


@dataclass
class ArmData:
    """What a row trains on: pairs (DPO) or completions (KTO), their reference log-probs (None: KTO's own pass),
    the training-split rows it draws on, the validation pairs it adds, and the score columns its subset file keeps."""

    data: Any
    ref_logps: np.ndarray | None
    algo: str
    rows: np.ndarray
    n_validation_pairs: int = 0
    n_completions: int | None = None
    extra: dict = field(default_factory=dict)


def random_rows(scores: dict[str, np.ndarray], usable: np.ndarray, seed: int, fraction: float, count: int | None
                ) -> np.ndarray:
    """The random arm's own subset at a budget (its `random` column when it ran, else the same seeded draw), so
    `random+validation` differs from `random` by the validation pairs only."""
    pair_ids = np.asarray(scores["pair_id"], dtype=object)
    values = scores.get("random")
    if values is None:
        values = np.where(usable, seeded_uniform(pair_ids, seed), np.nan)
    return select_indices({"pair_id": pair_ids, "random": values}, "top", column="random",
                          count=budget_count(int(usable.sum()), fraction, count))


def random_completions(scores: dict[str, np.ndarray], usable: np.ndarray, seed: int, fraction: float,
                       count: int | None) -> np.ndarray:
    """`random-kto`: as many completions as ISA's KTO keeps at the budget (twice the pairs), drawn uniformly from the
    usable pairs' chosen and rejected completions (indices as `selected_completions`'s)."""
    pair_ids = np.asarray(scores["pair_id"], dtype=object)
    stacked = np.concatenate([pair_ids + ":chosen", pair_ids + ":rejected"])
    values = np.where(np.concatenate([usable, usable]), seeded_uniform(stacked, seed), np.nan)
    n_valid = int(usable.sum())
    k = 2 * target_count(n_valid, None if count is not None else fraction, count)
    return select_indices({"pair_id": stacked, "completion": values}, "top", column="completion",
                          count=min(k, 2 * n_valid))


def arm_data(config: RunConfig, plan: Plan, splits: Splits, scores: dict[str, np.ndarray], ref_train: np.ndarray,
             ref_val: np.ndarray | None, n_usable: int | None = None) -> ArmData:
    """Step 5's subset of one row: the method's selection, all usable pairs (`full`), or a baseline arm's.
    `n_usable`: the usable training pairs a budget is a share of (a pooled method's scores cover its candidate pool
    alone, and ref_train may too; default: those ref_train has)."""
    name, scorer, _, fraction, count = plan
    pairs = splits.train.pairs
    usable = ~np.isnan(ref_train[:, 0])
    kto_scorer = scorer is not None and scorer.completion_columns() is not None
    if kto_scorer or name == "random-kto":  # completions, trained with KTO
        if kto_scorer:
            items = selected_completions(scorer, scores, fraction, count, n_usable)
            extra = {name: np.concatenate([scores[c] for c in scorer.completion_columns()])[items]}
        else:
            items = random_completions(scores, usable, config.seed, fraction, count)
            extra = {}
        return ArmData(completion_items(pairs, items), None, "kto", np.unique(items % len(pairs)),
                       n_completions=len(items), extra=extra)
    if name in ("validation-only", "random+validation"):
        if ref_val is None:
            raise ConfigError(f"the {name} baseline trains on the validation pairs: the validation split is empty")
        kept = np.flatnonzero(~np.isnan(ref_val[:, 0]))  # a validation pair TRL would drop is never trained
        validation = splits.validation.pairs.select(kept.tolist()).select_columns(list(SPLIT_COLUMNS))
        if name == "validation-only":
            return ArmData(validation, ref_val[kept], "dpo", np.zeros(0, dtype=int), n_validation_pairs=len(kept))
        from datasets import concatenate_datasets

        rows = random_rows(scores, usable, config.seed, fraction, count)
        drawn = pairs.select(rows.tolist()).select_columns(list(SPLIT_COLUMNS)).cast(validation.features)
        return ArmData(concatenate_datasets([drawn, validation]), np.concatenate([ref_train[rows], ref_val[kept]]),
                       "dpo", rows, n_validation_pairs=len(kept))
    rows = (np.flatnonzero(usable) if scorer is None
            else selected_rows(scorer, scores, fraction, count, int(usable.sum()) if n_usable is None else n_usable))
    extra = {c: scores[c] for c in scorer.columns if c in scores} if scorer is not None else {}  # by table row
    return ArmData(pairs.select(rows.tolist()), ref_train[rows], "dpo", rows, extra=extra)


def train_and_evaluate(config: RunConfig, plan: Plan, start_model: LoadedModel, base: LoadedModel, splits: Splits,
                       scores: dict[str, np.ndarray], ref_train: np.ndarray, ref_test: np.ndarray | None,
                       judge: Judge | None, baseline_answers: list[str] | None, log, *, start: str = "warmup",
                       seed_dir: Path | None = None, quiet: bool = False, ref_val: np.ndarray | None = None,
                       n_usable: int | None = None, n_scored: int | None = None) -> tuple[dict, ArmData]:
    """Steps 5 and 6 for one (method, budget): select, train from `start_model`, evaluate against the reference.
    Returns the row's record (with what its training measured and saw) and what it trained on.

    A training that moved nothing (`TrainingMovedNothing`: no optimizer step, or every step inside the
    learning-rate warm-up) is no result: the record comes back marked `status: "not trained"` with the error's line
    as its `note` and no metrics (the start model, unchanged, is never evaluated in the row's name), and the run goes
    on with its other rows. Any other error still stops the run.

    Under `seed_dir` it keeps what a user takes away: the subset (selected/<method>-<budget>/selected.jsonl, with
    the method's score columns), what the evaluation saw (eval/<start>-<method>-<budget>/: eval_pairs.jsonl,
    answers.jsonl) and, with `save_subset_models`, the trained model (models/<start>-<method>-<budget>/).

    With a candidate pool (RunConfig.score_share < 1), `n_usable` is the usable training pairs of the whole split,
    which a budget is a share of (ref_train and a pooled method's scores may cover the pool alone), and `n_scored`
    the pool's size, recorded on a row that selects from it."""
    name, scorer, budget, fraction, _ = plan
    train_data, has_test = splits.train, ref_test is not None
    n_base = n_usable
    n_usable = int((~np.isnan(ref_train[:, 0])).sum()) if n_usable is None else n_usable
    slug = artifact_name(name, budget)
    save_dir = seed_dir / "models" / f"{start}-{slug}" if seed_dir is not None and config.save_subset_models else None

    def evaluate_model(model, quiet: bool = quiet) -> dict:
        return evaluate(LoadedModel(model, start_model.tokenizer, name, ""), base,
                        test_pairs=splits.test.pairs if has_test else None,
                        prompts=splits.eval_prompts if baseline_answers is not None else None, judge=judge,
                        config=config.eval, engine=config.engine, reference_logps=ref_test,
                        baseline_answers=baseline_answers, quiet=quiet)

    arm = arm_data(config, plan, splits, scores, ref_train, ref_val, n_base)
    if seed_dir is not None:  # the same subset under every start: written once per seed and row
        if arm.algo == "kto" or arm.n_validation_pairs:
            write_subset(seed_dir / "selected" / slug, arm.data, range(len(arm.data)), extra=arm.extra)
        else:
            write_subset(seed_dir / "selected" / slug, train_data.pairs.select_columns(list(SPLIT_COLUMNS)),
                         arm.rows, extra=arm.extra)
    checkpoints: list[dict] = []
    callbacks = []
    if name == "full" and config.checkpoint_shares:  # the data-scaling points of the full run, on the way

        def evaluate_at(model, share: float, seconds: float) -> None:
            checkpoints.append({"method": "full", "budget": f"checkpoint {share:g}", "fraction": share,
                                "n_pairs": round(share * len(arm.rows)), "train_seconds": round(seconds, 3),
                                **_metrics(evaluate_model(model, quiet=True))})
            log("  " + one_line(checkpoints[-1]))

        callbacks = [CheckpointEvaluation(config.checkpoint_shares, evaluate_at)]
    n_pairs = arm.n_completions // 2 if arm.n_completions is not None else len(arm.data)
    record = {"method": name, "budget": budget, "fraction": fraction, "n_pairs": n_pairs, "n_usable": n_usable,
              **({"n_completions": arm.n_completions, "algo": "kto"} if arm.algo == "kto" else {}),
              **({"n_validation_pairs": arm.n_validation_pairs} if arm.n_validation_pairs else {}),
              **({"score_share": config.score_share, "n_scored": n_scored} if n_scored is not None else {})}
    try:
        policy, trained, cpu = trained_copy(start_model, f"{name}-{fraction}", arm.data, arm.ref_logps,
                                            replace(config.train, seed=config.seed, algo=arm.algo), config.engine,
                                            save_dir, callbacks)
    except TrainingMovedNothing as error:  # checkpoints evaluated on the way read the unmoved model: dropped too
        record.update(status=NOT_TRAINED, note=" ".join(str(error).split()))
        log(f"{name} @ {budget}: {NOT_TRAINED}, the run goes on without it: {record['note']}")
        return record, arm
    record |= {"trained": {"rows": trained.rows, "rows_seen": trained.rows_seen, "steps": trained.steps,
                           "epochs": round(trained.epochs_done, 3)},
               # the full run's checkpoint evaluations ran inside its training: not training compute
               "train_seconds": round(trained.seconds - sum(c.paused for c in callbacks), 3),
               "train_cpu_seconds": round(cpu - sum(c.paused_cpu for c in callbacks), 3)}
    log(f"{name} @ {budget}: " + trained_line(record))
    evaluation = evaluate_model(policy.model)
    if seed_dir is not None:
        write_eval_outputs(evaluation, seed_dir / "eval" / f"{start}-{slug}",
                           pair_ids=list(splits.test.pairs["pair_id"]) if has_test else None,
                           prompts=splits.eval_prompts if baseline_answers is not None else None)
    record.update(_metrics(evaluation))
    for column, label in (("is_flipped", "flipped_kept"), ("is_near_tie", "near_tie_kept")):
        share = _hidden_share(train_data.raw, arm.rows, column)
        if share is not None:
            record[label] = round(share, 3)
    log("  " + one_line(record))
    if checkpoints:
        record["checkpoints"] = checkpoints
    return record, arm


def trained_line(record: dict) -> str:
    """What a row's training took in and reached: 'DPO on 24 of 48 usable pairs, 3 steps, 1 epoch', with the pairs
    its steps never reached when they ended inside the first epoch."""
    trained = record["trained"]
    what = (f"KTO on {record['n_completions']} completions of {record['n_pairs']} pairs" if record.get("algo") == "kto"
            else f"DPO on {record['n_pairs']} pairs")
    source = (f" ({record['n_validation_pairs']} of them validation pairs)" if record.get("n_validation_pairs")
              else f" from a candidate pool of {record['n_scored']}" if record.get("n_scored") is not None else "")
    line = (f"{what}{source} of {record['n_usable']} usable training pairs, {trained['steps']} optimizer "
            f"step{'s' if trained['steps'] != 1 else ''}, {trained['epochs']:g} epochs")
    if trained["rows_seen"] < trained["rows"]:
        line += f"; SHORT: its steps reached {trained['rows_seen']} of its {trained['rows']} rows"
    return line


def _metrics(evaluation: dict) -> dict:
    out = {"win_rate": evaluation.get("win_rate"), "pref_accuracy": evaluation.get("pref_accuracy")}
    return out | {k: evaluation[k] for k in ("wins", "ties", "losses", "win_outcomes", "pref_outcomes")
                  if k in evaluation}


def scores_pool(scorer: Scorer) -> bool:
    """Whether a method selects from the candidate pool (RunConfig.score_share < 1): every scorer but random, whose
    draw needs no pass and stands for picking from every pair."""
    return not isinstance(scorer, RandomScorer)


def needs_every_pair(config: RunConfig, scorers: list[Scorer]) -> bool:
    """Whether some row of the run reads training pairs outside the candidate pool (full, random, the random
    baselines), so the training split's reference pass covers every pair; else it covers the pool alone."""
    return (config.score_share >= 1 or config.full or not all(scores_pool(s) for s in scorers)
            or bool({"random+validation", "random-kto"} & set(config.baseline_arms())))


def candidate_pool(pair_ids, share: float, seed: int) -> np.ndarray:
    """The candidate pool's rows (ascending): round(share · n) training pairs drawn by a seeded hash of their pair_id,
    the same for every method of the seed (RunConfig.score_share)."""
    keys = [f"pool:{key}" for key in pair_ids]
    return np.sort(hash_order(keys, seed)[: max(1, round(share * len(keys)))])


def trains_warmup(config: RunConfig, scorers: list[Scorer]) -> bool:
    """Whether the run trains the warm-up model θ: a row starts from it, or a method's score needs it (or θ_val)."""
    return config.start_from in ("warmup", "both") or any({"policy", "validation"} & set(s.needs) for s in scorers)


def check_pool_config(config: RunConfig, scorers: list[Scorer]) -> None:
    """score_share's checks that depend on the methods, one line each, before anything loads: a fractional budget
    of a pooled method (a share of every training pair) must fit the pool, and so must the warm-up's pairs when a
    warm-up is trained. A run of random alone, or one that trains no warm-up, is not held to them."""
    if config.score_share >= 1:
        return
    if config.fractions and any(scores_pool(s) for s in scorers) and max(config.fractions) > config.score_share:
        raise ConfigError(f"fractions: {max(config.fractions):g} of the training pairs cannot be selected from a "
                          f"candidate pool of {config.score_share:g} of them (score_share): raise score_share or "
                          "lower the fraction")
    if trains_warmup(config, scorers) and config.warmup_fraction > config.score_share:
        raise ConfigError(f"warmup_fraction {config.warmup_fraction:g} exceeds score_share {config.score_share:g}: "
                          "the warm-up trains on pairs of the candidate pool; raise score_share or lower "
                          "warmup_fraction")


def check_pool_budgets(config: RunConfig, n_train: int, n_usable: int, n_pool: int, n_pool_usable: int) -> None:
    """Refuse, in one line, a candidate pool (of `n_pool` pairs, `n_pool_usable` of them usable) that a pooled
    method's fractional budget (a share of the `n_usable` usable training pairs) does not fit: checked before any
    model of the seed is trained, and the same whether or not a row reads every pair (the budget is a share of
    every usable pair either way)."""
    if not n_pool_usable:
        raise ConfigError(f"every pair of the candidate pool of seed {config.seed} ({n_pool} pairs) has a prompt "
                          f"that fills max_length={config.engine.max_length}: raise max_length or score_share")
    for fraction in config.fractions:
        k = budget_count(n_usable, fraction, None)
        if k > n_pool_usable:
            raise ConfigError(f"the budget {fraction:g} selects {k} pairs, more than the {n_pool_usable} usable pairs "
                              f"of seed {config.seed}'s candidate pool ({n_pool} of {n_train} training pairs, "
                              f"score_share {config.score_share:g}): raise score_share or lower the fraction")


def usable_rows(base: LoadedModel, pairs, max_length: int | None) -> np.ndarray:
    """Which training pairs TRL keeps (a prompt that fills max_length drops its pair), by the tokenizer alone: the
    whole split's usable count when the reference pass covers a candidate pool alone."""
    from prefsift.engine.tokenize import too_long_rows

    return ~too_long_rows(base.tokenizer, pairs, np.arange(len(pairs)), max_length)


def spread(scores: dict[str, np.ndarray], rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """A candidate pool's score columns over the whole training split: NaN outside the pool, so a budget never
    selects there."""
    out = {}
    for name, values in scores.items():
        if name != "pair_id":
            out[name] = np.full(n, np.nan)
            out[name][rows] = values
    return out


def run_seed(config: RunConfig, splits: Splits, base: LoadedModel, template: Resources, judge: Judge | None,
             baseline_answers: list[str] | None, log, quiet: bool = False, results_dir: Path | None = None,
             n_usable: int | None = None) -> list[dict]:
    """Steps 1-6 under one training seed: warm-up, validation model, scores, then every subset from every start;
    the seed's files go under `results_dir` (default config.out)/seed-S. Each record's `compute` is the seconds its
    parts were measured to cost (pipeline.accounting), `pair_passes` their nominal count. A row whose training
    moved nothing is a record marked `status: "not trained"` with its `note`, and nothing else measured.

    With score_share < 1 the seed draws its candidate pool: the warm-up trains on pairs of it, every method but
    random scores it alone (scores NaN elsewhere, so its budgets select there; seed-S/scores/ holds the pool's), and
    the training split's reference pass covers the pool alone unless a row (full, random, a random baseline) reads
    the other pairs. A method scoring the pool is charged the pool's reference pass and its passes over the pool.
    Its fractional budgets are shares of the `n_usable` usable training pairs (default: counted here), and a pool
    they do not fit is refused right after its reference pass, before the warm-up."""
    out = Path(results_dir or config.out) / f"seed-{config.seed}"
    scorers = parse_methods(config.methods)
    resources = template.for_seed(config.seed)
    train_data = splits.train
    n_train = len(train_data.pairs)
    pool = (candidate_pool(train_data.pairs["pair_id"], config.score_share, config.seed)
            if config.score_share < 1 else None)
    every_pair = needs_every_pair(config, scorers)
    pooled = [s for s in scorers if pool is not None and scores_pool(s)]
    pool_resources: Resources | None = None
    n_base = None  # with a pool: the whole split's usable training pairs, which every budget is a share of
    if pool is None or every_pair:
        ref_train = resources.logps("reference")
    if pool is not None:
        pool_data = subset(train_data, pool)
        # the pool's reference log-probs: taken from the whole split's pass, or its own pass over the pool alone
        pool_resources = resources.over(pool_data, rows=pool if every_pair else None)
        ref_pool = pool_resources.logps("reference")
        n_pool_usable = int((~np.isnan(ref_pool[:, 0])).sum())
        if not n_pool_usable:  # the warm-up trains on pairs of the pool
            raise ConfigError(f"every pair of the candidate pool of seed {config.seed} ({len(pool)} pairs) has a "
                              f"prompt that fills max_length={config.engine.max_length}: raise max_length or "
                              "score_share")
        if every_pair:
            n_base = int((~np.isnan(ref_train[:, 0])).sum())
        else:
            ref_train = np.full((n_train, 2), np.nan)
            ref_train[pool] = ref_pool
            n_base = (n_usable if n_usable is not None
                      else int(usable_rows(base, train_data.pairs, config.engine.max_length).sum()))
        if pooled:  # before the warm-up, θ_val and the scoring passes: a budget the pool cannot fill stops here
            check_pool_budgets(config, n_train, n_base, len(pool), n_pool_usable)
        log(f"candidate pool: {len(pool)} of {n_train} training pairs (score_share {config.score_share:g}), "
            f"{n_pool_usable} usable; the reference pass covers "
            + ("every training pair (a row reads the others)" if every_pair else "the pool alone"))
    has_test = splits.test is not None and len(splits.test.pairs) > 0
    ref_test = resources.logps("reference", pairs=splits.test, tag="test-reference") if has_test else None
    starts = ("warmup", "reference") if config.start_from == "both" else (config.start_from,)
    needs = {role for s in scorers for role in s.needs}
    baselines = config.baseline_arms()
    ref_val = None
    if "validation" in needs or {"validation-only", "random+validation"} & set(baselines):
        # once for every seed (the pass is shared, its cost in Resources.charged), charged to every seed's rows
        ref_val = resources.logps("reference", pairs=splits.validation, tag="validation-reference")
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    warmup = None
    if needs & {"policy", "validation"} or "warmup" in starts:
        warmup, timings["warmup"], cpu_timings["warmup"] = train_warmup(config, base, train_data, ref_train, out,
                                                                        log, pool)
        resources.add("policy", warmup, stages={"warmup": timings["warmup"]})
    if "validation" in needs:
        validation, timings["validation"], cpu_timings["validation"] = train_validation_model(
            config, warmup, splits.validation, ref_val, out, log)
        resources.add("validation", validation, stages=dict(timings))
    # Step 3, the one score path: the same stage as `prefsift score`, every method over one provider (the pool's
    # for the methods that score a candidate pool).
    stages = [(train_data, [s for s in scorers if s not in pooled], resources)]
    if pooled:
        stages.insert(0, (pool_data, pooled, pool_resources))
    scores: dict[str, np.ndarray] = {}
    scoring: dict[str, float] = {}
    scoring_cpu: dict[str, float] = {}
    for data, group, provider in stages:
        if not group:
            continue
        began, cpu = time.perf_counter(), time.process_time()
        scored: ScoreResult = score_pairs(data, group, provider, out / "scores" if data is stages[0][0] else None)
        # the score stage times each method's share in wall seconds; its CPU seconds are split in the same proportion
        cpu_share = (time.process_time() - cpu) / max(time.perf_counter() - began, 1e-9)
        wall = scoring_seconds(scored, provider, group)
        scoring |= wall
        scoring_cpu |= {m: v * cpu_share for m, v in wall.items()}
        if data is train_data:
            scores = {**scored.scores, **scores}
        else:
            scores = {"pair_id": np.asarray(train_data.pairs["pair_id"], dtype=object), **scores,
                      **spread(scored.scores, pool, n_train)}
    # a pass the log-prob cache kept is charged what it cost when computed (Resources.charged)
    reference_cost = (resources if pool_resources is None or every_pair else pool_resources).charged["reference"]
    validation_cost = resources.charged.get("validation-reference", (0.0, 0.0))  # (0, 0): no validation pass
    reference_rows = None if pool is None or every_pair else len(pool)
    measured = Measured(reference=reference_cost[0], validation_reference=validation_cost[0],
                        warmup=timings.get("warmup", 0.0), validation=timings.get("validation", 0.0),
                        scoring=scoring, reference_rows=reference_rows)
    measured_cpu = Measured(reference=reference_cost[1], validation_reference=validation_cost[1],
                            warmup=cpu_timings.get("warmup", 0.0), validation=cpu_timings.get("validation", 0.0),
                            scoring=scoring_cpu, reference_rows=reference_rows)
    plans = [Plan("full", None, "full", 1.0)] if config.full else []
    levels = budgets(config, scores, n_train, log, None if pool is None else len(pool))
    plans += [Plan(s.name, s, b, f, c) for b, f, c in levels for s in scorers]
    n_validation = len(splits.validation.pairs)
    if "validation-only" in baselines:
        plans.append(Plan("validation-only", None, "validation", round(n_validation / max(1, n_train), 3)))
    plans += [Plan(arm, None, b, f, c) for b, f, c in levels for arm in baselines if arm != "validation-only"]
    n_warmup = max(1, round(config.warmup_fraction * n_train))
    records = []
    for start in starts:
        start_model = warmup if start == "warmup" else base
        for plan in plans:
            scorer = plan.scorer
            n_scored = len(pool) if scorer is not None and scorer in pooled else None
            record, data = train_and_evaluate(config, plan, start_model, base, splits, scores, ref_train,
                                              ref_test, judge, baseline_answers, log, start=start, seed_dir=out,
                                              quiet=quiet, ref_val=ref_val, n_usable=n_base, n_scored=n_scored)
            if record.get("status") == NOT_TRAINED:  # kept as marked, with no compute or metrics to summarize
                records.append({"seed": config.seed, "start_from": start, **record})
                continue
            arm = Arm(needs=tuple(scorer.needs) if scorer is not None else (), kto=data.algo == "kto", start=start,
                      n_subset=len(data.rows) if data.algo == "dpo" else record["n_pairs"],
                      n_validation_pairs=data.n_validation_pairs,
                      extra_passes=(scorer.compute_passes(n_train if n_scored is None else n_scored, n_validation)
                                    if scorer is not None else 0.0),
                      # the pool's pass is all a row has when no row reads the others (validation-only's warm-up)
                      n_scored=n_scored if n_scored is not None or every_pair or pool is None else len(pool))
            units = pair_passes(config, arm, n_train, n_warmup, n_validation)
            wall, cpu = record.pop("train_seconds"), record.pop("train_cpu_seconds")
            parts = measured_compute(arm, measured, plan.name, wall, n_train)
            cpu_parts = measured_compute(arm, measured_cpu, plan.name, cpu, n_train)
            checkpoints = record.pop("checkpoints", [])
            records.append(_charged({"seed": config.seed, "start_from": start, **record}, parts, cpu_parts, units))
            for point in checkpoints:  # the full run at a share of its steps: its training's time to that point
                seconds = point.pop("train_seconds")
                records.append(_charged({"seed": config.seed, "start_from": start, **point},
                                        {**parts, "train": seconds},
                                        {**cpu_parts, "train": round(seconds * cpu / max(wall, 1e-9), 3)},
                                        {**units, "train": units["train"] * point["fraction"]}))
    return records


def scoring_seconds(scored: ScoreResult, resources: Resources, scorers: list[Scorer]) -> dict[str, float]:
    """Each method's scoring in measured seconds: its own time and its policy / validation passes, without the
    trainings and the reference pass its score stage also charged (the accounting charges those as their parts)."""
    out = {}
    for scorer in scorers:
        trainings: dict[str, float] = {}
        for role in scorer.needs:
            trainings.update(resources.stages.get(role, {}))
        reference = resources.seconds.get("reference", 0.0) if "reference" in scorer.needs else 0.0
        out[scorer.name] = max(0.0, scored.seconds.get(scorer.name, 0.0) - sum(trainings.values()) - reference)
    return out


def _charged(record: dict, parts: dict[str, float], cpu_parts: dict[str, float], units: dict[str, float]) -> dict:
    """A record with its compute: measured seconds in total and by part, the CPU seconds this process spent on the
    same parts (what it computed, whatever else the machine ran), and the nominal pair passes beside."""
    total = round(sum(parts.values()), 3)
    return {**record, "compute": total, "compute_parts": parts, "seconds": total,
            "compute_cpu": round(sum(cpu_parts.values()), 3), "compute_cpu_parts": cpu_parts,
            "pair_passes": sum(units.values()), "pair_pass_parts": units}


def load_run_config(values: dict[str, Any], where: str) -> RunConfig:
    """A `RunConfig` from YAML values (strict keys, each option checked), its methods parsed and their parameters
    checked too: one line for any bad value, before anything is loaded."""
    config = from_dict(RunConfig, values, where)
    check_pool_config(config, parse_methods(config.methods))
    return config


def run_staged(config: RunConfig, *, log=print, finish=None) -> dict:
    """`prefsift run` and `compare`: `run_pipeline` under config.out's lock (a second run into it is refused), every
    result file (results.*, plots, timings, manifest, seed-S/) into a staging directory swapped in whole at the end,
    so a run failing part-way leaves the old results complete and never a mix of old and new. The resumable shards
    stay in config.out (a rerun resumes from them) and move into the new directory. `finish(results_dir, results)`
    writes more files into the staging directory before the swap (compare's table)."""
    from prefsift.output import CACHE_ENTRIES, check_output, locked, staged

    out = Path(config.out)
    check_output(out, "run")  # a file, another stage's results, a foreign directory: before any model is loaded
    with locked(out), staged(out, "run", carry=CACHE_ENTRIES) as tmp:
        results = run_pipeline(config, log=log, results_dir=tmp)
        if finish is not None:
            finish(tmp, results)
        name_final_paths(tmp, out)
    return results


def name_final_paths(staging: Path, out: Path) -> None:
    """The models a run saves were named by their place in the staging directory (the manifests' `source`): name
    them by the place they will have once it is swapped in."""
    old, new = json.dumps(str(staging))[1:-1], json.dumps(str(out))[1:-1]
    for manifest in staging.rglob("manifest.json"):
        text = manifest.read_text(encoding="utf-8")
        if old in text:
            manifest.write_text(text.replace(old, new), encoding="utf-8")


def check_test_size(n_test: int, minimum: int, n_dropped: int = 0, max_length: int | None = None) -> None:
    """Refuse a test split too small to tell methods apart (RunConfig.min_test_pairs; 0 allows any size): before
    any model loads on the split's size, and again on the pairs left once max_length has dropped some
    (`n_dropped` of `n_test`), which are all the accuracies are computed over."""
    usable = n_test - n_dropped
    if usable < minimum:
        half = 1.96 * (0.25 / usable) ** 0.5 if usable else float("inf")
        held = (f"the test split holds {n_test} pairs" if not n_dropped else
                f"of the test split's {n_test} pairs, {n_dropped} have a prompt that fills max_length={max_length} "
                f"and are dropped: {usable} remain")
        fix = "raise max_length, test_fraction" if n_dropped else "raise test_fraction"
        raise ConfigError(f"{held} (fewer than min_test_pairs={minimum}): an accuracy near 0.5 over them has a 95% "
                          f"interval of ±{half:.2f}; {fix}, give test_data, or set min_test_pairs: 0 to run anyway")


def run_pipeline(config: RunConfig, *, splits: Splits | None = None, base: LoadedModel | None = None,
                 judge: Judge | None = None, log=print, quiet: bool = False, results_dir: Path | None = None) -> dict:
    """Run the flow of the module docstring over every seed; returns {"records", "summary"} (also written under
    `results_dir`, default config.out: results.json, results.md, the plots; the seconds each row took in
    timings.json; per seed, each row's subset, evaluation outputs and, on request, model), and "not_trained": the
    rows whose training moved nothing, each with its `note` (`train_and_evaluate`); when that is every row, the run
    stops with TrainingMovedNothing. Resumable shards go under config.out whatever `results_dir` is. `quiet` hides
    the generation progress bars."""
    start = time.perf_counter()
    scorers = parse_methods(config.methods)  # every method and parameter checked before anything runs
    check_pool_config(config, scorers)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir or out)
    engine = config.engine
    splits = splits or make_splits(config)
    check_test_size(len(splits.test.pairs) if splits.test is not None else 0, config.min_test_pairs)
    base = base or load_model(config.model, dtype=engine.dtype, device=engine.device,
                              trust_remote_code=config.trust_remote_code)
    if judge is None and config.judge_model:
        from prefsift.engine.reward import load_reward_model

        judge = RewardModelJudge(load_reward_model(config.judge_model, dtype=engine.dtype, device=engine.device,
                                                   trust_remote_code=config.trust_remote_code),
                                 engine.max_length, config.eval.batch_size, quiet=quiet)
    has_test = splits.test is not None and len(splits.test.pairs) > 0
    eval_prompts = splits.eval_prompts if judge is not None and has_test else []
    splits.eval_prompts = eval_prompts
    n_train = len(splits.train.pairs)
    log(f"train {n_train} pairs, validation {len(splits.validation.pairs)}, "
        f"test {len(splits.test.pairs) if splits.test else 0}, eval prompts {len(eval_prompts)}, "
        f"seeds {config.seeds}"
        + (f"; {splits.n_held_out_prompts_removed} training pairs removed: their prompt is held out"
           if splits.n_held_out_prompts_removed else ""))
    # The reference passes and the reference's answers do not depend on the seed: once, shared by every seed.
    sources = {"reference": base, "validation_pairs": splits.validation, "embedder": config.embedder,
               "reward_model": config.reward_model}
    if config.embedder is None and any("embedder" in s.needs for s in scorers):
        from prefsift.engine.embeddings import CausalEmbedder

        sources["embedder"] = CausalEmbedder.of(base)
    template = Resources(splits.train, engine, sources, out_dir=out, seed=config.seed,
                         trust_remote_code=config.trust_remote_code, allow_dropped=config.allow_dropped)
    n_usable = None  # with a candidate pool: the usable training pairs, which a pooled budget is a share of
    if needs_every_pair(config, scorers):
        dropped = np.isnan(template.logps("reference")[:, 0])
        if dropped.all():
            raise ConfigError(f"every training pair's prompt fills max_length={engine.max_length}: raise max_length")
        if dropped.any():
            log(f"{int(dropped.sum())} of {n_train} training pairs have a prompt longer than max_length: TRL drops "
                f"them, so does every subset ({int((~dropped).sum())} usable)")
    else:  # every row selects from a candidate pool: each seed's reference pass covers its pool alone (run_seed)
        log(f"each seed scores a candidate pool of {max(1, round(config.score_share * n_train))} training pairs "
            f"(score_share {config.score_share:g}); no row reads the others")
        dropped = ~usable_rows(base, splits.train.pairs, engine.max_length)  # the tokenizer's verdict, no pass
        if dropped.any():
            log(f"{int(dropped.sum())} of {n_train} training pairs have a prompt longer than max_length: no pool "
                f"selects them ({int((~dropped).sum())} usable)")
    if config.score_share < 1 and any(scores_pool(s) for s in scorers):
        # the pools are the seeds' deterministic draws: every seed's checked before any seed trains
        n_usable = int((~dropped).sum())
        for k in range(config.seeds):
            pool = candidate_pool(splits.train.pairs["pair_id"], config.score_share, config.seed + k)
            check_pool_budgets(replace(config, seed=config.seed + k), n_train, n_usable, len(pool),
                               int((~dropped[pool]).sum()))
    if has_test:  # the accuracies cover the test pairs that fit: the minimum is checked again on those
        test_dropped = int(np.isnan(template.logps("reference", pairs=splits.test, tag="test-reference")[:, 0]).sum())
        if test_dropped:
            log(f"{test_dropped} of {len(splits.test.pairs)} test pairs have a prompt longer than max_length: "
                f"every accuracy is over the {len(splits.test.pairs) - test_dropped} left")
        check_test_size(len(splits.test.pairs), config.min_test_pairs, test_dropped, engine.max_length)
    baseline_answers = (greedy_answers(base.model, base.tokenizer, eval_prompts,
                                       max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                       desc="reference answers", quiet=quiet)
                        if eval_prompts else None)
    rows = []
    for k in range(config.seeds):
        rows += run_seed(replace(config, seed=config.seed + k), splits, base, template, judge, baseline_answers,
                         log, quiet, results_dir, n_usable=n_usable)
    # a row whose training moved nothing has no results: listed apart (results.json's `not_trained`, results.md),
    # never in the records the summary, the plots and the verdict read
    records = [r for r in rows if r.get("status") != NOT_TRAINED]
    not_trained = [r for r in rows if r.get("status") == NOT_TRAINED]
    if not records:
        raise TrainingMovedNothing(f"no row was trained: the training of every row ({len(not_trained)} of "
                                   f"{len(not_trained)}) moved nothing; first: {not_trained_line(not_trained[0])}")
    if not_trained:
        log(f"{len(not_trained)} of {len(rows)} rows not trained (their training moved nothing), left out of the "
            "tables:")
        for row in not_trained:
            log("  " + not_trained_line(row))
    significance = settings_of(config)  # the correction, its rate and the non-inferiority margin: one family
    summary = summarize(summarizable(records, log), ceilings={s.name for s in scorers if s.ceiling}, **significance)
    write_results(records, summary, results_dir, not_trained=not_trained, **significance)
    write_manifest(results_dir, "run", {"config": asdict(config), "data_hash": splits.train.data_hash,
                                        "model": base.source, "model_fingerprint": base.fingerprint,
                                        "n_held_out_prompts_removed": splits.n_held_out_prompts_removed,
                                        **({"n_scored": max(1, round(config.score_share * n_train))}
                                           if config.score_share < 1 else {}),
                                        "seconds": time.perf_counter() - start})
    return {"records": records, "summary": summary, "not_trained": not_trained}
