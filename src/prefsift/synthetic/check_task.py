"""Check that the embedded benchmark is a useful one, and fast: `python -m prefsift.synthetic.check_task`.

It builds the task, SFT-trains the tiny model, runs TRL's DPO from the SFT model on the full (noisy) train
set, on its clean pairs only, on its flipped pairs only and on a random 10%, and judges each policy's greedy
answers on the eval prompts against the SFT model's with the oracle. It checks that:
  1. the SFT model is not aligned (its answers' mean oracle reward is clearly below 1);
  2. DPO on the full noisy set beats the SFT model (win rate >= 0.6);
  3. DPO on the flipped pairs does much worse than on the clean ones (label noise matters);
  4. the same seed gives the same task, the same SFT weights and the same DPO result.
It prints a table and the timings, and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

import datasets
import torch
import transformers

from prefsift.config import EngineConfig
from prefsift.models import LoadedModel
from prefsift.synthetic.task import BenchmarkTask, TaskConfig, make_task, parse_prompt
from prefsift.synthetic.tiny import greedy_answers, sft_model
from prefsift.train import TrainConfig, train

# The DPO recipe this check verified (fp32 on CPU). beta 0.5 rather than TRL's 0.1: at 0.1 the clean run
# drifts far from the SFT model within an epoch and its greedy answers degrade, which hides the noise's cost.
DPO_LR = 2e-4
DPO_BETA = 0.5
DPO_BATCH_SIZE = 32
DPO_MAX_LENGTH = 32  # prompt <= 11 characters, response <= 7 + EOS


@dataclass
class Outcome:
    name: str
    n_pairs: int
    n_flipped: int
    train_seconds: float
    mean_reward: float
    exact: float
    lazy: float
    win_rate: float


def rows_hash(task: BenchmarkTask) -> str:
    """A fingerprint of every split, to compare two generations of the same config."""
    content = [task.train, task.validation, task.test, task.eval_prompts, task.sft_examples]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def params_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def dpo(
    model: torch.nn.Module,
    tokenizer: transformers.PreTrainedTokenizerFast,
    rows: list[dict],
    *,
    lr: float,
    beta: float,
    epochs: float,
    seed: int,
) -> tuple[torch.nn.Module, float]:
    """prefsift's TRL DPO from a copy of `model` (also the frozen reference); returns the policy and the seconds."""
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = TrainConfig(learning_rate=lr, epochs=epochs, batch_size=DPO_BATCH_SIZE, seed=seed,
                         gradient_checkpointing=False, logging_steps=10**6)
    engine = EngineConfig(beta=beta, max_length=DPO_MAX_LENGTH, dtype="float32")
    result = train(LoadedModel(copy.deepcopy(model), tokenizer, "sft", "sft"), data, config, engine)
    return result.model.eval(), result.seconds


