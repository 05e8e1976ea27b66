"""Benchmark on a GPU: the log-prob engine, exact influence and DPO training on Llama shapes with random weights.

Issues 8 and 10 ask for GPU figures that a CPU cannot give: tokens/s and model FLOPs utilisation (MFU) of the
log-prob pass in bf16 with the fast attention kernels, its ratio to TRL's reference pass there, and the speed of
finite-difference / forward-mode influence against per-example gradients when a GPU batches the forward passes.
Random weights: timings do not depend on the values, and no hub is reachable from the device machine.

Data: synthetic pairs of word tokens ("w17 w90412 ...") with a word-level tokenizer over the model's vocabulary, so
TRL and prefsift each tokenize text as they do on real data, and every token id is one the model has. Lengths follow
the two shapes of bench/logps.py: transcripts (long prompts, short answers) and instructions (short prompts, long
answers), cut to fit max_length (no truncation on either side).

Rows of the log-prob table (model in --dtype, default bf16, SDPA attention), "x floor" over the unpadded floor:
  floor (padded)    one causal forward over each pair's unique tokens (prompt|chosen|rejected as one row,
                    right-padded, no mask: the flash kernel) and the LM head on the completion positions only
  floor (unpadded)  the same tokens with no padding: a batch one flat sequence, each pair one causal document
                    (FlashAttention's varlen kernel), the head on completions only: the speed of light
  prefsift          `logps_of_tokenized`, the path rule's choice per batch; then each exact padded path forced
  unpadded flex / jagged   the unpadded layout (EngineConfig.layout), compiled flex's length buckets warmed first
  TRL               TRL's `DPOTrainer._precompute_ref_logps` on its own tokenized rows (prompt twice, padded)
MFU counts the useful FLOPs (unique tokens through the backbone, the head on scored positions, the attention
entries the pairs need) over seconds × the card's dense peak.

Rows of the influence table (fp32, TF32 off: finite differences need it; per `bench/influence.py`): the log-prob
pass (IRM's cost), finite difference, jvp, per-example gradients; seconds a pair, × the pass, per-example / it,
Spearman and largest error against per-example; the one-sided difference also at the step `choose_step` takes on
4 check pairs (no hand-set step; the choice's once-off seconds apart).

The training table: one DPO epoch of --train-pairs pairs, prefsift's `train` against TRL's DPOTrainer on fresh
copies of the same model (fp32 weights, autocast to --dtype), as bench/train.py compares them on a CPU.

The JSON (--json) is written after every table, with the commit and whether the tree was dirty; --minutes starts no
further table past that time.

    # check the script anywhere (~2 minutes on a busy 2-core CPU):
    python bench/gpu.py --shapes tiny --device cpu --dtype float32 --n-pairs 16 --max-length 128 \
        --influence-pairs 8 --n-val 4 --train-pairs 8 --repeats 1 --json bench/results/gpu-tiny-cpu.json
    # on one GPU, every table (docs/benchmarks.md):
    python bench/gpu.py --shapes 0.6b 1.8b --max-length 1024 --minutes 7 --json bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# offline, and no progress bars (tqdm reads TQDM_DISABLE when it is imported): set before any import that loads it
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))  # the device machine runs from the working tree
import prefsift.engine.forward  # noqa: E402
import prefsift.engine.logps  # noqa: E402
import prefsift.engine.paths  # noqa: E402
from prefsift.engine import influence as inf  # noqa: E402
from prefsift.engine.paths import logps_of_tokenized  # noqa: E402
from prefsift.engine.tokenize import TokenizedPair, pad_id, tokenize_pairs  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture shape: the layer counts and widths of a published model of that size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # the LM head shares the input embedding's weights


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000, tied=True),
    "0.6b": Shape(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072, vocab=151936,
                  tied=True),  # Qwen3-0.6B: 0.60B parameters
    "1.8b": Shape(hidden=2048, layers=24, heads=16, kv_heads=16, head_dim=128, intermediate=5504, vocab=151936,
                  tied=False),  # Qwen1.5-1.8B: 1.84B parameters
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks (SXM)
PEAK_FP32 = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12}  # without TF32


def make_model(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate, max_position_embeddings=8192,
                         tie_word_embeddings=shape.tied,
                         eos_token_id=0, pad_token_id=1, bos_token_id=None, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def word_tokenizer(vocab: int):
    """Word-level: "w<id>" is token id, split on spaces; id 0 is EOS, id 1 padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def synthetic_rows(data_shape: str, n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Prompt / chosen / rejected texts whose word counts follow `data_shape`, fitting max_length with the EOS."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        if data_shape == "transcripts":
            n_prompt = int(rng.uniform(0.4, 0.75) * max_length)
            room = max_length - n_prompt - 1
            n_chosen, n_rejected = (int(rng.uniform(0.1, 0.6) * room) for _ in range(2))
        else:
            n_prompt = int(rng.uniform(0.02, 0.1) * max_length)
            room = max_length - n_prompt - 1
            n_chosen, n_rejected = (int(rng.uniform(0.25, 1.0) * room) for _ in range(2))

        def words(k: int) -> str:
            return " ".join(f"w{i}" for i in rng.integers(2, vocab, size=max(k, 1)))

        rows.append({"prompt": words(n_prompt), "chosen": " " + words(n_chosen), "rejected": " " + words(n_rejected)})
    return rows


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(repeats: int, device: str, fn, *args, **kwargs) -> tuple[object, float]:
    """(result, fastest wall seconds of `repeats` calls), the device synchronised around each."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


@torch.inference_mode()
def floor_pass(model, tokenized: list[TokenizedPair], batch_tokens: int) -> None:
    """The forward-pass floor: each pair's unique tokens as one causal row (no mask: the model's fastest kernel; the
    rejected tokens also see the chosen ones, which costs the same), the head on completion positions only."""
    base, backbone, head = prefsift.engine.forward._backbone_and_head(model)
    device = head.weight.device
    plan = prefsift.engine.paths.BatchPlan.of(tokenized, batch_tokens)
    for batch in plan.batches:
        pairs = [tokenized[i] for i in batch]
        width = max(len(p) for p in pairs)
        ids = torch.ones((len(pairs), width), dtype=torch.long)
        rows, cols = [], []
        for b, p in enumerate(pairs):
            ids[b, :len(p)] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
            rows += [b] * (len(p) - len(p.prompt_ids))
            cols += range(len(p.prompt_ids) - 1, len(p) - 1)
        hidden = backbone(input_ids=ids.to(device), use_cache=False).last_hidden_state
        targets = ids[rows, [c + 1 for c in cols]].to(device)
        at = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        prefsift.engine.forward._token_logps(base.config, head, hidden[at], targets)


@torch.inference_mode()
def floor_unpadded_pass(model, tokenized: list[TokenizedPair], batch_tokens: int) -> None:
    """The unpadded floor: each batch one flat sequence of its pairs' unique tokens, no padding at all, each pair one
    causal document (variable-length attention: FlashAttention's varlen kernel on a GPU in bf16, else SDPA a pair at
    a time), the head on completion positions only."""
    forward = prefsift.engine.forward
    base, backbone, head = forward._backbone_and_head(model)
    device = head.weight.device
    plan = prefsift.engine.paths.BatchPlan.of(tokenized, batch_tokens)
    for batch in plan.batches:
        pairs = [tokenized[i] for i in batch]
        lengths = [len(p) for p in pairs]
        ids = torch.tensor([t for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids], device=device)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        flat = forward.FlatBatch("jagged", ids[None], positions[None], torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), len(pairs))
        flat.documents = flat.back = torch.arange(len(ids), device=device)
        flat.bounds = torch.tensor(starts, dtype=torch.int32, device=device)
        flat.longest = max(lengths)
        with forward._flat_attention_on(model, flat):
            hidden = backbone(input_ids=flat.input_ids, position_ids=flat.position_ids, use_cache=False
                              ).last_hidden_state[0]
        cols = [int(start) + c for start, p in zip(starts, pairs, strict=False)
                for c in range(len(p.prompt_ids) - 1, len(p) - 1)]
        at = torch.tensor(cols, device=device)
        forward._token_logps(base.config, head, hidden[at], ids[at + 1])


def useful_flops(model, tokenized: list[TokenizedPair]) -> float:
    """Forward FLOPs the pairs need: 2 × backbone weights a unique token, 2 × hidden × vocab a scored position, and
    4 × width × layers an attention entry of the prompt|chosen / prompt|rejected causal pattern."""
    per_token, per_entry = prefsift.engine.paths._flops(model)
    head = model.get_output_embeddings().weight.numel()
    total = 0.0
    for p in tokenized:
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        entries = n_p * (n_p + 1) / 2 + n_c * n_p + n_c * (n_c + 1) / 2 + n_r * n_p + n_r * (n_r + 1) / 2
        total += per_token * len(p) + 2 * head * (n_c + n_r) + per_entry * entries
    return total


def trl_trainer(model, tokenizer, max_length: int, batch_size: int, bf16: bool, output_dir: str):
    """A DPOTrainer built as a TRL user builds it (precompute_ref_log_probs), on one row: once a model (the constructor
    hashes every weight). The timed pass runs later on each tokenized set, as its constructor would. One max_length
    (the largest) serves every row: the synthetic pairs fit each row's own, so nothing is cut either way."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=output_dir, precompute_ref_log_probs=True, bf16=bf16,
                       use_cpu=not next(model.parameters()).is_cuda, max_length=max_length,
                       precompute_ref_batch_size=batch_size, per_device_train_batch_size=batch_size,
                       report_to="none", remove_unused_columns=False)
    one = Dataset.from_list([{"prompt": "w2 w3", "chosen": " w4", "rejected": " w5", "row": 0}])
    return DPOTrainer(model=model, args=config, train_dataset=one, processing_class=tokenizer)


