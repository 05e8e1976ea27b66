"""The whole flow from one config (`prefsift run`), following the TIF paper's pipeline:

warm-up DPO on the training pairs → θ; DPO on the validation pairs from θ → θ_val; score every training pair
(random, irm, lossdiff, lossdiff-irm, ...); select each method's subset at each fraction; train on each subset;
evaluate each policy against the reference; write results.json, a Markdown table and a plot.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from prefsift import __version__
from prefsift.data import LoadedPairs, data_hash_of, load_pairs
from prefsift.errors import ConfigError
from prefsift.evaluate import (
    EvalConfig,
    Judge,
    RewardModelJudge,
    evaluate,
    greedy_answers,
    load_reward_model,
    win_rate_prompts,
)
from prefsift.manifest import write_manifest
from prefsift.models import LoadedModel, load_model
from prefsift.report import one_line, write_results
from prefsift.score import write_scores_table
from prefsift.scorers import ScoringContext, get_scorer
from prefsift.scorers.base import LOGPS_COLUMNS
from prefsift.select import select_indices
from prefsift.train import TrainConfig, train

ROLES_TRAINED_FROM_WARMUP = ("policy", "validation")


@dataclass
class RunConfig:
    data: str = field(default="", metadata={"help": "Training pairs: file, datasets directory or hub name."})
    model: str = field(default="", metadata={"help": "The SFT model to align (also the DPO reference)."})
    out: str = field(default="prefsift-run", metadata={"help": "Output directory."})
    validation_data: str | None = field(default=None, metadata={"help": "Trusted validation pairs; default: "
                                                                         "a split of data."})
    test_data: str | None = field(default=None, metadata={"help": "Held-out test pairs; default: a split of data."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Share of data split off for validation."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of data split off for testing."})
    prompt_key: str = field(default="prompt", metadata={"help": "Input column holding the prompt."})
    chosen_key: str = field(default="chosen", metadata={"help": "Input column holding the chosen response."})
    rejected_key: str = field(default="rejected", metadata={"help": "Input column holding the rejected response."})
    methods: list[str] = field(default_factory=lambda: ["random", "irm", "lossdiff", "lossdiff-irm"],
                               metadata={"help": "Scoring methods to compare."})
    fractions: list[float] = field(default_factory=lambda: [0.1], metadata={"help": "Subset sizes to compare."})
    rule_share: bool = field(default=True, metadata={"help": "Also compare every method at the share the "
                                                             "LossDiff-IRM band rule keeps."})
    full: bool = field(default=True, metadata={"help": "Also train on all the training pairs."})
    warmup_fraction: float = field(default=1.0, metadata={"help": "Share of the training pairs the warm-up DPO "
                                                                  "sees (cuts its cost)."})
    warmup_epochs: float = field(default=1.0, metadata={"help": "Epochs of the warm-up DPO."})
    validation_epochs: float = field(default=1.0, metadata={"help": "Epochs of DPO on validation from θ."})
    start_from: str = field(default="warmup", metadata={"help": "Subsets continue from the 'warmup' model (the "
                                                                "TIF paper) or train from the 'reference' model."})
    band_low: float = field(default=0.1, metadata={"help": "Lower percentile of the middle bands."})
    band_high: float = field(default=0.9, metadata={"help": "Upper percentile of the middle bands."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "DPO settings of every run."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation settings."})
    judge_model: str | None = field(default=None, metadata={"help": "Reward model judging win rates."})
    eval_prompts: int = field(default=200, metadata={"help": "Held-out prompts for the win rate."})
    seed: int = field(default=0, metadata={"help": "Seed of splits, random scores and training (overrides "
                                                   "train.seed)."})

    def check(self) -> None:
        for fraction in self.fractions:
            if not 0 < fraction <= 1:
                raise ConfigError(f"fractions must lie in (0, 1] (got {fraction})")
        for name in ("validation_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1) (got {getattr(self, name)})")
        if not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must lie in (0, 1] (got {self.warmup_fraction})")
        if self.start_from not in ("reference", "warmup"):
            raise ConfigError(f"start_from must be 'reference' or 'warmup' (got {self.start_from!r})")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ConfigError("validation_fraction + test_fraction must leave some training pairs (< 1)")
        if not 0 <= self.band_low < self.band_high <= 1:
            raise ConfigError(f"need 0 <= band_low < band_high <= 1 (got {self.band_low}, {self.band_high})")
        if self.train.algo != "dpo":
            raise ConfigError(f"run trains with DPO (the TIF pipeline); train.algo is {self.train.algo!r}")
        for method in self.methods:
            get_scorer(method)

    @property
    def needs_validation(self) -> bool:
        return any("validation" in get_scorer(m).needs for m in self.methods)


def _hash_order(keys: list[str], seed: int) -> np.ndarray:
    hashes = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in keys]
    return np.argsort(np.asarray(hashes), kind="stable")


def split_pairs(data: LoadedPairs, validation_fraction: float, test_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, validation, test), by a seeded hash of the PROMPT: pairs that share a prompt land in
    the same split, so no test prompt (nor its win-rate question) was trained on. Reproducible and order-free."""
    prompts = [json.dumps(p, sort_keys=True) for p in data.pairs["prompt"]]
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    keys = list(groups)
    n = len(prompts)
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


