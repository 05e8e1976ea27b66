"""`prefsift run`: the TIF paper's pipeline from one config, each step a named function over the stages.

    split → reference passes → warm-up DPO (θ) → validation DPO from θ (θ_val) → score (one score path) →
    budgets → train each subset → evaluate each policy → results.json, results.md, win_rate.png
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from prefsift import __version__
from prefsift.config import EngineConfig, RunConfig, TrainConfig
from prefsift.data import LoadedPairs, data_hash_of, load_pairs
from prefsift.errors import ConfigError
from prefsift.evaluate import Judge, RewardModelJudge, evaluate, greedy_answers, win_rate_prompts
from prefsift.manifest import write_manifest
from prefsift.models import LoadedModel, fingerprint_files, load_model
from prefsift.report import one_line, write_results
from prefsift.resources import Resources
from prefsift.score import ScoreResult, score_pairs
from prefsift.scorers import Scorer
from prefsift.select import select_indices
from prefsift.train import train


def _hash_order(keys: list[str], seed: int) -> np.ndarray:
    hashes = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in keys]
    return np.argsort(np.asarray(hashes), kind="stable")


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def split_pairs(data: LoadedPairs, validation_fraction: float, test_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, validation, test), by a seeded hash of the PROMPT: pairs that share a prompt land in
    the same split, so no test prompt (nor its win-rate question) was trained on. Reproducible and order-free."""
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(data.pairs["prompt"]):
        groups.setdefault(_prompt_key(prompt), []).append(row)
    keys = list(groups)
    n = len(data.pairs)
    targets = (round(test_fraction * n), round(validation_fraction * n))
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])  # test, validation, train
    for g in _hash_order(keys, seed):
        rows = groups[keys[g]]
        part = 0 if len(splits[0]) < targets[0] else 1 if len(splits[1]) < targets[1] else 2
        splits[part].extend(rows)
    test, validation, train_rows = (np.sort(np.asarray(x, dtype=int)) for x in splits)
    return train_rows, validation, test


@dataclass
class Splits:
    train: LoadedPairs
    validation: LoadedPairs
    test: LoadedPairs | None
    eval_prompts: list
    n_held_out_prompts_removed: int = 0  # training pairs dropped because their prompt is a validation/test prompt


def subset(data: LoadedPairs, rows: np.ndarray) -> LoadedPairs:
    rows = rows.tolist()
    return LoadedPairs(pairs=data.pairs.select(rows), raw=data.raw.select(rows), kind=data.kind, invalid=[],
                       n_read=len(rows), source=data.source,
                       data_hash=data_hash_of(data.pairs.select(rows)["pair_id"]))


def make_splits(config: RunConfig) -> Splits:
    keys = {"prompt_key": config.prompt_key, "chosen_key": config.chosen_key, "rejected_key": config.rejected_key}
    data = load_pairs(config.data, **keys)
    train_rows, val_rows, test_rows = split_pairs(
        data, 0.0 if config.validation_data else config.validation_fraction,
        0.0 if config.test_data else config.test_fraction, config.seed)
    validation = load_pairs(config.validation_data, **keys) if config.validation_data else subset(data, val_rows)
    test = load_pairs(config.test_data, **keys) if config.test_data else subset(data, test_rows)
    # A user's own validation/test file may share prompts with the training data: train on none of them.
    held_out = {_prompt_key(p) for split in (validation, test) for p in split.pairs["prompt"]}
    prompts = data.pairs["prompt"]
    kept = np.asarray([r for r in train_rows if _prompt_key(prompts[int(r)]) not in held_out], dtype=int)
    if any("validation" in s.needs or "validation_pairs" in s.needs for s in config.scorers()) \
            and len(validation.pairs) == 0:
        raise ConfigError("the validation split is empty: raise validation_fraction or give validation_data")
    return Splits(subset(data, kept), validation, test, win_rate_prompts(test, config.eval.eval_prompts),
                  len(train_rows) - len(kept))


def trained_copy(parent: LoadedModel, tag: str, pairs, ref_logps: np.ndarray, config: TrainConfig,
                 engine: EngineConfig, save_dir: Path | None = None) -> tuple[LoadedModel, float]:
    """Train a copy of `parent`. Saved, it is fingerprinted by content like any model on disk; in memory, by
    parent, recipe and data, so resumable shards of a run with another recipe are never taken for its own."""
    child = LoadedModel(copy.deepcopy(parent.model), parent.tokenizer, str(save_dir or f"{parent.source}#{tag}"), "")
    result = train(child, pairs, config, engine, out_dir=save_dir, ref_logps=ref_logps)
    if save_dir is not None:
        child.fingerprint = fingerprint_files(str(save_dir), None)
    else:
        recipe = json.dumps([parent.fingerprint, asdict(config), asdict(engine), data_hash_of(pairs["pair_id"]),
                             __version__], sort_keys=True, default=str)
        child.fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return child, result.seconds