def trl_rows(trainer, tokenizer, rows: list[dict]):
    from datasets import Dataset

    data = Dataset.from_list([{**r, "row": i} for i, r in enumerate(rows)])  # TRL carries `row` through
    return trainer._prepare_dataset(data, tokenizer, trainer.args, "train")


def logps_table(args, name: str, shape: Shape, device: str, keep) -> None:
    """The log-prob rows of one model shape: every data shape and max_length, each record handed to `keep`."""
    dtype = getattr(torch, args.dtype)
    model = make_model(shape, dtype, device)
    tokenizer = word_tokenizer(shape.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    peak = (PEAK_BF16 if dtype == torch.bfloat16 else PEAK_FP32).get(card_family(device))
    output_dir = tempfile.TemporaryDirectory()  # the trainer writes nothing there; removed at exit
    trainer = trl_trainer(model, tokenizer, max(args.max_length), args.trl_batch_size, dtype == torch.bfloat16,
                          output_dir.name) if args.trl else None
    for data_shape in args.data_shapes:
        for max_length in args.max_length:
            rows = synthetic_rows(data_shape, args.n_pairs, max_length, shape.vocab)
            tokenized = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                       [r["rejected"] for r in rows], max_length)
            kept = [t for t in tokenized if t is not None]
            unique = sum(len(t) for t in kept)
            flops = useful_flops(model, kept)
            pad = pad_id(tokenizer)
            logps_of_tokenized(model, kept[:2], pad_id=pad, batch_tokens=args.batch_tokens)  # path checks, warm-up
            seconds: dict[str, float] = {}
            floor_unpadded_pass(model, kept[:2], args.batch_tokens)  # warm-up
            _, seconds["floor (padded)"] = best_of(args.repeats, device, floor_pass, model, kept, args.batch_tokens)
            _, seconds["floor (unpadded)"] = best_of(args.repeats, device, floor_unpadded_pass, model, kept,
                                                     args.batch_tokens)
            ours, seconds["prefsift"] = best_of(args.repeats, device, logps_of_tokenized, model, tokenized, pad_id=pad,
                                                batch_tokens=args.batch_tokens)
            for path in ("packed", "cached"):
                _, seconds[f"prefsift {path}"] = best_of(args.repeats, device, logps_of_tokenized, model, tokenized,
                                                         pad_id=pad, batch_tokens=args.batch_tokens, path=path)
            layouts = {}
            for layout in ("flex", "jagged"):  # the unpadded layout; warm-up first: the check, compiled flex's buckets
                logps_of_tokenized(model, tokenized, pad_id=pad, batch_tokens=args.batch_tokens, layout=layout)
                if not prefsift.engine.paths.VERDICTS.flat.get(model, {}).get(layout):
                    continue  # failed its check (warned): the row would time the padded layout
                layouts[layout], seconds[f"unpadded {layout}"] = best_of(
                    args.repeats, device, logps_of_tokenized, model, tokenized, pad_id=pad,
                    batch_tokens=args.batch_tokens, layout=layout)
            difference, layout_difference = None, {}
            if trainer is not None:
                tokenized_by_trl = trl_rows(trainer, tokenizer, rows)
                trl_out, seconds["TRL"] = best_of(args.repeats, device, trainer._precompute_ref_logps,
                                                  tokenized_by_trl, "train", args.trl_batch_size)
                theirs = np.full((len(rows), 2), np.nan)
                theirs[np.asarray(trl_out["row"])] = np.stack([trl_out["ref_chosen_logps"],
                                                              trl_out["ref_rejected_logps"]], 1)
                both = ~np.isnan(theirs[:, 0]) & ~np.isnan(ours[:, 0])
                difference = float(np.max(np.abs(theirs[both] - ours[both]) / np.abs(theirs[both])))
                layout_difference = {layout: float(np.max(np.abs(theirs[both] - values[both]) / np.abs(theirs[both])))
                                     for layout, values in layouts.items()}
            record = {"shape": name, "parameters": n_params, "dtype": args.dtype, "data": data_shape,
                      "max_length": max_length, "pairs": len(kept), "unique_tokens": unique, "useful_flops": flops,
                      "seconds": seconds, "peak_flops": peak, "max_relative_difference_to_trl": difference,
                      "unpadded_max_relative_difference_to_trl": layout_difference}
            print_logps(record)
            keep(record)