def _subset(data: LoadedPairs, rows: np.ndarray) -> LoadedPairs:
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
    validation = load_pairs(config.validation_data, **keys) if config.validation_data else _subset(data, val_rows)
    test = load_pairs(config.test_data, **keys) if config.test_data else _subset(data, test_rows)
    held_out = set(validation.pairs["pair_id"]) | set(test.pairs["pair_id"])
    pair_ids = data.pairs["pair_id"]
    train_rows = np.asarray([r for r in train_rows if pair_ids[int(r)] not in held_out], dtype=int)
    if config.needs_validation and len(validation.pairs) == 0:
        raise ConfigError("the validation split is empty: raise validation_fraction or give validation_data")
    return Splits(_subset(data, train_rows), validation, test, win_rate_prompts(test, config.eval_prompts))


def _trained_copy(parent: LoadedModel, tag: str, config: TrainConfig, pairs, ref_logps: np.ndarray):
    """Train a copy of `parent`; its fingerprint derives from the parent, the recipe and the data, so resumable
    log-prob shards of an earlier run with another recipe are never taken for this model's."""
    child = LoadedModel(copy.deepcopy(parent.model), parent.tokenizer, f"{parent.source}#{tag}", "")
    result = train(child, pairs, config, ref_logps=ref_logps)
    recipe = json.dumps([parent.fingerprint, asdict(config), data_hash_of(pairs["pair_id"]), __version__],
                        sort_keys=True, default=str)
    child.fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    return child, result


def _hidden_share(raw, rows: np.ndarray, column: str) -> float | None:
    """Share of the pairs flagged in a hidden column (e.g. the demo's is_flipped) that the subset kept."""
    if raw is None or column not in raw.column_names:
        return None
    flags = np.asarray(raw[column], dtype=bool)
    return float(flags[rows].sum() / flags.sum()) if flags.sum() else None


