"""The whole flow from one config (`prefsift run`), following the TIF paper's pipeline:

warm-up DPO on the training pairs → θ; DPO on the validation pairs from θ → θ_val; score every training pair
(random, irm, lossdiff, lossdiff-irm, ...); select each method's subset at each fraction; train on each subset;
evaluate each policy against the reference; write results.json, a Markdown table and a plot.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prefsift.data import LoadedPairs, data_hash_of, load_pairs
from prefsift.errors import ConfigError
from prefsift.evaluate import EvalConfig, Judge, RewardModelJudge, evaluate, greedy_answers, load_reward_model
from prefsift.logps import compute_logps
from prefsift.manifest import write_manifest
from prefsift.models import LoadedModel, load_model
from prefsift.report import write_results
from prefsift.score import write_scores_table
from prefsift.scorers import ScoringContext, get_scorer
from prefsift.scorers.base import LOGPS_COLUMNS
from prefsift.select import band_mask, select_indices
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
    start_from: str = field(default="reference", metadata={"help": "Subsets train from the 'reference' (SFT) "
                                                                   "model or continue from the 'warmup' model."})
    band_low: float = field(default=0.1, metadata={"help": "Lower percentile of the middle bands."})
    band_high: float = field(default=0.9, metadata={"help": "Upper percentile of the middle bands."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "DPO settings of every run."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation settings."})
    judge_model: str | None = field(default=None, metadata={"help": "Reward model judging win rates."})
    eval_prompts: int = field(default=200, metadata={"help": "Held-out prompts for the win rate."})
    seed: int = field(default=0, metadata={"help": "Seed of splits, random scores and training."})

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
        for method in self.methods:
            get_scorer(method)


def _hash_order(pair_ids: list[str], seed: int) -> np.ndarray:
    keys = [hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest() for pid in pair_ids]
    return np.argsort(np.asarray(keys))


def split_pairs(data: LoadedPairs, validation_fraction: float, test_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, validation, test), by a seeded hash of pair_id: reproducible and order-free."""
    order = _hash_order(list(data.pairs["pair_id"]), seed)
    n = len(order)
    n_test, n_val = round(test_fraction * n), round(validation_fraction * n)
    return np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val]), np.sort(order[:n_test])


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
    if len(validation.pairs) == 0:
        raise ConfigError("the validation split is empty: raise validation_fraction or give validation_data")
    prompts = list(test.pairs["prompt"])
    if not test.conversational:
        prompts = list(dict.fromkeys(prompts))  # unique plain-text prompts, in order
    prompts = prompts[: config.eval_prompts]
    return Splits(_subset(data, train_rows), validation, test, prompts)


