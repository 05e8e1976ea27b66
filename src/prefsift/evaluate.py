"""Evaluation: held-out preference accuracy, and the win rate of the aligned policy's greedy answers against the
reference policy's, judged by a pluggable judge (the embedded oracle, or a reward model)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from prefsift.config import EngineConfig, EvalConfig  # noqa: F401 (EvalConfig: re-exported)
from prefsift.engine import Engine
from prefsift.engine.reward import reward_scores
from prefsift.engine.tokenize import non_finite_logps
from prefsift.errors import ConfigError, ModelError
from prefsift.manifest import model_failure
from prefsift.maths import implicit_reward_margin
from prefsift.models import LoadedModel
from prefsift.output import progress as bar
from prefsift.reference import cached_logps


class Judge(Protocol):
    """Scores responses; higher is better. The win rate compares two responses to the same prompt."""

    name: str

    def score(self, prompts: list, responses: list[str]) -> list[float]: ...


class RewardModelJudge:
    name = "reward_model"

    def __init__(self, loaded: LoadedModel, max_length: int | None, batch_size: int = EvalConfig.batch_size,
                 quiet: bool = False) -> None:
        self.loaded = loaded
        self.max_length = max_length
        self.batch_size = batch_size
        self.quiet = quiet  # a pipeline that hides its generation bars hides the judge's too

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        messages = [[{"role": "assistant", "content": r}] for r in responses]
        answers = messages if prompts and isinstance(prompts[0], list) else responses
        # a reward model over hundreds of answers takes minutes on a CPU: its own progress bar, as generation has
        return reward_scores(self.loaded.model, self.loaded.tokenizer, prompts, answers,
                             max_length=self.max_length, batch_size=self.batch_size,
                             desc=None if self.quiet else "judge scores").tolist()


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompts: list, *, max_new_tokens: int = 128, batch_size: int = 32,
                   desc: str = "answers", quiet: bool = False) -> list[str]:
    """Greedy completions of each prompt (plain text, or messages through the chat template), new tokens only; a
    progress bar over the prompts unless `quiet`."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list)
             else p for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    device = next(model.parameters()).device
    answers: list[str] = []
    progress = bar(total=len(texts), desc=desc, unit="prompt", disable=quiet or not texts,
                   cheaper=f"fewer --eval-prompts (now {len(texts)}), a lower --max-new-tokens (now "
                           f"{max_new_tokens}) or a GPU (--device cuda)" if device.type == "cpu" else
                           f"fewer --eval-prompts (now {len(texts)}) or a lower --max-new-tokens (now "
                           f"{max_new_tokens})")
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                if tokenizer.eos_token_id in row:  # generate pads finished rows; cut at the first EOS
                    row = row[: row.index(tokenizer.eos_token_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
            progress.update(len(texts[start:start + batch_size]))
    finally:
        progress.close()
        tokenizer.padding_side = side
    return answers


def win_rate_prompts(data, limit: int) -> list:
    """The first `limit` distinct prompts of a pairs table (plain text deduplicated; messages kept as they are)."""
    prompts = list(data.pairs["prompt"])
    if not data.conversational:
        prompts = list(dict.fromkeys(prompts))
    return prompts[:limit]


def preference_outcomes(policy_logps: np.ndarray, reference_logps: np.ndarray, beta: float) -> np.ndarray:
    """Per held-out pair: 1 where the implicit reward ranks chosen above rejected, ½ on a zero margin, 0 below;
    NaN for a pair TRL drops (prompt fills max_length)."""
    margin = implicit_reward_margin(policy_logps, reference_logps, beta)
    return np.where(np.isnan(margin), np.nan, (margin > 0) + 0.5 * (margin == 0))


def preference_accuracy(policy_logps: np.ndarray, reference_logps: np.ndarray, beta: float) -> float:
    """Share of held-out pairs whose implicit reward ranks chosen above rejected (ties count half)."""
    outcomes = preference_outcomes(policy_logps, reference_logps, beta)
    return float(np.nanmean(outcomes)) if not np.isnan(outcomes).all() else float("nan")


@dataclass
class WinRate:
    win_rate: float  # P(policy better) + ½ P(tie)
    wins: int
    ties: int
    losses: int
    policy_mean_score: float
    baseline_mean_score: float
    outcomes: list[float]  # per prompt: 1 win, ½ tie, 0 loss
    policy_scores: list[float] = field(default_factory=list)  # the judge's score of each answer
    baseline_scores: list[float] = field(default_factory=list)


def win_rate(judge: Judge, prompts: list, policy_answers: list[str], baseline_answers: list[str],
             tie_tolerance: float = 1e-9) -> WinRate:
    """The judge scores both answers to each prompt; a difference within `tie_tolerance` is a tie (counts ½)."""
    a = np.asarray(judge.score(prompts, policy_answers), dtype=float)
    b = np.asarray(judge.score(prompts, baseline_answers), dtype=float)
    failed = ~(np.isfinite(a) & np.isfinite(b))
    if failed.any():  # NaN > NaN is False: every such prompt would count as a loss
        raise model_failure(f"the judge ({judge.name})", failed, None, "check the judge model's weights and --dtype",
                            tokenized=False, unit="answers")
    outcomes = np.where(np.abs(a - b) <= tie_tolerance, 0.5, (a > b).astype(float))
    wins, ties = int((outcomes == 1).sum()), int((outcomes == 0.5).sum())
    return WinRate(float(outcomes.mean()) if len(a) else float("nan"), wins, ties, len(a) - wins - ties,
                   float(a.mean()), float(b.mean()), outcomes.tolist(), a.tolist(), b.tolist())


def evaluate(policy: LoadedModel, reference: LoadedModel | None, *, test_pairs=None, prompts: list | None = None,
             judge: Judge | None = None, config: EvalConfig | None = None, engine: EngineConfig | None = None,
             reference_logps: np.ndarray | None = None, baseline_answers: list[str] | None = None,
             quiet: bool = False) -> dict:
    """Preference accuracy on `test_pairs` and win rate on `prompts` (needs `judge`); returns a flat record, with
    the per-item outputs as lists: `pref_margins` (each test pair's implicit reward margin, None where TRL drops
    it) and `pref_outcomes`; `answers` / `baseline_answers` (what the judge saw) with `policy_scores` /
    `baseline_scores` and `win_outcomes`. `quiet` hides the generation progress bars.

    Without a reference there is no implicit reward: `logp_accuracy` (chosen more likely than rejected) is reported
    instead, and no win rate.

    `reference_logps` / `baseline_answers` let a caller that evaluates many policies compute the reference's
    side once."""
    config, engine = config or EvalConfig(), engine or EngineConfig()
    start = time.perf_counter()
    record: dict = {}
    if test_pairs is not None and len(test_pairs):
        policy_logps = _checked(_logps(policy, test_pairs, engine, "policy"), policy, test_pairs, engine,
                                "evaluated model")
        if np.isnan(policy_logps[:, 0]).all():
            raise ConfigError(f"every test pair's prompt fills max_length={engine.max_length}: nothing to evaluate")
        if reference is None:
            kept = policy_logps[~np.isnan(policy_logps[:, 0])]
            record["logp_accuracy"] = float(np.mean(kept[:, 0] > kept[:, 1])) if len(kept) else float("nan")
        else:
            if reference_logps is None:
                reference_logps = _logps(reference, test_pairs, engine, "reference")
            reference_logps = _checked(reference_logps, reference, test_pairs, engine, "reference model")
            outcomes = preference_outcomes(policy_logps, reference_logps, engine.beta)
            margins = implicit_reward_margin(policy_logps, reference_logps, engine.beta)
            record["pref_accuracy"] = float(np.nanmean(outcomes))
            record["pref_outcomes"] = [None if np.isnan(x) else float(x) for x in outcomes]  # None: dropped
            record["pref_margins"] = [None if np.isnan(x) else float(x) for x in margins]
    if prompts and reference is not None:
        if judge is None:
            raise ModelError("a win rate needs a judge (--judge-model: a reward model)")
        if baseline_answers is None:
            baseline_answers = greedy_answers(reference.model, reference.tokenizer, prompts,
                                              max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                              desc="reference answers", quiet=quiet)
        answers = greedy_answers(policy.model, policy.tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                                 batch_size=config.batch_size, desc="policy answers", quiet=quiet)
        result = win_rate(judge, prompts, answers, baseline_answers)
        record.update({"win_rate": result.win_rate, "wins": result.wins, "ties": result.ties,
                       "losses": result.losses, "judge": judge.name,
                       "policy_mean_score": result.policy_mean_score,
                       "baseline_mean_score": result.baseline_mean_score, "win_outcomes": result.outcomes,
                       "answers": answers, "baseline_answers": list(baseline_answers),
                       "policy_scores": result.policy_scores, "baseline_scores": result.baseline_scores})
    record["eval_seconds"] = time.perf_counter() - start
    return record


def _checked(logps: np.ndarray, loaded: LoadedModel, pairs, engine: EngineConfig, role: str) -> np.ndarray:
    """`logps` when every NaN is a pair whose prompt fills max_length (TRL drops it: no outcome); a NaN or inf of a
    pair that fits is the model's failure, one line naming it, never an evaluation over the pairs it left."""
    _, failed = non_finite_logps(logps, loaded.tokenizer, pairs, engine.max_length)
    if failed.any():
        raise model_failure(f"the {role} {loaded.source}", failed, list(pairs["pair_id"]) if "pair_id" in
                            pairs.column_names else None, "check its weights (NaN or inf) and --dtype",
                            max_length=engine.max_length)
    return logps


def _logps(loaded: LoadedModel, pairs, engine: EngineConfig, desc: str) -> np.ndarray:
    """A test pass, read from the log-prob cache when a command already made it (e.g. `run`'s reference pass)."""
    return cached_logps(loaded, pairs, engine, lambda: Engine(engine).logps(loaded.model, loaded.tokenizer, pairs,
                                                                            desc=desc))


PER_ITEM = ("pref_margins", "answers", "baseline_answers", "policy_scores", "baseline_scores")


def write_eval_outputs(record: dict, out_dir: Path, *, pair_ids: list[str] | None = None,
                       prompts: list | None = None) -> dict:
    """What an evaluation saw, item by item, beside its summary: `eval_pairs.jsonl` (pair_id, the implicit reward
    margin, correct: 1, ½ on a zero margin, 0, null where TRL drops the pair) and `answers.jsonl` (prompt, the
    policy's and the reference's greedy answers, the judge's score of each, the outcome). Returns `record` without
    the per-item lists those files hold."""
    from prefsift.select import write_jsonl

    out_dir = Path(out_dir)
    if "pref_margins" in record and pair_ids is not None:
        write_jsonl(out_dir / "eval_pairs.jsonl", (
            {"pair_id": pid, "margin": margin, "correct": outcome} for pid, margin, outcome in
            zip(pair_ids, record["pref_margins"], record["pref_outcomes"], strict=True)))
    if "answers" in record and prompts is not None:
        write_jsonl(out_dir / "answers.jsonl", (
            {"prompt": prompt, "answer": answer, "reference_answer": reference, "score": score,
             "reference_score": reference_score, "outcome": outcome}
            for prompt, answer, reference, score, reference_score, outcome in
            zip(prompts, record["answers"], record["baseline_answers"], record["policy_scores"],
                record["baseline_scores"], record["win_outcomes"], strict=True)))
    return {k: v for k, v in record.items() if k not in PER_ITEM}