def run_pipeline(config: RunConfig, *, splits: Splits | None = None, base: LoadedModel | None = None,
                 judge: Judge | None = None, log=print) -> list[dict]:
    """Run the flow of the module docstring; returns the result records (also written under config.out)."""
    config.check()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = splits or make_splits(config)
    base = base or load_model(config.model)
    if judge is None and config.judge_model:
        judge = RewardModelJudge(load_reward_model(config.judge_model), config.eval.max_length)
    if splits.test is None or not len(splits.test.pairs):
        splits.eval_prompts = []
    train_data, tc = splits.train, replace(config.train, seed=config.seed)
    n_train = len(train_data.pairs)
    log(f"train {n_train} pairs, validation {len(splits.validation.pairs)}, "
        f"test {len(splits.test.pairs) if splits.test else 0}, eval prompts {len(splits.eval_prompts)}")
    context = ScoringContext(pairs=train_data.pairs, raw=train_data.raw, models={"reference": base}, beta=tc.beta,
                             max_length=tc.max_length, batch_tokens=tc.batch_tokens, seed=config.seed,
                             out_dir=out / "scores", data_hash=train_data.data_hash,
                             band=(config.band_low, config.band_high))

    def reference_logps(data: LoadedPairs, tag: str) -> np.ndarray:
        """Reference log-probs of a split, once; resumable shards under out/scores like every other pass."""
        return ScoringContext(pairs=data.pairs, models={"reference": base}, max_length=tc.max_length,
                              batch_tokens=tc.batch_tokens, out_dir=out / "scores" / tag,
                              data_hash=data.data_hash).logps("reference")

    # Computed once, reused by the warm-up, the validation model, every subset, every score and the evaluation.
    ref_train = context.logps("reference")
    ref_val = reference_logps(splits.validation, "validation") if len(splits.validation.pairs) else None
    has_test = splits.test is not None and len(splits.test.pairs) > 0
    ref_test = reference_logps(splits.test, "test") if has_test else None
    dropped = np.isnan(ref_train[:, 0])
    if dropped.any():
        log(f"{int(dropped.sum())} pairs have a prompt longer than max_length: TRL drops them, so does every subset")

    needs = {role for m in config.methods for role in get_scorer(m).needs}
    timings: dict[str, float] = {}
    warmup = None
    if needs & set(ROLES_TRAINED_FROM_WARMUP) or config.start_from == "warmup":
        warm_rows = np.sort(_hash_order(list(train_data.pairs["pair_id"]), config.seed + 1)[
            : max(1, round(config.warmup_fraction * n_train))])
        log(f"warm-up DPO on {len(warm_rows)} pairs")
        warmup, result = _trained_copy(base, "warmup", replace(tc, epochs=config.warmup_epochs),
                                       train_data.pairs.select(warm_rows.tolist()), ref_train[warm_rows])
        timings["warmup"] = result.seconds
        context.models["policy"] = warmup
    if "validation" in needs:
        log(f"validation DPO on {len(splits.validation.pairs)} pairs from the warm-up model")
        validation, result = _trained_copy(warmup, "validation", replace(tc, epochs=config.validation_epochs),
                                           splits.validation.pairs, ref_val)
        timings["validation"] = result.seconds
        context.models["validation"] = validation

    # With start_from=warmup every subset (full and random too) starts from the warm-up model: a shared cost,
    # reported as warmup_seconds, not charged to the scores. With start_from=reference it is the scores' cost.
    shared = {"warmup"} if config.start_from == "warmup" else set()
    scores: dict[str, np.ndarray] = {"pair_id": np.asarray(train_data.pairs["pair_id"], dtype=object)}
    score_seconds: dict[str, float] = {}
    for method in config.methods:
        scorer = get_scorer(method)
        for role in scorer.needs:
            if role in LOGPS_COLUMNS:
                context.logps(role)  # once per model, shared by every scorer that needs it
        start = time.perf_counter()
        columns = scorer.score(context)
        # The honest cost of a score: its own time, the log-prob passes and the trainings its models needed.
        score_seconds[method] = (time.perf_counter() - start
                                 + sum(context.seconds.get(role, 0.0) for role in scorer.needs)
                                 + sum(timings.get(stage, 0.0) for stage in _stages(scorer.needs) - shared))
        for name, values in columns.items():  # a pair TRL drops is never selected
            scores[name] = np.where(dropped, np.nan, values)
    scores.update(context.logps_columns())
    write_scores_table(out / "scores", scores, train_data)
    write_manifest(out / "scores", "score", {
        "method": config.methods, "config": {"beta": tc.beta, "max_length": tc.max_length,
                                             "band_low": config.band_low, "band_high": config.band_high},
        "default_rule": get_scorer(config.methods[0]).selection_rule() if len(config.methods) == 1 else None,
        "data": {"source": train_data.source, "hash": train_data.data_hash, "n_pairs": n_train},
        "models": {role: {"source": m.source, "fingerprint": m.fingerprint} for role, m in context.models.items()},
        "seconds": score_seconds})
    context.models.pop("validation", None)  # free θ_val: only its log-probs are needed from here on

    budgets = [(f, None) for f in config.fractions]
    if config.rule_share and "lossdiff_irm" in scores:
        keep = scores["lossdiff_irm"] == 1.0
        share = round(float(keep.sum() / n_train), 3)
        budgets.append((share, int(keep.sum())))
        log(f"the LossDiff-IRM band rule keeps {int(keep.sum())} of {n_train} pairs ({share:.1%})")

    start_model = warmup if config.start_from == "warmup" and warmup is not None else base
    eval_config = config.eval
    baseline_answers = (greedy_answers(base.model, base.tokenizer, splits.eval_prompts,
                                       max_new_tokens=eval_config.max_new_tokens, batch_size=eval_config.batch_size)
                        if judge is not None and splits.eval_prompts else None)
    records = []
    plans = [("full", 1.0, None)] if config.full else []
    plans += [(m, f, c) for f, c in budgets for m in config.methods]
    for method, fraction, count in plans:
        if method == "full":
            rows = np.flatnonzero(~dropped)
        else:
            rule = get_scorer(method).selection_rule()
            rows = select_indices(scores, rule.pop("rule"), **rule, fraction=None if count else fraction, count=count)
        log(f"{method} @ {fraction:.0%}: training on {len(rows)} pairs")
        policy, result = _trained_copy(start_model, f"{method}-{fraction}", tc, train_data.pairs.select(rows.tolist()),
                                       ref_train[rows])
        record = {"method": method, "fraction": fraction, "n_pairs": result.n_pairs,
                  "score_seconds": round(score_seconds.get(method, 0.0), 3),
                  "train_seconds": round(result.seconds, 3)}
        if shared:
            record["warmup_seconds"] = round(timings["warmup"], 3)
        evaluation = evaluate(policy, base, test_pairs=splits.test.pairs if ref_test is not None else None,
                              prompts=splits.eval_prompts if judge is not None else None, judge=judge,
                              config=eval_config, reference_logps=ref_test, baseline_answers=baseline_answers)
        record.update({"win_rate": evaluation.get("win_rate"), "pref_accuracy": evaluation.get("pref_accuracy")})
        record.update({k: evaluation[k] for k in ("wins", "ties", "losses") if k in evaluation})
        for column, name in (("is_flipped", "flipped_kept"), ("is_near_tie", "near_tie_kept")):
            share = _hidden_share(train_data.raw, rows, column)
            if share is not None:
                record[name] = round(share, 3)
        log("  " + one_line(record))
        records.append(record)
        del policy
    write_results(records, out)
    write_manifest(out, "run", {"config": asdict(config), "data_hash": train_data.data_hash, "model": base.source,
                                "model_fingerprint": base.fingerprint, "timings": timings})
    return records


def _stages(needs: tuple[str, ...]) -> set[str]:
    """Training stages a scorer's models come from: the policy is the warm-up model, θ_val the validation one."""
    stages = set()
    if "policy" in needs:
        stages.add("warmup")
    if "validation" in needs:
        stages |= {"warmup", "validation"}
    return stages