def print_logps(r: dict) -> None:
    print(f"\n{r['shape']} ({r['parameters'] / 1e9:.2f}B, {r['dtype']}), {r['data']}, max_length {r['max_length']}: "
          f"{r['pairs']} pairs, {r['unique_tokens']:,} unique tokens"
          + (f"; prefsift vs TRL: largest relative difference {r['max_relative_difference_to_trl']:.1e}"
             if r["max_relative_difference_to_trl"] is not None else ""))
    print(f"{'':<18}{'seconds':>9}{'x floor':>9}{'tokens/s':>12}{'MFU':>7}{'TRL / it':>10}   (x the unpadded floor)")
    s = r["seconds"]
    for label, t in s.items():
        mfu = f"{r['useful_flops'] / t / r['peak_flops']:.0%}" if r["peak_flops"] else "-"
        vs_trl = f"{s['TRL'] / t:.2f}" if "TRL" in s else "-"
        print(f"{label:<18}{t:>9.3f}{t / s['floor (unpadded)']:>9.2f}{r['unique_tokens'] / t:>12,.0f}{mfu:>7}"
              f"{vs_trl:>10}")


def per_example_flop_ratio(model, tokenized: list[TokenizedPair | None]) -> float:
    """Per-example gradients' FLOPs over a finite difference's, attention left out. Per-example: a forward and a
    backward (~3 forwards) of TRL's prompt+chosen and prompt+rejected rows, the LM head at every position (the
    model's own logits). Finite difference: 2 forwards of the unique tokens, the head on the completions only. A
    measured ratio above it is utilisation (per-example gradients go one pair at a time), not arithmetic."""
    per_token = prefsift.engine.paths._flops(model)[0]
    per_head = 2.0 * model.get_output_embeddings().weight.numel()
    kept = [t for t in tokenized if t is not None]
    trl_rows = sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in kept)
    unique = sum(len(t) for t in kept)
    completions = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in kept)
    return 3 * (per_token + per_head) * trl_rows / (2 * (per_token * unique + per_head * completions))


