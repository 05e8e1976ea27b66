"""Count (not time) the tokens each side feeds the backbone, over the floor, at small and larger numbers of pairs.

The floor is one forward pass over each pair's unique tokens (prompt once + both completions, after truncation, no
padding). prefsift: its own batch plan (`prefsift.engine.tokenize._batches`, the packed layout's padded width a
batch). TRL:
its collator's layout, batches of --trl-batch-size pairs in data order, a prompt+chosen and a prompt+rejected row a
pair, padded to the batch's longest row. Both shapes of bench/logps.py, SmolLM2's tokenizer.

    python bench/floor.py     # writes bench/results/floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from logps import DEFAULT_DATA, default_model, shape_rows  # noqa: E402

from prefsift.engine.tokenize import _batches, tokenize_pairs  # noqa: E402
from prefsift.models import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--trl-batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "floor.json"))
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows_out = []
    for shape, sizes in (("transcripts", (12, 500)), ("instructions", (6, 200))):
        for max_length in (512, 1024):
            for n in sizes:
                rows = shape_rows(shape, DEFAULT_DATA, None, n, max_length)
                kept = [t for t in tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                                  [r["rejected"] for r in rows], max_length) if t is not None]
                lengths = [len(t) for t in kept]
                floor = sum(lengths)
                ours = sum(len(b) * max(lengths[i] for i in b) for b in _batches(lengths, args.batch_tokens))
                trl = 0
                for lo in range(0, len(kept), args.trl_batch_size):
                    group = kept[lo:lo + args.trl_batch_size]
                    width = max(len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for t in group)
                    trl += 2 * len(group) * width
                rows_out.append({"shape": shape, "max_length": max_length, "pairs": len(kept), "floor_tokens": floor,
                                 "trl_x_floor": round(trl / floor, 3), "prefsift_x_floor": round(ours / floor, 3)})
                print(rows_out[-1], flush=True)
    Path(args.out).write_text(json.dumps({"command": "python bench/floor.py", "when": time.strftime("%Y-%m-%d"),
                                          "batch_tokens": args.batch_tokens, "trl_batch_size": args.trl_batch_size,
                                          "rows": rows_out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