def train_warmup(config: RunConfig, base: LoadedModel, train_data: LoadedPairs, ref_train: np.ndarray, out: Path,
                 log) -> tuple[LoadedModel, float]:
    """Step 1 of the paper: DPO on (a share of) the training pairs → θ."""
    n = len(train_data.pairs)
    rows = np.sort(_hash_order(list(train_data.pairs["pair_id"]), config.seed + 1)[
        : max(1, round(config.warmup_fraction * n))])
    log(f"warm-up DPO on {len(rows)} pairs")
    tc = replace(config.train, seed=config.seed, epochs=config.warmup_epochs)
    return trained_copy(base, "warmup", train_data.pairs.select(rows.tolist()), ref_train[rows], tc, config.engine,
                        out / "models" / "warmup" if config.save_models else None)


def train_validation_model(config: RunConfig, warmup: LoadedModel, validation: LoadedPairs, ref_val: np.ndarray,
                           out: Path, log) -> tuple[LoadedModel, float]:
    """Step 2: DPO on the validation pairs from θ → θ_val."""
    log(f"validation DPO on {len(validation.pairs)} pairs from the warm-up model")
    tc = replace(config.train, seed=config.seed, epochs=config.validation_epochs)
    return trained_copy(warmup, "validation", validation.pairs, ref_val, tc, config.engine,
                        out / "models" / "validation" if config.save_models else None)


def budgets(config: RunConfig, scores: dict[str, np.ndarray], n_train: int, log) -> list[tuple[float, int | None]]:
    """Step 4: the sizes compared: each fraction, and the share the LossDiff-IRM band rule keeps."""
    plans: list[tuple[float, int | None]] = [(f, None) for f in config.fractions]
    if config.rule_share and "lossdiff_irm" in scores:
        keep = int((scores["lossdiff_irm"] == 1.0).sum())
        plans.append((round(keep / n_train, 3), keep))
        log(f"the LossDiff-IRM band rule keeps {keep} of {n_train} pairs ({keep / n_train:.1%})")
    return plans


def selected_rows(scorer: Scorer, scores: dict[str, np.ndarray], fraction: float, count: int | None) -> np.ndarray:
    rule = scorer.selection_rule()
    rule.pop("low", None), rule.pop("high", None)  # a budget replaces the rule's own cut-offs
    return select_indices(scores, rule.pop("rule"), **rule, fraction=None if count else fraction, count=count)


def _hidden_share(raw, rows: np.ndarray, column: str) -> float | None:
    """Share of the pairs flagged in a hidden column (e.g. the demo's is_flipped) that the subset kept."""
    if raw is None or column not in raw.column_names:
        return None
    flags = np.asarray(raw[column], dtype=bool)
    return float(flags[rows].sum() / flags.sum()) if flags.sum() else None


def train_and_evaluate(config: RunConfig, plan: tuple, start_model: LoadedModel, base: LoadedModel, splits: Splits,
                       scores: dict[str, np.ndarray], ref_train: np.ndarray, ref_test: np.ndarray | None,
                       judge: Judge | None, baseline_answers: list[str] | None, log) -> dict:
    """Steps 5 and 6 for one (method, budget): select, train from `start_model`, evaluate against the reference."""
    name, scorer, fraction, count = plan
    train_data, has_test = splits.train, ref_test is not None
    dropped = np.isnan(ref_train[:, 0])
    rows = np.flatnonzero(~dropped) if scorer is None else selected_rows(scorer, scores, fraction, count)
    log(f"{name} @ {fraction:.0%}: training on {len(rows)} pairs")
    policy, seconds = trained_copy(start_model, f"{name}-{fraction}", train_data.pairs.select(rows.tolist()),
                                   ref_train[rows], replace(config.train, seed=config.seed), config.engine)
    record = {"method": name, "fraction": fraction, "n_pairs": len(rows), "train_seconds": round(seconds, 3)}
    evaluation = evaluate(policy, base, test_pairs=splits.test.pairs if has_test else None,
                          prompts=splits.eval_prompts if baseline_answers is not None else None, judge=judge,
                          config=config.eval, engine=config.engine, reference_logps=ref_test,
                          baseline_answers=baseline_answers)
    record.update({"win_rate": evaluation.get("win_rate"), "pref_accuracy": evaluation.get("pref_accuracy")})
    record.update({k: evaluation[k] for k in ("wins", "ties", "losses") if k in evaluation})
    for column, label in (("is_flipped", "flipped_kept"), ("is_near_tie", "near_tie_kept")):
        share = _hidden_share(train_data.raw, rows, column)
        if share is not None:
            record[label] = round(share, 3)
    log("  " + one_line(record))
    return record