def influence_table(args, name: str, shape: Shape, device: str) -> dict:
    """bench/influence.py's comparison in fp32 on `shape`: ḡ_val once, then each way to ⟨ḡ_val, g_w − g_l⟩, each
    warmed up on two pairs (first kernels, autograd and forward-AD set-up) and then timed `--repeats` times."""
    from datasets import Dataset

    torch.backends.cuda.matmul.allow_tf32 = False  # a 1e-5 relative step needs fp32 products
    torch.backends.cudnn.allow_tf32 = False
    model = make_model(shape, torch.float32, device)
    tokenizer = word_tokenizer(shape.vocab)
    max_length = args.max_length[0]
    rows = synthetic_rows(args.data_shapes[0], args.influence_pairs + args.n_val, max_length, shape.vocab, seed=1)
    train = Dataset.from_list(rows[:args.influence_pairs])
    val = Dataset.from_list(rows[args.influence_pairs:])
    params = inf.scope_parameters(model, "all")
    kw = {"max_length": max_length}
    tokenized = inf._tokenize(tokenizer, train, max_length)
    pad = pad_id(tokenizer)
    val_ref = logps_of_tokenized(model, inf._tokenize(tokenizer, val, max_length), pad_id=pad)
    inf.validation_gradient(model, tokenizer, val.select(range(2)), val_ref[:2], params, beta=0.1, **kw)  # warm-up
    (direction, _), t_val = best_of(args.repeats, device, inf.validation_gradient, model, tokenizer, val, val_ref,
                                    params, beta=0.1, **kw)
    # the policy's own pass at the finite difference's settings (same batches): the one-sided difference's other side
    policy = prefsift.engine.logps.compute_logps(model, tokenizer, train, batch_tokens=args.batch_tokens, **kw)
    methods = {"log-prob pass (IRM)": (logps_of_tokenized, (model, tokenized), {"pad_id": pad,
                                                                              "batch_tokens": args.batch_tokens}),
               "finite difference": (inf.finite_difference, (model, tokenizer, train, direction, params),
                                     {"batch_tokens": args.batch_tokens, **kw}),
               "one-sided": (inf.finite_difference, (model, tokenizer, train, direction, params),
                             {"batch_tokens": args.batch_tokens, "base_logps": policy, **kw}),
               "jvp": (inf.forward_ad, (model, tokenizer, train, direction, params), kw),
               "per-example gradients": (inf.per_example, (model, tokenizer, train, direction, params), kw)}
    seconds, values = {}, {}
    # the one-sided difference with its step chosen on 4 check pairs (`choose_step`: a once-off cost, timed apart)
    inf.choose_step(model, tokenizer, train.select(range(4)), direction, params, method="one-sided",
                    batch_tokens=args.batch_tokens, n_pairs=2, **kw)  # warm-up
    (step, step_errors, _), t_step = best_of(1, device, inf.choose_step, model, tokenizer, train, direction, params,
                                             method="one-sided", batch_tokens=args.batch_tokens, **kw)
    methods["one-sided (chosen step)"] = (inf.finite_difference, (model, tokenizer, train, direction, params),
                                          {"batch_tokens": args.batch_tokens, "base_logps": policy, "step": step,
                                           **kw})
    for label, (fn, fn_args, fn_kwargs) in methods.items():
        warm = (fn_args[0], fn_args[1][:2]) if label.startswith("log-prob") else \
            (*fn_args[:2], train.select(range(2)), *fn_args[3:])
        fn(*warm, **{**fn_kwargs, **({"base_logps": policy[:2]} if "base_logps" in fn_kwargs else {})})
        values[label], seconds[label] = best_of(args.repeats, device, fn, *fn_args, **fn_kwargs)
    ref = values["per-example gradients"]
    ok = ~np.isnan(ref)
    scale = np.abs(ref[ok]).max()

    def accuracy(found: np.ndarray) -> list[float]:
        ranks = [np.argsort(np.argsort(x)) for x in (found[ok], ref[ok])]
        return [float(np.corrcoef(*ranks)[0, 1]), float(np.abs(found[ok] - ref[ok]).max() / scale)]

    n = int(ok.sum())
    bound = per_example_flop_ratio(model, tokenized)
    t_pass, t_pe = seconds["log-prob pass (IRM)"], seconds["per-example gradients"]
    record = {"shape": name, "data": args.data_shapes[0], "max_length": max_length, "pairs": n, "n_val": len(val),
              "seconds": seconds, "validation_gradient_seconds": t_val, "per_example_over_fd_flop_ratio": bound,
              "accuracy": {label: accuracy(values[label]) for label in ("finite difference", "one-sided", "jvp",
                                                                        "one-sided (chosen step)")},
              "one_sided_with_policy_pass_x": (t_pass + seconds["one-sided"]) / t_pass,
              "chosen_step": step, "chosen_step_errors": {repr(k): v for k, v in step_errors.items()},
              "choose_step_seconds": t_step,
              "one_sided_chosen_step_with_policy_pass_x": (t_pass + seconds["one-sided (chosen step)"]) / t_pass}
    print(f"\ninfluence, {name} fp32 (TF32 off), {record['data']} at max_length {max_length}: {n} training pairs, "
          f"{len(val)} validation pairs; ḡ_val {t_val / len(val):.4f} s a validation pair")
    print(f"{'':<24}{'s/pair':>9}{'x pass':>8}{'pe / it':>9}{'spearman':>10}{'max rel err':>13}")
    for label, t in seconds.items():
        rho, err = record["accuracy"].get(label, [float("nan")] * 2)
        print(f"{label:<24}{t / n:>9.4f}{t / t_pass:>8.2f}{t_pe / t:>9.1f}{rho:>10.5f}{err:>13.2e}")
    print(f"per-example / finite difference in FLOPs alone: {bound:.2f}x (the rest of 'pe / it' is utilisation)")
    print(f"one-sided influence with the policy's own pass: {record['one_sided_with_policy_pass_x']:.2f}x a log-prob "
          f"pass (ḡ_val's once-off cost aside); at the step chosen on 4 check pairs ({step:g}, chosen in "
          f"{t_step:.1f} s once): {record['one_sided_chosen_step_with_policy_pass_x']:.2f}x")
    return record


