"""DPO and KTO training through TRL, reusing reference log-probs that prefsift already computed.

TRL's `precompute_ref_log_probs` runs a full reference pass before training; prefsift hands it the
`ref_chosen_logps` / `ref_rejected_logps` it computed while scoring (or computes them with its faster engine),
and a small subclass tells TRL to take them as they are.

Two more things the subclass adds, each only when asked:
- soft selection: a `weight` column (`prefsift weigh` writes one) trains with a per-pair weighted DPO loss,
  Σ wᵢ·ℓᵢ / Σ wᵢ over each batch (trl#5613 asks TRL for it; TRL 1.16 has no per-pair hook);
- curriculum: `order` trains in the order of a score (Selective DPO: easy first), TRL's shuffling turned off
  through transformers' own `train_sampling_strategy="sequential"`, only then.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

from prefsift.config import (  # noqa: F401 (TrainConfig: re-exported)
    FULL_LEARNING_RATE,
    LORA_LEARNING_RATE,
    EngineConfig,
    TrainConfig,
)
from prefsift.engine import Engine
from prefsift.engine.tokenize import TokenizedPair, non_finite_logps, pad_id
from prefsift.engine.training import merge_metrics, micro_batches, policy_for
from prefsift.errors import ConfigError, TrainingMovedNothing
from prefsift.manifest import check_scores, model_failure
from prefsift.models import LoadedModel, check_finite_weights, lora_config
from prefsift.reference import reference_logps

WEIGHT_COLUMN = "weight"
# TrainConfig.micro_batch_tokens on a CPU when not given, as a budget of activations: tokens × layers × hidden size.
# SmolLM2-135M (30 layers of 576) at 512 tokens: one LoRA epoch of 4-pair steps on instruction pairs (max_length 256)
# peaked at 5.7 GB with whole batches (bench/results/train-smollm2-lora-instructions.json at 9139669) and 2.7 GB in
# micro-batches (the same file at 59439ae). A model of the demo's size is never cut (each micro-batch costs a call's
# overhead), a 1.7B one runs a pair at a time. An accelerator keeps the whole batch: its memory is planned by
# --batch-size and small matmuls waste it.
CPU_ACTIVATION_BUDGET = 512 * 30 * 576


def micro_batch_tokens(config: TrainConfig, model, device: torch.device) -> int | None:
    """The token budget of one forward and backward: the one given, else on a CPU CPU_ACTIVATION_BUDGET over the
    model's layers × hidden size (None, the whole batch, on a GPU or a model whose config names neither)."""
    if config.micro_batch_tokens is not None:
        return config.micro_batch_tokens
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    layers, hidden = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if device.type != "cpu" or not layers or not hidden:
        return None
    return max(1, CPU_ACTIVATION_BUDGET // (layers * hidden))


class _WeightCollator:
    """TRL's preference collator, plus the batch's `weight` tensor when the examples carry one."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        if WEIGHT_COLUMN in examples[0]:
            batch[WEIGHT_COLUMN] = torch.tensor([e[WEIGHT_COLUMN] for e in examples], dtype=torch.float32)
        return batch


class _DPOTrainerWithReferenceLogps(DPOTrainer):
    """DPOTrainer that takes `ref_chosen_logps` / `ref_rejected_logps` already in the dataset as they are, and
    weighs each pair's loss by a `weight` column when the dataset has one.

    TRL 1.16 reduces the per-pair loss inside `_compute_loss` with `.mean()` and exposes no per-pair hook (trl#5613;
    its draft, trl#5804, was closed unmerged). So the weighted path lets TRL run everything as usual (its forward,
    its metrics), keeps the policy forward's output (`policy.output`), and reduces TRL's own sigmoid loss
    −log σ(β·Δᵢ) again with the weights:

        loss = Σ wᵢ·ℓᵢ / Σ wᵢ   (over the batch)

    Why this normalization and not mean(w·ℓ): with every weight 1 it is TRL's mean exactly, a weight 0 is the pair
    dropped from the batch exactly (mean(w·ℓ) would still divide by it), and scaling all weights leaves the
    learning rate's meaning unchanged. A batch whose weights are all 0 contributes a zero gradient.

    The policy's forward runs on the engine's packed layout (one prompt | chosen | rejected row a pair, the LM head
    on completion positions only, in chunks) wherever `paths.packed_path_ok` holds for the model; else TRL's own,
    with one warning (engine/training.py). Losses, gradients and TRL's metrics stay TRL's (test_train_packed.py)."""

    def __init__(self, *args, micro_batch_tokens: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = _WeightCollator(self.data_collator)
        self.micro_batch_tokens = micro_batch_tokens
        self._loss_share: float | None = None  # set while a step runs one micro-batch of its batch
        self.micro_batches = 0  # micro-batches run by steps that split their batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step, or, when the batch holds more than `micro_batch_tokens` tokens, the same step on micro-batches
        of its pairs (training.micro_batches): each runs forward and backward at once, its loss scaled by its share of
        the batch, so the gradients add up to the whole batch's while only one micro-batch's activations are alive.
        The metrics TRL records a call are merged back into one a step (training.merge_metrics)."""
        parts = micro_batches(self, inputs)
        if len(parts) <= 1:
            return super().training_step(model, inputs, num_items_in_batch)
        metrics = self._metrics["train"]
        before = {key: len(values) for key, values in metrics.items()}
        total = None
        try:
            for part in parts:  # one process only (micro_batches): no gradient all-reduce to hold back
                self._loss_share = part.share
                loss = super().training_step(model, part.inputs, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._loss_share = None
        merge_metrics(metrics, before, parts)
        self.micro_batches += len(parts)
        return total

    def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: D401 - TRL's hook
        if "ref_chosen_logps" in dataset.column_names and "ref_rejected_logps" in dataset.column_names:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # one micro-batch of a cut step (training_step): its loss, weighted or not, scaled by its share of the batch
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._loss_share is None:
            return out
        return (out[0] * self._loss_share, *out[1:]) if return_outputs else out * self._loss_share

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT_COLUMN not in self._signature_columns:  # else transformers drops the column as unused
            self._signature_columns = [*self._signature_columns, WEIGHT_COLUMN]

    def _compute_loss(self, model, inputs, return_outputs):
        weight = inputs.pop(WEIGHT_COLUMN, None)
        # TRL's one policy call, model(..., fused_lm_head=True), answered on the engine's packed layout where it
        # holds (each prompt once; engine/training.py), else by the model: the rest is TRL's own loss and metrics
        policy = policy_for(self, model, inputs)
        if weight is None:
            return super()._compute_loss(policy, inputs, return_outputs)
        if (self.loss_types != ["sigmoid"] or self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None
                or self.use_weighting or not self.precompute_ref_logps or return_outputs):
            raise ValueError("the weighted DPO loss is the sigmoid loss with precomputed reference log-probs")
        super()._compute_loss(policy, inputs, return_outputs=False)  # TRL's forward and metrics
        outputs = policy.output
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        delta_score = (chosen_logps - inputs["ref_chosen_logps"]) - (rejected_logps - inputs["ref_rejected_logps"])
        per_pair = -F.logsigmoid(self.beta * delta_score)  # TRL's "sigmoid" loss, term for term
        weight = weight.to(per_pair.device, per_pair.dtype)
        total = weight.sum()
        loss = (weight * per_pair).sum() / total if total > 0 else (0.0 * per_pair).sum()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        return loss


class _KTOTrainerWithReferenceLogps(KTOTrainer):
    """KTOTrainer whose reference pass runs on prefsift's engine instead of TRL's padded batches.

    KTO needs two reference log-probs a row: the row's own completion, and the KL term's mismatched completion
    (TRL rotates completions by one inside each batch of `per_device_train_batch_size`, in dataset order). The
    scores prefsift computed while scoring hold neither the mismatched ones nor, in general, KTO's tokens (KTO cuts
    each completion from its own prompt; DPO cuts both at their common prefix), so this pass is run here. It takes
    TRL's own tokenized rows (`prompt_ids`, `completion_ids`, `KL_completion_ids`), already truncated and filtered
    by TRL, and runs each as one prompt | completion | KL completion sequence: the prompt once (TRL runs it twice),
    no padding. Same tokens, same positions, same model: the values are TRL's (tests/test_train.py compares).

    `reference`: a reference model other than the policy (training continues from a warm-up model against the SFT
    model). Only its log-probs are needed, so it is used for this pass and never handed to TRL, which would keep it
    in memory for the whole training."""

    def __init__(self, *args, reference=None, engine: Engine | None = None, reference_source=None,
                 **kwargs) -> None:
        # read by _precompute_ref_logps, which TRL's __init__ calls
        self._reference, self._engine = reference, engine or Engine()
        self._reference_source = reference_source  # the LoadedModel `reference` came from, for a message
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: D401 - TRL's hook
        from peft import PeftModel

        if (not isinstance(dataset, Dataset) or not self.calculate_KL or self.ref_model is not None
                or self.is_deepspeed_enabled or self.is_fsdp_enabled):
            if self._reference is not None:
                raise ValueError("a separate KTO reference model is computed on prefsift's engine only")
            return super()._precompute_ref_logps(dataset, name, batch_size)
        limit = self.args.max_length
        rows = dataset.select_columns(["prompt_ids", "completion_ids", "KL_completion_ids"])
        tokenized = []
        for prompt, completion, mismatched in zip(rows["prompt_ids"], rows["completion_ids"],
                                                  rows["KL_completion_ids"], strict=True):
            room = None if limit is None else limit - len(prompt)  # TRL's collator keeps each row's start
            tokenized.append(TokenizedPair(list(prompt), list(completion)[:room], list(mismatched)[:room]))
        model = self.model if self._reference is None else self._reference
        # with LoRA the reference is the base model: the adapter switched off, as TRL's own pass does
        adapter_off = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        with adapter_off, tqdm(total=len(tokenized), desc=f"reference log-probs ({name})", unit="row",
                               disable=bool(os.environ.get("TQDM_DISABLE", ""))) as progress:
            values = self._engine.logps_of_tokenized(model, tokenized, pad=pad_id(self._tokenizer),
                                                     progress=progress)
        model.train(was_training)
        failed = ~np.isfinite(values).all(axis=1)
        if failed.any():  # TRL filtered every row whose prompt fills max_length: a NaN left is the model's
            source = getattr(self._reference_source, "source", "the policy (--model)")
            raise model_failure(f"KTO's reference model {source}", failed, None,
                                "check it, or pass another --reference", unit="rows", max_length=limit)
        return dataset.add_column("ref_logps", values[:, 0].astype(np.float32).tolist()).add_column(
            "ref_KL_logps", values[:, 1].astype(np.float32).tolist())


@dataclass
class TrainResult:
    model: object
    seconds: float
    n_pairs: int
    log_history: list[dict]
    too_long: list[int] = field(default_factory=list)  # rows of the given pairs left out: prompt fills max_length
    rows: int = 0  # rows TRL trained on: the kept pairs for DPO, their completions (two a pair) for KTO
    rows_seen: int = 0  # of those, the rows its steps reached: fewer when the steps end inside the first epoch
    epochs_done: float = 0.0  # passes over the rows the steps made (transformers' state.epoch)
    steps: int = 0  # optimizer steps taken
    micro_batches: int = 0  # forward-and-backward calls of the steps that ran their batch in parts (micro_batch_tokens)

    @property
    def saw_every_row(self) -> bool:
        return self.rows_seen >= self.rows


class _PrefixWarnings:
    """Stands in for the `logger` of TRL's DPO and KTO trainer modules while they tokenize: TRL warns once a distinct
    message that "the tokenized prompt is not a prefix of the tokenized prompt+completion", and the message quotes
    the row's own text, so instruction data printed one warning a row. Those are counted here (each call, not only
    the distinct ones) and said once; any other message goes to TRL's logger."""

    MARK = "tokenized prompt is not a prefix"

    def __init__(self, inner) -> None:
        self.inner, self.count, self.example = inner, 0, ""

    def _counted(self, message) -> bool:
        if isinstance(message, str) and self.MARK in message:
            self.count += 1
            if not self.example:  # the cut tail TRL quotes: "...training sequence: '<tail>'. The model..."
                self.example = message.partition("training sequence: ")[2].partition(". The model")[0][:40]
            return True
        return False

    def warning_once(self, message, *args, **kwargs) -> None:
        if not self._counted(message):
            self.inner.warning_once(message, *args, **kwargs)

    def warning(self, message, *args, **kwargs) -> None:
        if not self._counted(message):
            self.inner.warning(message, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def summary(self, rows: int) -> str:
        example = f" (e.g. {self.example})" if self.example else ""
        return (f"{self.count} of {rows} training rows: the tokenized prompt is not a prefix of prompt + completion "
                f"(the prompt ends inside a token, or a chat template renders it alone differently); TRL starts "
                f"each completion where the two diverge and leaves that end of the prompt{example} out of training. "
                f"End prompts on a token boundary, or check the chat template")


@contextlib.contextmanager
def _library_noise():
    """While TRL builds or runs a trainer: its per-row prefix warning counted into one line (`_PrefixWarnings`), the
    libraries' FutureWarnings (deprecations between TRL and transformers a user cannot act on) and the datasets bars
    of TRL's preprocessing kept off the terminal."""
    import datasets
    from trl.trainer import dpo_trainer, kto_trainer

    modules = (dpo_trainer, kto_trainer)
    saved = [module.logger for module in modules]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's map passes over the pairs (tokenizing, adding EOS): a bar each
    counter = _PrefixWarnings(saved[0])
    for module in modules:
        module.logger = counter if module is dpo_trainer else _PrefixWarnings(module.logger)
    kto_counter = kto_trainer.logger
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield counter
    finally:
        counter.count += kto_counter.count
        counter.example = counter.example or kto_counter.example
        for module, logger in zip(modules, saved, strict=True):
            module.logger = logger
        if bars:
            datasets.enable_progress_bars()


class PairsProgress(TrainerCallback):
    """The training bar: pairs (KTO: rows) done of those the steps will reach, with pairs/s and the time left (tqdm's
    rate and estimate, from the steps so far), and TRL's logged loss and reward margin as one short line each.
    Replaces transformers' bar, which counts optimizer steps."""

    def __init__(self, rows: int, unit: str = "pair") -> None:
        self.rows, self.unit, self.bar, self.done = rows, unit, None, 0

    def _per_step(self, args) -> int:
        return args.train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # the steps' pairs: whole epochs over every row, then the steps of a last, partial epoch
        per_step, epochs = self._per_step(args), float(args.num_train_epochs)
        steps_per_epoch = max(1, math.ceil(self.rows / per_step))
        whole = min(int(epochs), state.max_steps // steps_per_epoch)
        rest = state.max_steps - whole * steps_per_epoch
        self.total = whole * self.rows + min(self.rows, rest * per_step)
        self.bar = tqdm(total=self.total, desc="training", unit=self.unit, dynamic_ncols=True,
                        disable=bool(os.environ.get("TQDM_DISABLE", "")))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            step = min(self._per_step(args), self.total - self.done)
            self.done += step
            self.bar.update(step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        names = {"loss": "loss", "rewards/margins": "reward margin", "rewards/accuracies": "reward accuracy"}
        shown = [f"{name} {logs[key]:.4g}" for key, name in names.items() if isinstance(logs.get(key), float)]
        self.bar.write(f"step {state.global_step}/{state.max_steps}: {', '.join(shown)}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.total - self.done)
            self.bar.close()
            self.bar = None


def sample_index(numel: int, k: int) -> torch.Tensor:
    """min(k, numel) evenly spaced indices of a tensor of `numel` entries, first and last included, in integers (a
    float linspace rounds its last index past the end of a tensor of 28M entries)."""
    k = min(k, numel)
    return torch.arange(k, dtype=torch.long) * (numel - 1) // max(k - 1, 1)


class WeightSample:
    """A fixed sample of every trainable tensor's values (up to 256 evenly spaced entries a tensor), to tell after
    training whether the steps moved the model at all without a copy of its weights."""

    PER_TENSOR = 256

    def __init__(self, model) -> None:
        self.entries = []
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    flat = param.detach().reshape(-1)
                    index = sample_index(flat.numel(), self.PER_TENSOR).to(flat.device)
                    self.entries.append((param, index, flat[index].double().clone()))

    def relative_change(self) -> float:
        """‖sample after − sample before‖ / ‖sample before‖ (inf when the sample was all zeros and moved)."""
        moved = size = 0.0
        with torch.no_grad():
            for param, index, before in self.entries:
                after = param.detach().reshape(-1)[index].double()
                moved += float(((after - before) ** 2).sum())
                size += float((before ** 2).sum())
        if size == 0:
            return math.inf if moved > 0 else 0.0
        return math.sqrt(moved / size)


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
        "output_dir": output_dir, "learning_rate": config.effective_learning_rate, "num_train_epochs": config.epochs,
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
          out_dir: Path | None = None, ref_logps: np.ndarray | None = None, quiet: bool = False,
          order: np.ndarray | None = None, callbacks: list | None = None,
          reference: LoadedModel | None = None) -> TrainResult:
    """Train `loaded.model` in place on `pairs` (prompt, chosen, rejected) and return it.

    `ref_logps`: (n, 2) reference log-probs of `pairs` (from scores.parquet); computed here with prefsift's
    engine when absent. Pairs TRL would drop (prompt longer than max_length) are left out. `quiet` drops TRL's
    progress bar and metric lines (a pipeline that trains dozens of subsets logs its own line for each).
    A `weight` column in `pairs` trains DPO with those per-pair weights. `order` (one value a pair, e.g. the column
    `config.order` names, read by `order_values`) trains in the order of that value, ascending unless
    `config.order_descending`, without shuffling. `callbacks`: transformers `TrainerCallback`s added to TRL's trainer
    (e.g. the pipeline's evaluation of the run at chosen shares of its steps). `reference`: KTO's reference model
    when it is not the policy.
    """
    engine = engine or EngineConfig()
    if len(pairs) == 0:
        raise ConfigError("no pairs to train on")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prefsift-train-") as scratch:  # TRL wants an output_dir even unsaved
        return _train(loaded, pairs, config, engine, out_dir, ref_logps, str(out_dir) if out_dir else scratch,
                      start, quiet, order, callbacks or [], reference)


def pair_weights(pairs: Dataset) -> np.ndarray | None:
    """The `weight` column as numbers (None without one), refused unless finite, >= 0 and not all 0."""
    if WEIGHT_COLUMN not in pairs.column_names:
        return None
    try:
        weights = np.asarray(pairs[WEIGHT_COLUMN], dtype=float)
    except (TypeError, ValueError):
        raise ConfigError("the weight column must hold numbers") from None
    if not np.all(np.isfinite(weights)) or (weights < 0).any():
        raise ConfigError("the weight column must hold finite numbers >= 0 (prefsift weigh writes NaN scores as 0)")
    if not (weights > 0).any():
        raise ConfigError("every pair has weight 0: nothing to train on")
    return weights


def training_pairs(loaded) -> Dataset:
    """The normalized pairs of a `LoadedPairs`, with the input's `weight` column when it has one (what `prefsift
    weigh` writes): soft selection reaches `train` through the data file."""
    pairs = loaded.pairs
    if loaded.raw is not None and WEIGHT_COLUMN in loaded.raw.column_names:
        pairs = pairs.add_column(WEIGHT_COLUMN, loaded.raw[WEIGHT_COLUMN])
    return pairs


def order_values(column: str, loaded, scores_dir: Path | None = None) -> np.ndarray:
    """One curriculum value a training pair: `column` of SCORES/scores.parquet matched by pair_id when the score
    directory has it, else the data's own column of that name (e.g. written by `prefsift select --with-scores`)."""
    import pyarrow.parquet as pq

    if scores_dir is not None and column in pq.read_schema(Path(scores_dir) / "scores.parquet").names:
        table = pq.read_table(Path(scores_dir) / "scores.parquet", columns=["pair_id", column]).to_pydict()
        check_scores(scores_dir, table, [column])  # a null, an inf or an unexplained NaN: one line
        index = {pid: i for i, pid in enumerate(table["pair_id"])}
        missing = [pid for pid in loaded.pairs["pair_id"] if pid not in index]
        if missing:
            raise ConfigError(f"{len(missing)} training pairs have no '{column}' in {scores_dir} (e.g. {missing[0]})")
        values = table[column]
        return np.asarray([values[index[pid]] for pid in loaded.pairs["pair_id"]], dtype=float)
    if loaded.raw is not None and column in loaded.raw.column_names:
        try:
            return np.asarray(loaded.raw[column], dtype=float)
        except (TypeError, ValueError):
            raise ConfigError(f"--order {column}: the data's column is not numeric") from None
    where = f"{scores_dir}/scores.parquet nor " if scores_dir is not None else ""
    raise ConfigError(f"--order {column}: neither {where}the data has a column of that name")


def curriculum_rows(order: np.ndarray, descending: bool) -> np.ndarray:
    """Row indices in the order training sees them: by `order`, ascending (or descending), ties in the data's
    own order, NaN (a pair without a score) last."""
    order = np.asarray(order, dtype=float)
    key = -order if descending else order
    return np.argsort(np.where(np.isnan(key), np.inf, key), kind="stable")


def checked_reference(ref_logps: np.ndarray, tokenizer, pairs: Dataset, max_length: int | None,
                      pair_ids: list | None, what: str) -> np.ndarray:
    """DPO's (n, 2) reference log-probs, NaN exactly where TRL drops the pair. A pair is too long only when the
    tokenizer says its prompt fills max_length; a NaN or inf of a pair that fits is the reference model's failure and
    stops with one line, never a pair silently left out as too long."""
    ref = np.array(ref_logps, dtype=float)
    if len(ref) != len(pairs):
        raise ConfigError(f"{len(ref)} reference log-prob rows for {len(pairs)} pairs")
    too_long, failed = non_finite_logps(ref, tokenizer, pairs, max_length)
    if failed.any():
        raise model_failure(what, failed, pair_ids, "check that model, or score again with a sound one",
                            max_length=max_length)
    ref[too_long] = np.nan
    return ref


def make_trainer(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, engine: EngineConfig, output_dir: str,
                 ref_logps: np.ndarray | None = None, quiet: bool = False, order: np.ndarray | None = None,
                 reference: LoadedModel | None = None) -> tuple[DPOTrainer | KTOTrainer, np.ndarray]:
    """The TRL trainer `train` runs, built but not started (a test steps it itself), and the rows of `pairs` it
    trains on, ascending (DPO leaves out a pair whose prompt fills max_length, as TRL would drop it). `reference`:
    KTO's reference model when it is not the policy (DPO takes its reference as `ref_logps`)."""
    device = next(loaded.model.parameters()).device
    compute = autocast_dtype(engine, device)
    common = _common_args(config, engine, output_dir, compute, device.type == "cuda") | {"disable_tqdm": quiet}
    # TRL 1.16's configs still set transformers' `gradient_checkpointing`, which transformers 5.24 deprecates for a
    # name TRL does not take yet: the warning is about TRL, not about anything the user can change.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in loaded.model.parameters()):
        loaded.model.float()  # fp32 master weights; the forward autocasts to `compute`
    if (config.order is None) != (order is None):
        raise ConfigError("a curriculum needs both the score column's name (order) and its values" if order is None
                          else "order values given without naming their column (order)")
    weights = pair_weights(pairs)
    pair_ids = list(pairs["pair_id"]) if "pair_id" in pairs.column_names else None
    keep = ["prompt", "chosen", "rejected"] if "chosen" in pairs.column_names else ["prompt", "completion", "label"]
    pairs = pairs.select_columns(keep)
    if config.algo == "dpo":
        if "chosen" not in pairs.column_names:
            raise ConfigError("DPO needs preference pairs (prompt, chosen, rejected); this data is unpaired: "
                              "use --algo kto")
        given = ref_logps is not None
        if ref_logps is None:  # the policy is its own reference
            ref_logps = reference_logps(loaded, pairs, engine)
        ref_logps = checked_reference(ref_logps, loaded.tokenizer, pairs, engine.max_length, pair_ids,
                                      "the reference model (--reference, or the one --scores was scored with)"
                                      if given else f"the policy {loaded.source} (--model), its own reference,")
        kept = np.flatnonzero(~np.isnan(ref_logps[:, 0]))
        pairs = pairs.add_column("ref_chosen_logps", ref_logps[:, 0].tolist())
        pairs = pairs.add_column("ref_rejected_logps", ref_logps[:, 1].tolist())
        if weights is not None:
            pairs = pairs.add_column(WEIGHT_COLUMN, weights.tolist())
        if order is not None:
            if len(order) != len(pairs):
                raise ConfigError(f"{len(order)} order values for {len(pairs)} pairs")
            pairs = pairs.select(curriculum_rows(order, config.order_descending).tolist())
            common["train_sampling_strategy"] = "sequential"  # the order is the curriculum: no shuffling
        pairs = pairs.filter(lambda row: not np.isnan(row["ref_chosen_logps"]))
        if len(pairs) == 0:
            raise ConfigError(f"every pair's prompt fills max_length={engine.max_length}: nothing left to train on")
        args = DPOConfig(**common, precompute_ref_log_probs=True)
        return _DPOTrainerWithReferenceLogps(model=loaded.model, args=args, train_dataset=pairs,
                                             processing_class=loaded.tokenizer,
                                             peft_config=_peft_config(config),
                                             micro_batch_tokens=micro_batch_tokens(config, loaded.model, device)), kept
    if weights is not None or order is not None:
        raise ConfigError("a weight column and a curriculum order train DPO; KTO takes neither")
    if ref_logps is not None:
        raise ConfigError("KTO computes its reference log-probs itself (its KL term needs mismatched completions "
                          "that no score holds): give the reference model instead")
    if reference is not None and reference.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise ConfigError(f"the reference model '{reference.source}' has another tokenizer than the policy: KTO "
                          f"compares their log-probs of the same tokens")
    unpaired = unpair_preference_dataset(pairs) if "chosen" in pairs.column_names else pairs
    labels = np.asarray(unpaired["label"], dtype=bool)
    # The KTO paper balances the two losses, λ_D·n_D / (λ_U·n_U) in [1, 4/3]: a selection of completions (ISA's) rarely
    # keeps as many desirable as undesirable ones, so λ_D = n_U / n_D, the range's lower end (TRL warns outside it).
    desirable_weight = float((~labels).sum() / labels.sum()) if labels.any() and (~labels).any() else 1.0
    # KTO: the reference pass runs once before training (on prefsift's engine), so no second copy of the model stays
    # in memory.
    args = KTOConfig(**common, precompute_ref_log_probs=True, desirable_weight=desirable_weight)
    return _KTOTrainerWithReferenceLogps(model=loaded.model, args=args, train_dataset=unpaired,
                                         reference=None if reference is None else reference.model,
                                         reference_source=reference,
                                         engine=Engine(engine),
                                         processing_class=loaded.tokenizer,
                                         peft_config=_peft_config(config)), np.arange(len(pairs))


def _train(loaded: LoadedModel, pairs: Dataset, config: TrainConfig, engine: EngineConfig, out_dir: Path | None,
           ref_logps: np.ndarray | None, output_dir: str, start: float, quiet: bool,
           order: np.ndarray | None, callbacks: list, reference: LoadedModel | None = None) -> TrainResult:
    forward_before = loaded.model.__dict__.get("forward")  # e.g. accelerate's device-map hook, or nothing
    # the directory holding the weights training starts from (transformers' `name_or_path`, an adapter's own
    # directory for a model loaded from one: models.py); None for a model built in memory or trained before
    start_weights = loaded.model.__dict__.get("name_or_path") or None
    check_finite_weights(loaded, "--model", "before training")  # a broken model is not a diverged training
    with _library_noise() as prefix_rows:  # TRL's per-row tokenization warning, counted; FutureWarnings off
        trainer, kept = make_trainer(loaded, pairs, config, engine, output_dir, ref_logps, quiet, order, reference)
    if prefix_rows.count:
        warnings.warn(prefix_rows.summary(len(trainer.train_dataset)), stacklevel=3)
    for callback in callbacks:
        trainer.add_callback(callback)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # transformers' bar counts steps (and with tqdm off, a callback prints every log line): prefsift's counts pairs
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not quiet:
        trainer.add_callback(PairsProgress(len(trainer.train_dataset), "pair" if config.algo == "dpo" else "row"))
    before = WeightSample(trainer.model)
    with _library_noise():
        trainer.train()
    check_finite(trainer, config, engine)  # before anything is saved: NaN weights are no model
    check_moved(trainer, before, config)  # nor is the model it started from
    warn_barely_moved(trainer, config)
    rows, rows_seen, epochs_done = coverage(trainer)
    model = trainer.model
    # TRL's fused LM head replaces `forward` on the instance with a method bound to THIS object; a deepcopy of the
    # model would keep calling the original's weights. Put back whatever forward the instance had before.
    if forward_before is None:
        loaded.model.__dict__.pop("forward", None)
    else:
        loaded.model.forward = forward_before
    lora = hasattr(model, "merge_and_unload")
    if out_dir is not None and (not lora or start_weights is not None):
        # safetensors weights, or the LoRA adapter naming `start_weights` as its base (a chain of adapters reloads
        # with every step: models.py)
        trainer.save_model(str(out_dir))
    if lora:
        # A LoRA policy continues as a plain model (the adapter merged in), so it can be scored, copied and
        # trained again with a fresh adapter, as the TIF pipeline's warm-up model is.
        model = model.merge_and_unload()
        loaded.model = model
        if out_dir is not None and start_weights is None:
            # no directory holds the weights the adapter sits on: an adapter naming any base would reload without
            # them, so the whole model is saved
            model.save_pretrained(str(out_dir))
    if out_dir is not None:
        loaded.tokenizer.save_pretrained(str(out_dir))
    model.name_or_path = ""  # its weights are no longer those of any directory: a later adapter must not name one
    model.eval()
    too_long = sorted(set(range(len(pairs))) - set(kept.tolist()))
    return TrainResult(model, time.perf_counter() - start, len(kept), trainer.state.log_history, too_long, rows,
                       rows_seen, epochs_done, trainer.state.global_step, getattr(trainer, "micro_batches", 0))


def check_finite(trainer, config: TrainConfig, engine: EngineConfig) -> None:
    """One line when a training diverged: a trainable weight or a logged loss is NaN or ±inf. The weights are
    checked as well as the losses: at --learning-rate 1e30 every weight was NaN after the first step while TRL's
    logged mean loss of the run stayed finite (0.43)."""
    bad = total = 0
    with torch.no_grad():
        for param in trainer.model.parameters():
            if param.requires_grad:
                total += param.numel()
                bad += int((~torch.isfinite(param)).sum())
    losses = [(entry.get("step"), entry[key]) for entry in trainer.state.log_history for key in ("loss", "train_loss")
              if isinstance(entry.get(key), (int, float)) and not np.isfinite(entry[key])]
    if not bad and not losses:
        return
    what = [f"{bad} of {total} trainable weights are NaN or inf"] if bad else []
    what += [f"the loss logged at step {losses[0][0]} is {losses[0][1]}"] if losses else []
    fix = f"lower --learning-rate (it is {config.effective_learning_rate:g})"
    if trainer.args.fp16:
        fix += ", or train in bfloat16 or float32 (--dtype): float16 overflows"
    raise ConfigError(f"training diverged after {trainer.state.global_step} steps: {' and '.join(what)}; {fix}")


# Below this relative change of its trainable weights a training left the model where it was: about ten float32
# roundings (2^-23 ≈ 1.2e-7 of a weight). One Adam step moves each weight by about the learning rate, so a full
# training at 1e-6 moves weights of size ~0.02 by ~5e-5 of themselves, far above it.
NO_MOVE = 1e-6


def check_moved(trainer, before: WeightSample, config: TrainConfig) -> None:
    """One line when a training moved nothing: no optimizer step, or steps that changed the trainable weights by no
    more than float rounding (the implicit reward margin β·Δlog-ratio of every pair is then at noise level, and
    a score or an evaluation of "the trained model" would read the model it started from)."""
    steps = trainer.state.global_step
    if steps == 0:
        raise TrainingMovedNothing("training took no optimizer step: nothing was trained; give more pairs, a larger "
                          "--epochs or a smaller --batch-size")
    change = before.relative_change()
    if change < NO_MOVE:
        warmup = trainer.args.get_warmup_steps(trainer.state.max_steps) if trainer.state.max_steps else 0
        # transformers' warm-up starts at learning rate 0, so its first steps move nothing (`constant` has none)
        if warmup >= steps and config.lr_scheduler_type != "constant":
            raise TrainingMovedNothing(
                f"training moved nothing: its {steps} step{'s' if steps != 1 else ''} all fell inside the "
                f"{warmup}-step learning-rate warm-up (--warmup-steps {config.warmup_steps:g}), which starts at "
                f"learning rate 0; lower --warmup-steps or train longer (--epochs, more pairs)")
        raise TrainingMovedNothing(f"training moved nothing: after {steps} step{'s' if steps != 1 else ''} at "
                          f"--learning-rate {config.effective_learning_rate:g} the trainable weights changed by "
                          f"{change:.1e} "
                          f"of their size (float rounding is ~1e-7), so every implicit reward margin is at noise "
                          f"level; raise --learning-rate (default {FULL_LEARNING_RATE:g} for all weights, "
                          f"{LORA_LEARNING_RATE:g} with --lora) or train longer (--epochs)")


BARELY_MOVED = 1e-2  # TRL's logged mean implicit reward margin below this at the end: the model barely learned


def warn_barely_moved(trainer, config: TrainConfig) -> None:
    """One warning when a LoRA DPO training moved its adapter but barely its preferences: the mean implicit reward
    margin TRL logged over the last logging window (`rewards/margins`) is under BARELY_MOVED (LoRA at a full
    fine-tune's learning rate logged 0.0015 on 60 real pairs, issue 22). LoRA only: a full fine-tune at TRL's
    default 1e-6 moves its margins slowly by design, and short runs of it would warn for nothing. A warning, not an
    error: noisy pairs can hold a trained model's margins near zero."""
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    if (config.algo != "dpo" or not config.lora or not margins or not np.isfinite(margins[-1])
            or abs(margins[-1]) >= BARELY_MOVED):
        return
    warnings.warn(f"the training barely moved the model's preferences: its last logged mean implicit reward margin "
                  f"is {margins[-1]:.2g} (under {BARELY_MOVED:g}); at --learning-rate "
                  f"{config.effective_learning_rate:g} a "
                  f"larger one (default {FULL_LEARNING_RATE:g} for all weights, {LORA_LEARNING_RATE:g} with --lora) "
                  f"or more --epochs would move it", stacklevel=3)


def coverage(trainer) -> tuple[int, int, int | float]:
    """(rows the trainer was given, rows its steps reached, epochs it made). Steps that end inside the first epoch
    (a small --epochs: transformers trains ceil(epochs × steps an epoch) steps) reach only the first steps' batches,
    every one full; from the end of the first epoch on, every row was seen."""
    rows = len(trainer.train_dataset)
    epochs_done = float(trainer.state.epoch or 0.0)
    if epochs_done >= 1 - 1e-9:
        return rows, rows, epochs_done
    per_step = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
    return rows, min(rows, trainer.state.global_step * per_step), epochs_done
