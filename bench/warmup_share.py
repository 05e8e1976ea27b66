"""What makes the TIF pipeline pay for itself: its levers measured on the embedded task (issue 23, item 4).

The pipeline's whole compute (reference pass, warm-up DPO, validation model, scoring passes, the subset's training)
is measured per row in seconds by `prefsift run` itself (pipeline/accounting.py); this script runs the demo's task
and model once per setting of the levers and prints, for LossDiff-IRM at 10% and at the band rule's own share, its
compute against plain full training (DPO on every pair from the SFT model, the same run's `full` row from the
reference) beside its quality and random's at the same size. Levers: the warm-up on a share of the pairs
(`warmup_fraction`), fewer validation epochs, a LoRA validation model (`validation_lora`), and subsets that continue
from the warm-up (`start_from: warmup`: one run that warms up, then trains on the subset), and scoring a random
candidate pool instead of every pair (`score_share`: the pooled row is charged the pool's share of the reference
pass and its scoring passes over the pool, what a run of it alone computes). The reference pass is
computed once and reused by every training and evaluation in every setting (the pipeline's own behaviour).

    python bench/warmup_share.py [--settings paper warmup-0.1 ...] [--seeds 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from prefsift.data import load_pairs
from prefsift.demo import DemoConfig
from prefsift.evaluate import EvalConfig
from prefsift.models import LoadedModel
from prefsift.pipeline import RunConfig, Splits, run_pipeline
from prefsift.report import provenance
from prefsift.synthetic import sft_model
from prefsift.synthetic.task import OracleJudge, make_task

# name -> RunConfig overrides on top of the demo's recipe (warm-up 1 epoch on all pairs, validation 3 epochs)
SETTINGS: dict[str, dict] = {
    "paper": {"warmup_fraction": 1.0, "validation_epochs": 3.0},  # the TIF paper's, whatever RunConfig's defaults
    "warmup-0.25": {"warmup_fraction": 0.25},
    "warmup-0.1": {"warmup_fraction": 0.1},
    "warmup-0.25-val1": {"warmup_fraction": 0.25, "validation_epochs": 1.0},
    "warmup-0.1-val1": {"warmup_fraction": 0.1, "validation_epochs": 1.0},
    "warmup-0.25-lora-val": {"warmup_fraction": 0.25, "validation_lora": True},
    "warmup-0.1-val1-lora": {"warmup_fraction": 0.1, "validation_epochs": 1.0, "validation_lora": True},
    "continue-warmup-0.25": {"warmup_fraction": 0.25, "start_from": "both"},
    "continue-warmup-0.1-val1": {"warmup_fraction": 0.1, "validation_epochs": 1.0, "start_from": "both"},
    # LossDiff-IRM scores a random candidate pool of 30% of the pairs (its 10% budget and its band rule pick there)
    "pool-0.3-warmup-0.1-val1": {"score_share": 0.3, "warmup_fraction": 0.1, "validation_epochs": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline-levers.json"))
    args = parser.parse_args()
    # every pass measured here, none read from an earlier run's log-prob cache (the same warm-up model trained again
    # would find its pass there, and its scoring would cost nothing)
    os.environ["PREFSIFT_CACHE"] = "off"
    torch.set_num_threads(1)
    demo = DemoConfig()
    demo = replace(demo, task=replace(demo.task, seed=args.seed), train=replace(demo.train, seed=args.seed))
    task = make_task(demo.task)
    model, tokenizer = sft_model(task, seed=args.seed)
    base = LoadedModel(model, tokenizer, "sft", "sft")
    splits = Splits(*(load_pairs(Dataset.from_list(rows)) for rows in (task.train, task.validation, task.test)),
                    eval_prompts=list(task.eval_prompts))
    code = provenance()
    results: list[dict] = []
    for name in args.settings:
        with tempfile.TemporaryDirectory() as out:
            config = RunConfig(out=str(Path(out)), methods=["random", "lossdiff-irm"], fractions=[0.1],
                               warmup_epochs=demo.warmup_epochs, validation_epochs=demo.validation_epochs,
                               start_from="reference", train=demo.train, engine=demo.engine, seed=args.seed,
                               seeds=args.seeds, eval=EvalConfig(max_new_tokens=demo.max_new_tokens, batch_size=256,
                                                                 eval_prompts=len(task.eval_prompts)))
            config = replace(config, **SETTINGS[name])
            began = time.perf_counter()
            records = run_pipeline(config, splits=splits, base=base, judge=OracleJudge(task), log=lambda _: None,
                                   quiet=True)["records"]
            wall = time.perf_counter() - began
        full = [r for r in records if r["method"] == "full" and r["start_from"] == "reference"]
        # one epoch of full training in reference passes over the same pairs: what a training costs on this machine
        epoch = float(np.mean([r["compute_cpu_parts"]["train"] / demo.train.epochs
                               / r["compute_cpu_parts"]["reference"] for r in full]))
        results.append({"setting": name, "overrides": SETTINGS[name], "wall_seconds": round(wall, 1),
                        "epoch_in_reference_passes": round(epoch, 2), "rows": rows_against_full(records)})
        print_setting(results[-1])
    args.out.write_text(json.dumps({
        "command": "python bench/warmup_share.py " + " ".join(
            ["--settings", *args.settings, "--seeds", str(args.seeds), "--seed", str(args.seed)]),
        **code, "logps_cache": "off",
        "machine": {"cpu": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": 1, "load_average_1min": os.getloadavg()[0]},
        "demo": {"task": asdict(demo.task), "train": asdict(demo.train), "engine": asdict(demo.engine),
                 "warmup_epochs": demo.warmup_epochs, "validation_epochs": demo.validation_epochs},
        "settings": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


def rows_against_full(records: list[dict]) -> list[dict]:
    """Each (start, method, budget) over seeds: its measured compute as a share of plain full training (the same
    seed's `full` row trained from the reference), in CPU seconds (what this process computed: on a machine others
    share, wall seconds swing with their load) and in wall seconds, its parts, and its quality."""
    full = {r["seed"]: r for r in records if r["method"] == "full" and r["start_from"] == "reference"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["start_from"], r["method"], r["budget"]), []).append(r)
    rows = []
    for (start, method, budget), group in groups.items():
        parts = {k: round(float(np.mean([r["compute_cpu_parts"].get(k, 0.0) for r in group])), 3)
                 for k in group[0]["compute_cpu_parts"]}
        rows.append({"start_from": start, "method": method, "budget": budget,
                     "n_pairs": float(np.mean([r["n_pairs"] for r in group])),
                     "cpu_seconds": round(float(np.mean([r["compute_cpu"] for r in group])), 3),
                     "cpu_seconds_parts": parts,
                     "x_full": round(float(np.mean([r["compute_cpu"] / full[r["seed"]]["compute_cpu"]
                                                    for r in group])), 3),
                     "wall_seconds": round(float(np.mean([r["compute"] for r in group])), 3),
                     "wall_x_full": round(float(np.mean([r["compute"] / full[r["seed"]]["compute"]
                                                         for r in group])), 3),
                     "pair_passes_x_full": round(float(np.mean([r["pair_passes"] / full[r["seed"]]["pair_passes"]
                                                                for r in group])), 3),
                     "win_rate": round(float(np.mean([r["win_rate"] for r in group])), 4),
                     "pref_accuracy": round(float(np.mean([r["pref_accuracy"] for r in group])), 4),
                     "n_seeds": len(group)})
    return rows


def print_setting(result: dict) -> None:
    print(f"\n{result['setting']} {result['overrides']} ({result['wall_seconds']:.0f}s; a training epoch costs "
          f"{result['epoch_in_reference_passes']:.1f} reference passes)")
    print(f"{'start':>9} {'method':>13} {'budget':>18} {'pairs':>6} {'cpu s':>8} {'× full':>7} {'wall × full':>11} "
          f"{'passes × full':>13} {'win':>6} {'acc':>6}  cpu parts")
    for r in result["rows"]:
        print(f"{r['start_from']:>9} {r['method']:>13} {r['budget']:>18} {r['n_pairs']:>6.0f} {r['cpu_seconds']:>8.2f} "
              f"{r['x_full']:>7.3f} {r['wall_x_full']:>11.3f} {r['pair_passes_x_full']:>13.3f} {r['win_rate']:>6.3f} "
              f"{r['pref_accuracy']:>6.3f}  " + " ".join(f"{k}={v:.2f}" for k, v in r["cpu_seconds_parts"].items()))


if __name__ == "__main__":
    main()