def training_table(args, name: str, shape: Shape, device: str) -> dict:
    """One DPO epoch on the same pairs, as bench/train.py compares them: prefsift's `train` (its engine's reference
    pass, its packed policy forward) against TRL's DPOTrainer (precompute_ref_log_probs, its own forward), each on a
    fresh copy of the same random-weight model, with the very arguments prefsift gives TRL (`train._common_args`):
    fp32 weights, autocast to --dtype on a GPU. Timed: building the trainer (the reference pass) and training, and
    the training loop alone (transformers' train_runtime); the logged losses must agree."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefsift.config import EngineConfig, TrainConfig
    from prefsift.models import LoadedModel
    from prefsift.train import _common_args, train

    max_length = args.max_length[0]
    tokenizer = word_tokenizer(shape.vocab)
    pairs = Dataset.from_list(synthetic_rows(args.data_shapes[0], args.train_pairs, max_length, shape.vocab, seed=2))
    on_gpu = device.startswith("cuda")
    compute = getattr(torch, args.dtype) if on_gpu else torch.float32
    config = TrainConfig(epochs=1, batch_size=args.train_batch_size, learning_rate=1e-6, logging_steps=1, seed=0)
    engine = EngineConfig(max_length=max_length, dtype=str(compute).removeprefix("torch."), device=device,
                          batch_tokens=args.batch_tokens)
    sides: dict[str, dict] = {}
    for side in ("prefsift", "TRL"):
        model = make_model(shape, torch.float32, device)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        if side == "prefsift":
            result = train(LoadedModel(model, tokenizer, f"random {name}", f"random-{name}-seed0"), pairs, config,
                           engine, quiet=True)
            history = result.log_history
        else:
            with tempfile.TemporaryDirectory() as scratch:
                common = _common_args(config, engine, scratch, compute, on_gpu) | {"disable_tqdm": True}
                trainer = DPOTrainer(model=model, args=DPOConfig(**common, precompute_ref_log_probs=True),
                                     train_dataset=pairs, processing_class=tokenizer)
                trainer.train()
                history = trainer.state.log_history
        sync(device)
        sides[side] = {"seconds": time.perf_counter() - start,
                       "train_loop_seconds": next(h["train_runtime"] for h in history if "train_runtime" in h),
                       "losses": [h["loss"] for h in history if "loss" in h],
                       "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None}
        del model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    ours, theirs = sides["prefsift"]["losses"], sides["TRL"]["losses"]
    record = {"shape": name, "data": args.data_shapes[0], "max_length": max_length, "pairs": len(pairs),
              "batch_size": config.batch_size, "compute_dtype": str(compute), "sides": sides,
              "max_loss_difference": float(np.max(np.abs(np.subtract(ours, theirs)))) if len(ours) == len(theirs)
              else None}
    print(f"\ntraining, {name} (fp32 weights, {compute} compute), one DPO epoch of {len(pairs)} {record['data']} pairs"
          f" at max_length {max_length}, batch {config.batch_size}")
    print(f"{'':<10}{'seconds':>9}{'loop s':>9}{'peak GB':>9}")
    for side, r in sides.items():
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{side:<10}{r['seconds']:>9.2f}{r['train_loop_seconds']:>9.2f}{memory:>9}")
    print(f"TRL / prefsift: {sides['TRL']['seconds'] / sides['prefsift']['seconds']:.2f}x whole, "
          f"{sides['TRL']['train_loop_seconds'] / sides['prefsift']['train_loop_seconds']:.2f}x loop; logged losses "
          f"differ by at most {record['max_loss_difference']}")
    return record


def card_family(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((family for family in PEAK_BF16 if family in name), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["0.6b", "1.8b"], choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the log-prob table's precision (influence runs in fp32)")
    parser.add_argument("--data-shapes", nargs="+", default=["transcripts", "instructions"],
                        choices=("transcripts", "instructions"))
    parser.add_argument("--max-length", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--n-pairs", type=int, default=256, help="pairs of each log-prob row")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="prefsift's token budget a batch")
    parser.add_argument("--trl-batch-size", type=int, default=16, help="TRL's precompute_ref_batch_size (pairs)")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL (not installed)")
    parser.add_argument("--repeats", type=int, default=2, help="timings a row after a warm-up; the fastest is kept")
    parser.add_argument("--influence-pairs", type=int, default=64, help="training pairs of the influence table")
    parser.add_argument("--n-val", type=int, default=32, help="validation pairs of the influence table")
    parser.add_argument("--no-influence", dest="influence", action="store_false")
    parser.add_argument("--train-pairs", type=int, default=64, help="pairs of the training table's epoch")
    parser.add_argument("--train-batch-size", type=int, default=8, help="the training table's batch (pairs)")
    parser.add_argument("--no-training", dest="training", action="store_false")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no further table after this many minutes (each table's JSON is already written)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (and --dtype float32) to check the script")
    quiet = prefsift.engine.logps.progress_bar
    prefsift.engine.logps.progress_bar = lambda *a, **k: quiet(*a, **{**k, "disable": True})  # bars would swamp it
    inf.progress_bar = prefsift.engine.logps.progress_bar
    warnings.filterwarnings("ignore", category=FutureWarning)

    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"device: {where}; torch {torch.__version__}")
    import transformers
    import trl

    from prefsift.report import provenance

    results = {"command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]), "when": time.strftime("%Y-%m-%d"),
               "device": where, "torch": torch.__version__, "transformers": transformers.__version__,
               "trl": trl.__version__, **provenance(), "logps": [], "influence": [], "training": [], "skipped": []}
    started = time.perf_counter()

    def keep(part: str, record: dict) -> None:  # saved after each table: a call cut off at its limit keeps the rest
        results[part].append(record)
        results["minutes"] = (time.perf_counter() - started) / 60
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    def in_time(table: str) -> bool:
        if args.minutes is None or (time.perf_counter() - started) / 60 < args.minutes:
            return True
        keep("skipped", {"table": table, "after_minutes": (time.perf_counter() - started) / 60})
        print(f"\n{table}: skipped (past --minutes {args.minutes:g})")
        return False

    for name in args.shapes:
        if in_time(f"log-probs {name}"):
            logps_table(args, name, SHAPES[name], args.device, lambda record: keep("logps", record))
        if args.influence and in_time(f"influence {name}"):
            keep("influence", influence_table(args, name, SHAPES[name], args.device))
        if args.training and in_time(f"training {name}"):
            keep("training", training_table(args, name, SHAPES[name], args.device))
        gc.collect()  # the trainer and the model hold references to each other
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nall tables in {(time.perf_counter() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
