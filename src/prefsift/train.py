"""DPO and KTO training through TRL, reusing reference log-probs that prefsift already computed.

TRL's `precompute_ref_log_probs` runs a full reference pass before training; prefsift hands it the
`ref_chosen_logps` / `ref_rejected_logps` it computed while scoring (or computes them with its faster engine),
and a small subclass tells TRL to take them as they are.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

from prefsift.errors import ConfigError
from prefsift.logps import compute_logps
from prefsift.models import LoadedModel, lora_config

ALGOS = ("dpo", "kto")


@dataclass
class TrainConfig:
    algo: str = field(default="dpo", metadata={"help": "dpo or kto."})
    beta: float = field(default=0.1, metadata={"help": "β of the DPO/KTO loss."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate (TRL's default 1e-6)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per device and step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps accumulated per update."})
    max_length: int | None = field(default=1024, metadata={"help": "Token cut-off (must match scoring's)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_steps: float = field(default=0.0, metadata={"help": "Learning-rate warm-up steps (< 1: share of steps)."})
    seed: int = field(default=0, metadata={"help": "Seed of shuffling and initialisation."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Modules LoRA adapts."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward "
                                                                         "pass (TRL's default; off for tiny models)."})
    batch_tokens: int = field(default=8192, metadata={"help": "Tokens per batch of the reference log-prob pass."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})


class _DPOTrainerWithReferenceLogps(DPOTrainer):
    """DPOTrainer that takes `ref_chosen_logps` / `ref_rejected_logps` already in the dataset as they are."""

    def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: D401 - TRL's hook
        if "ref_chosen_logps" in dataset.column_names and "ref_rejected_logps" in dataset.column_names:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


@dataclass
class TrainResult:
    model: object
    seconds: float
    n_pairs: int
    log_history: list[dict]


def _common_args(config: TrainConfig, output_dir: str) -> dict:
    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": output_dir, "learning_rate": config.learning_rate, "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "max_length": config.max_length,
        "lr_scheduler_type": config.lr_scheduler_type, "warmup_steps": config.warmup_steps, "seed": config.seed,
        "data_seed": config.seed, "beta": config.beta, "logging_steps": config.logging_steps,
        "report_to": "none", "save_strategy": "no",
        # bf16 autocast on a CPU moves log-probs by 0.1-0.5 nats and drowns small steps (METHODS.md): fp32 there.
        "bf16": on_gpu and torch.cuda.is_bf16_supported(), "use_cpu": not on_gpu,
        "dataloader_num_workers": 0, "gradient_checkpointing": config.gradient_checkpointing,
    }


def _peft_config(config: TrainConfig):
    if not config.lora:
        return None
    targets = config.lora_target_modules
    return lora_config(r=config.lora_r, alpha=config.lora_alpha,
                       target_modules=targets if targets == "all-linear" else targets.split(","))


def train(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, out_dir: Path | None = None,
          ref_logps: np.ndarray | None = None) -> TrainResult:
    """Train `loaded.model` in place on `pairs` (prompt, chosen, rejected) and return it.

    `ref_logps`: (n, 2) reference log-probs of `pairs` (from scores.parquet); computed here with prefsift's
    engine when absent. Pairs TRL would drop (prompt longer than max_length) are left out.
    """
    if config.algo not in ALGOS:
        raise ConfigError(f"unknown algo '{config.algo}' (known: {', '.join(ALGOS)})")
    if len(pairs) == 0:
        raise ConfigError("no pairs to train on")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefsift-train-") as scratch:  # TRL wants an output_dir even unsaved
        return _train(loaded, pairs, config, out_dir, ref_logps, str(out_dir) if out_dir else scratch, start)


def _train(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, out_dir: Path | None,
           ref_logps: np.ndarray | None, output_dir: str, start: float) -> TrainResult:
    forward_before = loaded.model.__dict__.get("forward")  # e.g. accelerate's device-map hook, or nothing
    keep = ["prompt", "chosen", "rejected"] if "chosen" in pairs.column_names else ["prompt", "completion", "label"]
    pairs = pairs.select_columns(keep)
    if config.algo == "dpo":
        if "chosen" not in pairs.column_names:
            raise ConfigError("DPO needs preference pairs (prompt, chosen, rejected); this data is unpaired: "
                              "use --algo kto")
        if ref_logps is None:
            ref_logps = compute_logps(loaded.model, loaded.tokenizer, pairs, max_length=config.max_length,
                                      batch_tokens=config.batch_tokens, desc="reference log-probs")
        pairs = pairs.add_column("ref_chosen_logps", ref_logps[:, 0].tolist())
        pairs = pairs.add_column("ref_rejected_logps", ref_logps[:, 1].tolist())
        pairs = pairs.filter(lambda row: not np.isnan(row["ref_chosen_logps"]))
        if len(pairs) == 0:
            raise ConfigError(f"every pair's prompt fills max_length={config.max_length}: nothing left to train on")
        args = DPOConfig(**_common_args(config, output_dir), precompute_ref_log_probs=True)
        trainer = _DPOTrainerWithReferenceLogps(model=loaded.model, args=args, train_dataset=pairs,
                                                processing_class=loaded.tokenizer,
                                                peft_config=_peft_config(config))
    else:
        unpaired = unpair_preference_dataset(pairs) if "chosen" in pairs.column_names else pairs
        # KTO: TRL precomputes its reference pass once, so no second copy of the model stays in memory.
        args = KTOConfig(**_common_args(config, output_dir), precompute_ref_log_probs=True)
        trainer = KTOTrainer(model=loaded.model, args=args, train_dataset=unpaired,
                             processing_class=loaded.tokenizer, peft_config=_peft_config(config))
    trainer.train()
    model = trainer.model
    # TRL's fused LM head replaces `forward` on the instance with a method bound to THIS object; a deepcopy of the
    # model would keep calling the original's weights. Put back whatever forward the instance had before.
    if forward_before is None:
        loaded.model.__dict__.pop("forward", None)
    else:
        loaded.model.forward = forward_before
    if out_dir is not None:
        trainer.save_model(str(out_dir))  # safetensors weights (or the LoRA adapter) + tokenizer
        loaded.tokenizer.save_pretrained(str(out_dir))
    model.eval()
    return TrainResult(model, time.perf_counter() - start, len(pairs), trainer.state.log_history)