def _copy(loaded: LoadedModel, tag: str) -> LoadedModel:
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, f"{loaded.source}#{tag}", f"{tag}")


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
    train_data, tc = splits.train, config.train
    n_train = len(train_data.pairs)
    log(f"train {n_train} pairs, validation {len(splits.validation.pairs)}, "
        f"test {len(splits.test.pairs) if splits.test else 0}, eval prompts {len(splits.eval_prompts)}")
    logps_kwargs = {"max_length": tc.max_length, "batch_tokens": tc.batch_tokens}

    # Reference log-probs of every split: computed once, reused by warm-up, validation, every subset and eval.
    start = time.perf_counter()
    ref_train = compute_logps(base.model, base.tokenizer, train_data.pairs, desc="reference log-probs (train)",
                              **logps_kwargs)
    reference_seconds = time.perf_counter() - start
    ref_val = compute_logps(base.model, base.tokenizer, splits.validation.pairs, desc="reference (validation)",
                            **logps_kwargs)
    ref_test = (compute_logps(base.model, base.tokenizer, splits.test.pairs, desc="reference (test)",
                              **logps_kwargs) if splits.test is not None and len(splits.test.pairs) else None)

    needs = {role for m in config.methods for role in get_scorer(m).needs}
    models = {"reference": base}
    timings = {"reference": reference_seconds}
    warmup = None
    if needs & set(ROLES_TRAINED_FROM_WARMUP) or config.start_from == "warmup":
        warm_rows = np.sort(_hash_order(list(train_data.pairs["pair_id"]), config.seed + 1)[
            : max(1, round(config.warmup_fraction * n_train))])
        log(f"warm-up DPO on {len(warm_rows)} pairs")
        warmup = _copy(base, "warmup")
        result = train(warmup, train_data.pairs.select(warm_rows.tolist()),
                       TrainConfig(**{**asdict(tc), "epochs": config.warmup_epochs}), ref_logps=ref_train[warm_rows])
        timings["warmup"] = result.seconds
        models["policy"] = warmup
    if "validation" in needs:
        log(f"validation DPO on {len(splits.validation.pairs)} pairs from the warm-up model")
        validation = _copy(warmup, "validation")
        result = train(validation, splits.validation.pairs,
                       TrainConfig(**{**asdict(tc), "epochs": config.validation_epochs}), ref_logps=ref_val)
        timings["validation"] = result.seconds
        models["validation"] = validation

    context = ScoringContext(pairs=train_data.pairs, raw=train_data.raw, models=models, beta=tc.beta,
                             max_length=tc.max_length, batch_tokens=tc.batch_tokens, seed=config.seed,
                             out_dir=out / "scores", data_hash=train_data.data_hash,
                             band=(config.band_low, config.band_high))
    context.provide("reference", ref_train, reference_seconds)
    scores: dict[str, np.ndarray] = {"pair_id": np.asarray(train_data.pairs["pair_id"], dtype=object)}
    score_seconds: dict[str, float] = {}
    for method in config.methods:
        scorer = get_scorer(method)
        for role in scorer.needs:
            if role in LOGPS_COLUMNS:
                context.logps(role)  # once per model, shared by every scorer that needs it
        start = time.perf_counter()
        scores.update(scorer.score(context))
        # The honest cost of a score: its own time, the log-prob passes and the trainings its models needed.
        score_seconds[method] = (time.perf_counter() - start
                                 + sum(context.seconds.get(role, 0.0) for role in scorer.needs)
                                 + sum(timings.get(stage, 0.0) for stage in _stages(scorer.needs)))
    scores.update(context.logps_columns())
    write_scores_table(out / "scores", scores, train_data)

    budgets = [(f, None) for f in config.fractions]
    if config.rule_share:
        irm_like = [scores[c] for c in ("lossdiff", "irm") if c in scores]
        if len(irm_like) == 2:
            keep = band_mask(irm_like[0], config.band_low, config.band_high, scores["pair_id"]) & band_mask(
                irm_like[1], config.band_low, config.band_high, scores["pair_id"])
            share = round(float(keep.mean()), 3)
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
            rows = np.flatnonzero(~np.isnan(ref_train[:, 0]))
        else:
            rule = dict(get_scorer(method).default_rule)
            name = rule.pop("rule")
            column = rule.get("column") or (None if "columns" in rule else get_scorer(method).columns[0])
            rows = select_indices(scores, name, column=column, columns=rule.get("columns"),
                                  fraction=None if count else fraction, count=count)
        log(f"{method} @ {fraction:.0%}: training on {len(rows)} pairs")
        policy = _copy(start_model, f"{method}-{fraction}")
        result = train(policy, train_data.pairs.select(rows.tolist()), tc, ref_logps=ref_train[rows])
        record = {"method": method, "fraction": fraction, "n_pairs": int(len(rows)),
                  "score_seconds": round(score_seconds.get(method, 0.0), 3),
                  "train_seconds": round(result.seconds, 3)}
        evaluation = evaluate(policy, base, test_pairs=splits.test.pairs if ref_test is not None else None,
                              prompts=splits.eval_prompts if judge is not None else None, judge=judge,
                              config=eval_config, reference_logps=ref_test, baseline_answers=baseline_answers)
        record.update({"win_rate": evaluation.get("win_rate"), "pref_accuracy": evaluation.get("pref_accuracy")})
        record.update({k: evaluation[k] for k in ("wins", "ties", "losses") if k in evaluation})
        for column, name in (("is_flipped", "flipped_kept"), ("is_near_tie", "near_tie_kept")):
            share = _hidden_share(train_data.raw, rows, column)
            if share is not None:
                record[name] = round(share, 3)
        log("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        records.append(record)
        del policy
    write_results(records, out)
    write_manifest(out, "run", {"config": asdict(config), "data_hash": train_data.data_hash, "model": base.source,
                                "timings": timings})
    return records


def _stages(needs: tuple[str, ...]) -> set[str]:
    """Training stages a scorer's models come from: the policy is the warm-up model, θ_val the validation one."""
    stages = set()
    if "policy" in needs:
        stages.add("warmup")
    if "validation" in needs:
        stages |= {"warmup", "validation"}
    return stages
