"""DPO and KTO training through TRL, reusing reference log-probs that prefsift already computed.

TRL's `precompute_ref_log_probs` runs a full reference pass before training; prefsift hands it the
`ref_chosen_logps` / `ref_rejected_logps` it computed while scoring (or computes them with its faster engine),
and a small subclass tells TRL to take them as they are.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

from prefsift.config import EngineConfig, TrainConfig  # noqa: F401 (TrainConfig: re-exported)
from prefsift.errors import ConfigError
from prefsift.logps import compute_logps
from prefsift.models import LoadedModel, lora_config


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


def autocast_dtype(engine: EngineConfig, device: torch.device) -> torch.dtype:
    """The precision training computes in. Weights stay fp32 whatever it is: Adam's small updates vanish when
    they are added to bf16 weights (at lr 1e-6, 16 steps changed 1.6% of a tiny model's bf16 weights against
    88.7% of its fp32 ones). `auto` is bf16 autocast on a GPU and fp32 on a CPU, where bf16 moves log-probs by
    0.1-0.5 nats and drowns small steps."""
    from prefsift.models import parse_dtype

    return parse_dtype(engine.dtype, device)


def _common_args(config: TrainConfig, engine: EngineConfig, output_dir: str, compute: torch.dtype,
                 on_gpu: bool) -> dict:
    return {
        "output_dir": output_dir, "learning_rate": config.learning_rate, "num_train_epochs": config.epochs,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "max_length": engine.max_length,
        "lr_scheduler_type": config.lr_scheduler_type, "warmup_steps": config.warmup_steps, "seed": config.seed,
        "data_seed": config.seed, "beta": engine.beta, "logging_steps": config.logging_steps,
        "report_to": "none", "save_strategy": "no",
        "bf16": compute == torch.bfloat16, "fp16": compute == torch.float16, "use_cpu": not on_gpu,
        "dataloader_num_workers": 0, "gradient_checkpointing": config.gradient_checkpointing,
    }


def _peft_config(config: TrainConfig):
    if not config.lora:
        return None
    targets = config.lora_target_modules
    return lora_config(r=config.lora_r, alpha=config.lora_alpha,
                       target_modules=targets if targets == "all-linear" else targets.split(","))


def train(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, engine: EngineConfig | None = None,
          out_dir: Path | None = None, ref_logps: np.ndarray | None = None, quiet: bool = False) -> TrainResult:
    """Train `loaded.model` in place on `pairs` (prompt, chosen, rejected) and return it.

    `ref_logps`: (n, 2) reference log-probs of `pairs` (from scores.parquet); computed here with prefsift's
    engine when absent. Pairs TRL would drop (prompt longer than max_length) are left out. `quiet` drops TRL's
    progress bar and metric lines (a pipeline that trains dozens of subsets logs its own line for each).
    """
    engine = engine or EngineConfig()
    if len(pairs) == 0:
        raise ConfigError("no pairs to train on")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefsift-train-") as scratch:  # TRL wants an output_dir even unsaved
        return _train(loaded, pairs, config, engine, out_dir, ref_logps, str(out_dir) if out_dir else scratch,
                      start, quiet)


def _train(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, engine: EngineConfig, out_dir: Path | None,
           ref_logps: np.ndarray | None, output_dir: str, start: float, quiet: bool) -> TrainResult:
    forward_before = loaded.model.__dict__.get("forward")  # e.g. accelerate's device-map hook, or nothing
    device = next(loaded.model.parameters()).device
    compute = autocast_dtype(engine, device)
    common = _common_args(config, engine, output_dir, compute, device.type == "cuda") | {"disable_tqdm": quiet}
    # TRL 1.16's configs still set transformers' `gradient_checkpointing`, which transformers 5.24 deprecates for a
    # name TRL does not take yet: the warning is about TRL, not about anything the user can change.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in loaded.model.parameters()):
        loaded.model.float()  # fp32 master weights; the forward autocasts to `compute`
    keep = ["prompt", "chosen", "rejected"] if "chosen" in pairs.column_names else ["prompt", "completion", "label"]
    pairs = pairs.select_columns(keep)
    if config.algo == "dpo":
        if "chosen" not in pairs.column_names:
            raise ConfigError("DPO needs preference pairs (prompt, chosen, rejected); this data is unpaired: "
                              "use --algo kto")
        if ref_logps is None:
            ref_logps = compute_logps(loaded.model, loaded.tokenizer, pairs, max_length=engine.max_length,
                                      batch_tokens=engine.batch_tokens, desc="reference log-probs")
        pairs = pairs.add_column("ref_chosen_logps", ref_logps[:, 0].tolist())
        pairs = pairs.add_column("ref_rejected_logps", ref_logps[:, 1].tolist())
        pairs = pairs.filter(lambda row: not np.isnan(row["ref_chosen_logps"]))
        if len(pairs) == 0:
            raise ConfigError(f"every pair's prompt fills max_length={engine.max_length}: nothing left to train on")
        args = DPOConfig(**common, precompute_ref_log_probs=True)
        trainer = _DPOTrainerWithReferenceLogps(model=loaded.model, args=args, train_dataset=pairs,
                                                processing_class=loaded.tokenizer,
                                                peft_config=_peft_config(config))
    else:
        unpaired = unpair_preference_dataset(pairs) if "chosen" in pairs.column_names else pairs
        # KTO: TRL precomputes its reference pass once, so no second copy of the model stays in memory.
        args = KTOConfig(**common, precompute_ref_log_probs=True)
        trainer = KTOTrainer(model=loaded.model, args=args, train_dataset=unpaired,
                             processing_class=loaded.tokenizer, peft_config=_peft_config(config))
    if quiet:  # with tqdm off, transformers swaps the bar for a callback that prints every log line
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
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
    if hasattr(model, "merge_and_unload"):
        # A LoRA policy continues as a plain model (the adapter merged in), so it can be scored, copied and
        # trained again with a fresh adapter, as the TIF pipeline's warm-up model is.
        model = model.merge_and_unload()
        loaded.model = model
    model.eval()
    return TrainResult(model, time.perf_counter() - start, len(pairs), trainer.state.log_history)