def judge(
    task: BenchmarkTask, name: str, answers: list[str], baseline: list[float] | None
) -> tuple[list[float], dict]:
    """Oracle rewards of the answers, their exact/lazy shares and the win rate against `baseline` rewards."""
    rewards = [task.oracle_reward(p, a) for p, a in zip(task.eval_prompts, answers, strict=True)]
    exact = statistics.mean(a == task.answer(p) for p, a in zip(task.eval_prompts, answers, strict=True))
    lazy = statistics.mean(
        a == parse_prompt(p)[1] != task.answer(p) for p, a in zip(task.eval_prompts, answers, strict=True)
    )
    win = 0.5
    if baseline is not None:
        win = statistics.mean((r > b) + 0.5 * (r == b) for r, b in zip(rewards, baseline, strict=True))
    return rewards, {"mean_reward": statistics.mean(rewards), "exact": exact, "lazy": lazy, "win_rate": win}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=DPO_LR)
    parser.add_argument("--beta", type=float, default=DPO_BETA)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--no-repeat", action="store_true", help="skip the determinism re-runs (saves ~30 s)")
    args = parser.parse_args(argv)

    # One thread: the model is too small to split, and a second thread stalls on a core another process holds.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    config = TaskConfig(seed=args.seed)
    task = make_task(config)
    max_new_tokens = task.max_response_chars + 1

    start = time.perf_counter()
    model, tokenizer = sft_model(task, seed=args.seed)
    sft_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sft_answers = greedy_answers(model, tokenizer, task.eval_prompts, max_new_tokens=max_new_tokens)
    generate_seconds = time.perf_counter() - start
    sft_rewards, sft_stats = judge(task, "sft", sft_answers, None)

    rng = random.Random(args.seed)
    clean = [r for r in task.train if not r["is_flipped"]]
    subsets = {
        "full": task.train,
        "clean": clean,
        "flipped": [r for r in task.train if r["is_flipped"]],
        "random10": rng.sample(task.train, len(task.train) // 10),
    }
    outcomes = [Outcome("sft", 0, 0, sft_seconds, **sft_stats)]
    policies = {}
    for name, rows in subsets.items():
        policy, seconds = dpo(
            model, tokenizer, rows, lr=args.lr, beta=args.beta, epochs=args.epochs, seed=args.seed
        )
        answers = greedy_answers(policy, tokenizer, task.eval_prompts, max_new_tokens=max_new_tokens)
        _, stats = judge(task, name, answers, sft_rewards)
        outcomes.append(Outcome(name, len(rows), sum(r["is_flipped"] for r in rows), seconds, **stats))
        policies[name] = policy

    print(
        f"task seed {config.seed}: {len(task.train)} train pairs ({config.flip_rate:.0%} flipped, "
        f"{config.flip_lazy_share:.0%} of flips on lazy pairs), {len(task.eval_prompts)} eval prompts; "
        f"DPO lr {args.lr:g}, beta {args.beta:g}, {args.epochs:g} epoch(s), batch {DPO_BATCH_SIZE}"
    )
    print(
        f"{'run':10s} {'pairs':>6s} {'flipped':>7s} {'train_s':>8s} {'reward':>7s} {'exact':>6s} "
        f"{'lazy':>6s} "
        f"{'win_vs_sft':>10s}"
    )
    for o in outcomes:
        print(
            f"{o.name:10s} {o.n_pairs:6d} {o.n_flipped:7d} {o.train_seconds:8.1f} {o.mean_reward:7.3f} "
            f"{o.exact:6.1%} {o.lazy:6.1%} {o.win_rate:10.3f}"
        )
    by_name = {o.name: o for o in outcomes}
    full_epoch = by_name["full"].train_seconds / args.epochs
    print(
        f"timings: SFT {sft_seconds:.1f}s, one DPO epoch on the full train set {full_epoch:.1f}s "
        f"(incl. TRL set-up), greedy answers to {len(task.eval_prompts)} prompts {generate_seconds:.2f}s"
    )

    checks = [
        ("SFT model not aligned (mean reward <= 0.8)", sft_stats["mean_reward"] <= 0.8),
        ("DPO on the full noisy set wins >= 0.6 against SFT", by_name["full"].win_rate >= 0.6),
        (
            "DPO on flipped pairs loses (< 0.5) and trails clean by >= 0.2",
            by_name["flipped"].win_rate < 0.5
            and by_name["clean"].win_rate - by_name["flipped"].win_rate >= 0.2,
        ),
    ]
    print(
        f"info: clean - full win rate = {by_name['clean'].win_rate - by_name['full'].win_rate:+.3f} "
        "(what the label noise costs the full run)"
    )
    if not args.no_repeat:
        same_task = rows_hash(make_task(TaskConfig(seed=args.seed))) == rows_hash(task)
        again, _ = sft_model(make_task(TaskConfig(seed=args.seed)), seed=args.seed)
        same_sft = params_hash(again) == params_hash(model)
        repeat, _ = dpo(
            again, tokenizer, task.train, lr=args.lr, beta=args.beta, epochs=args.epochs, seed=args.seed
        )
        same_dpo = params_hash(repeat) == params_hash(policies["full"])
        print(
            f"determinism: task {rows_hash(task)} same={same_task}, SFT weights same={same_sft}, "
            f"DPO (full) weights same={same_dpo}"
        )
        checks.append(("same seed, same task, SFT and DPO weights", same_task and same_sft and same_dpo))
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