def run_pipeline(config: RunConfig, *, splits: Splits | None = None, base: LoadedModel | None = None,
                 judge: Judge | None = None, log=print) -> list[dict]:
    """Run the flow of the module docstring; returns the result records (also written under config.out)."""
    start = time.perf_counter()
    scorers = config.scorers()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = config.engine
    splits = splits or make_splits(config)
    base = base or load_model(config.model, dtype=engine.dtype, device=engine.device,
                              trust_remote_code=config.trust_remote_code)
    if judge is None and config.judge_model:
        from prefsift.reward import load_reward_model

        judge = RewardModelJudge(load_reward_model(config.judge_model, dtype=engine.dtype, device=engine.device),
                                 engine.max_length)
    has_test = splits.test is not None and len(splits.test.pairs) > 0
    eval_prompts = splits.eval_prompts if judge is not None and has_test else []
    train_data = splits.train
    n_train = len(train_data.pairs)
    log(f"train {n_train} pairs, validation {len(splits.validation.pairs)}, "
        f"test {len(splits.test.pairs) if splits.test else 0}, eval prompts {len(eval_prompts)}"
        + (f"; {splits.n_held_out_prompts_removed} training pairs removed: their prompt is held out"
           if splits.n_held_out_prompts_removed else ""))

    # Reference passes: once each, reused by the warm-up, the validation model, every subset, score and eval.
    resources = Resources(train_data, engine, {"reference": base, "validation_pairs": splits.validation},
                          out_dir=out / "scores", seed=config.seed, trust_remote_code=config.trust_remote_code)
    ref_train = resources.logps("reference")
    ref_val = (resources.logps("reference", pairs=splits.validation, tag="validation-reference")
               if len(splits.validation.pairs) else None)
    ref_test = resources.logps("reference", pairs=splits.test, tag="test-reference") if has_test else None
    dropped = np.isnan(ref_train[:, 0])
    if dropped.all():
        raise ConfigError(f"every training pair's prompt fills max_length={engine.max_length}: raise max_length")
    if dropped.any():
        log(f"{int(dropped.sum())} pairs have a prompt longer than max_length: TRL drops them, so does every subset")

    needs = {role for s in scorers for role in s.needs}
    timings: dict[str, float] = {}
    warmup = None
    if needs & {"policy", "validation"} or config.start_from == "warmup":
        warmup, timings["warmup"] = train_warmup(config, base, train_data, ref_train, out, log)
        resources.add("policy", warmup, stages={"warmup": timings["warmup"]})
    if "validation" in needs:
        validation, timings["validation"] = train_validation_model(config, warmup, splits.validation, ref_val,
                                                                   out, log)
        resources.add("validation", validation, stages=dict(timings))

    # Step 3, the one score path. With start_from=warmup every subset (full and random too) starts from the
    # warm-up model: a shared cost reported as warmup_seconds, not charged to the scores.
    shared = frozenset({"warmup"} if config.start_from == "warmup" else set())
    scored: ScoreResult = score_pairs(train_data, scorers, resources, out / "scores", shared_stages=shared)
    scores = scored.scores
    baseline_answers = (greedy_answers(base.model, base.tokenizer, eval_prompts,
                                       max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
                        if eval_prompts else None)
    start_model = warmup if config.start_from == "warmup" and warmup is not None else base
    plans = [("full", None, 1.0, None)] if config.full else []
    plans += [(s.name, s, f, c) for f, c in budgets(config, scores, n_train, log) for s in scorers]
    records = [train_and_evaluate(config, plan, start_model, base, splits, scores, ref_train, ref_test, judge,
                                  baseline_answers, log)
               | ({"warmup_seconds": round(timings["warmup"], 3)} if shared else {})
               | {"score_seconds": round(scored.seconds.get(plan[0], 0.0), 3)}
               for plan in plans]
    write_results(records, out)
    write_manifest(out, "run", {"config": asdict(config), "data_hash": train_data.data_hash, "model": base.source,
                                "model_fingerprint": base.fingerprint, "timings": timings,
                                "n_held_out_prompts_removed": splits.n_held_out_prompts_removed,
                                "seconds": time.perf_counter() - start})
    return records
