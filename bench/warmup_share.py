"""What cutting the warm-up costs: LossDiff-IRM on the embedded task with the warm-up DPO on less of the data.

The TIF pipeline (Zhang et al., ICLR 2026) pays for a full warm-up DPO epoch before it can score. `warmup_fraction`
trains the warm-up model on a share of the pairs instead. This script runs the demo's task and model once per share
and prints the scoring cost against the quality of the LossDiff-IRM subset, beside random at the same size.

    python bench/warmup_share.py [--shares 1.0 0.5 0.25] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset

from prefsift.data import load_pairs
from prefsift.demo import DemoConfig
from prefsift.evaluate import EvalConfig
from prefsift.models import LoadedModel
from prefsift.pipeline import RunConfig, Splits, run_pipeline
from prefsift.synthetic import sft_model
from prefsift.synthetic.task import OracleJudge, make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = DemoConfig()
    demo.task.seed = demo.train.seed = args.seed
    task = make_task(demo.task)
    model, tokenizer = sft_model(task, seed=args.seed)
    base = LoadedModel(model, tokenizer, "sft", "sft")
    splits = Splits(*(load_pairs(Dataset.from_list(rows)) for rows in (task.train, task.validation, task.test)),
                    eval_prompts=list(task.eval_prompts))
    rows = []
    for share in args.shares:
        with tempfile.TemporaryDirectory() as out:
            config = RunConfig(out=str(Path(out)), methods=["random", "lossdiff-irm"], fractions=[], full=False,
                               warmup_fraction=share, warmup_epochs=demo.warmup_epochs,
                               validation_epochs=demo.validation_epochs, start_from="warmup",
                               train=demo.train, engine=demo.engine, seed=args.seed,
                               eval=EvalConfig(max_new_tokens=demo.max_new_tokens, batch_size=256))
            start = time.perf_counter()
            records = run_pipeline(config, splits=splits, base=base, judge=OracleJudge(task),
                                   log=lambda _: None)["records"]
            wall = time.perf_counter() - start
        by_method = {r["method"]: r for r in records}
        rows.append((share, by_method["lossdiff-irm"], by_method["random"], wall))
    print(f"{'warm-up share':>13} {'LD-IRM pair passes':>18} {'kept':>5} {'LD-IRM win':>10} {'random win':>10} "
          f"{'LD-IRM flipped kept':>19} {'run s':>6}")
    for share, ours, rand, wall in rows:
        print(f"{share:>13.2f} {ours['compute']:>18.0f} {ours['n_pairs']:>5} {ours['win_rate']:>10.3f} "
              f"{rand['win_rate']:>10.3f} {ours['flipped_kept']:>19.3f} {wall:>6.0f}")


if __name__ == "__main__":
    main()
