"""A whole process running TRL's reference pass, as a TRL user would: load the model and tokenizer with
transformers, read the pairs with `datasets`, build `DPOTrainer(precompute_ref_log_probs=True)` (its constructor
tokenizes and runs the pass), write the reference log-probs. bench/logps.py times it against `prefsift score`.

    python bench/trl_pass.py --data pairs.jsonl --model SmolLM2.gguf --max-length 512 --out ref.parquet
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP waits as `prefsift`: a like-for-like process
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="JSONL with prompt / chosen / rejected")
    parser.add_argument("--model", required=True, help=".gguf file or model directory")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="precompute_ref_batch_size (pairs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="parquet of ref_chosen_logps / ref_rejected_logps")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name} if path.suffix == ".gguf" \
        else {"pretrained_model_name_or_path": str(path)}
    extra = {}
    if path.suffix == ".gguf":  # dequantized to plain Linear layers, as prefsift loads it (else Trainer refuses it)
        from transformers import GgufConfig

        extra = {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(**where, **extra, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_dataset("json", data_files=args.data, split="train")
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(output_dir=output_dir, precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                           max_length=args.max_length, precompute_ref_batch_size=args.batch_size,
                           per_device_train_batch_size=args.batch_size, report_to="none")
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train_dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_parquet(args.out)


if __name__ == "__main__":
    main()
