"""The policy's forward of DPO training on the engine's packed layout, with gradients.

TRL 1.16's `DPOTrainer._compute_loss` gets the policy's per-token log-probs from one call,
`model(input_ids, attention_mask, labels, fused_lm_head=True)`, on its padded layout: two rows a pair (prompt |
chosen, prompt | rejected), so every prompt runs twice. `PackedPolicy` stands in for `model` in that one call and
answers it from the packed layout instead (`forward.packed_batch` / `packed_logps`: one `prompt | chosen | rejected`
row a pair, the rejected tokens blind to the chosen ones, the LM head in chunks on completion positions only), built
from the very tokens of TRL's batch (after its truncation). Everything after that call (the loss types, the
reference log-ratios, the metrics TRL logs) is TRL's own code on the answer.

The answer is a `FusedCausalLMOutput` of TRL's shape (2 × pairs, width - 1) whose rows sum to the packed sums:
each row holds its completion's summed log-prob at its first completion position and zeros elsewhere, so TRL's
`.sum(dim=1)` gives the sums exactly. The losses that need per-token log-probs (`sft`, WPO's `use_weighting`, LD-DPO's
`ld_alpha`) keep TRL's own forward (`packed_unsupported`). The metrics' per-token fields (entropy, the mean logit,
whether the label is the top token) are computed, without gradient, from the completion positions' logits as the
chunked head produces them, so TRL logs the same `entropy`, `logits/chosen`, `logits/rejected` and
`mean_token_accuracy`. Each chunk of the head runs under activation checkpointing: a training step keeps one chunk's
positions × vocabulary logits, not every completion position's.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from trl.trainer.utils import FusedCausalLMOutput

from prefsift.engine import tokenize
from prefsift.engine.forward import HEAD_ELEMENTS, _backbone_and_head, _scale_logits, packed_batch
from prefsift.engine.tokenize import TokenizedPair

_TRL_CALL = {"input_ids", "attention_mask", "labels", "use_cache"}  # the keywords of TRL's policy call


def batch_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion: torch.Tensor
                ) -> list[TokenizedPair] | None:
    """TRL's collated batch as the pairs it holds, after TRL's truncation: rows 0..n-1 are prompt | chosen, rows
    n..2n-1 prompt | rejected, right-padded; `completion` marks the completion tokens (TRL's `completion_mask`, or
    `labels != -100`). None when a pair's rows are not one prompt followed by its completion (e.g. `keep_end`
    truncation cut the two prompts differently)."""
    ids, lengths, marks = input_ids.tolist(), attention_mask.sum(1).tolist(), completion.long().tolist()
    n = len(ids) // 2
    out = []
    for b in range(n):
        parts = []
        for row in (b, n + b):
            length = lengths[row]
            n_prompt = length - sum(marks[row][:length])
            if marks[row][:length] != [0] * n_prompt + [1] * (length - n_prompt) or any(marks[row][length:]):
                return None
            parts.append((ids[row][:n_prompt], ids[row][n_prompt:length]))
        (prompt, chosen), (prompt_r, rejected) = parts
        if prompt != prompt_r:
            return None
        out.append(TokenizedPair(prompt, chosen, rejected))
    return out


def _slots(pairs: list[TokenizedPair]) -> tuple[list[int], list[int]]:
    """(TRL row, TRL column) of each scored token, in the order `packed_batch` lists them: pair by pair, its chosen
    tokens then its rejected ones. Token k of a completion is TRL's label at column n_prompt - 1 + k (labels are
    shifted by one); the first one is unscored after an empty prompt, in both layouts."""
    n = len(pairs)
    rows, cols = [], []
    for b, pair in enumerate(pairs):
        n_p = len(pair.prompt_ids)
        for row, ids in ((b, pair.chosen_ids), (n + b, pair.rejected_ids)):
            for k in range(len(ids)):
                if n_p - 1 + k >= 0:
                    rows.append(row)
                    cols.append(n_p - 1 + k)
    return rows, cols


class _HeadStats:
    """Per-token entropy, mean logit and top-1 of the LM head's output on the scored positions, without gradient,
    recorded chunk by chunk as `_head_logps` computes them (once a chunk: the backward's recomputation of a chunk
    records nothing)."""

    def __init__(self) -> None:
        self.chunks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def record(self, lo: int, logits: torch.Tensor, logps: torch.Tensor, targets: torch.Tensor) -> None:
        if lo in self.chunks:
            return
        with torch.no_grad():
            logits, logps = logits.detach(), logps.detach()
            # argmax: the first maximum, as TRL's is_top1
            self.chunks[lo] = (-(logps.exp() * logps).sum(-1), logits.mean(-1), logits.argmax(-1) == targets)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [self.chunks[lo] for lo in sorted(self.chunks)]
        if not parts:  # no scored token in the batch
            return torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool)
        return tuple(torch.cat([part[k] for part in parts]) for k in range(3))  # type: ignore[return-value]


def _chunk_logps(config, head, hidden: torch.Tensor, targets: torch.Tensor, lo: int,
                 stats: _HeadStats | None) -> torch.Tensor:
    logits = _scale_logits(config, head(hidden).float())
    logps = logits.log_softmax(-1)
    if stats is not None:
        stats.record(lo, logits, logps, targets)
    return logps.gather(-1, targets[:, None])[:, 0]


def _head_logps(config, head, hidden: torch.Tensor, targets: torch.Tensor, stats: _HeadStats | None
                ) -> torch.Tensor:
    """log p(target) of each scored position, through the LM head a chunk of positions at a time (forward.py's
    HEAD_ELEMENTS), each chunk under activation checkpointing: its logits and log-softmax, positions × vocabulary in
    fp32 twice over, are not kept for the backward pass but recomputed there one chunk at a time, so a training
    step holds one chunk's logits instead of every completion position's (TRL's fused head does the same). The cost
    is one more LM-head matmul a completion position in the backward pass."""
    from torch.utils.checkpoint import checkpoint

    step = max(1, HEAD_ELEMENTS // head.weight.shape[0])
    out = []
    for lo in range(0, hidden.shape[0], step):
        args = (config, head, hidden[lo:lo + step], targets[lo:lo + step], lo, stats)
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            out.append(_chunk_logps(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def packed_policy_logps(model, pairs: list[TokenizedPair], pad_id: int, stats: bool = False
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(n, 2) summed chosen / rejected log-probs of `pairs` on the packed layout, differentiable (float64), and, when
    `stats`, the per-token (entropy, mean logit, top-1) of the scored tokens in `packed_batch`'s order. The same
    computation as forward.packed_logps, its LM head checkpointed chunk by chunk (`_head_logps`)."""
    batch = packed_batch(model, pairs, pad_id)
    base, backbone, head = _backbone_and_head(model)
    recorder = _HeadStats() if stats else None
    hidden = backbone(**batch.inputs).last_hidden_state
    token_logps = _head_logps(base.config, head, hidden[batch.rows, batch.predictors], batch.targets, recorder)
    sums = torch.zeros(batch.n_pairs * 2, dtype=torch.float64, device=hidden.device)
    sums = sums.index_add(0, batch.index, token_logps.double()).view(batch.n_pairs, 2)
    return sums, (recorder.tensors() if recorder is not None else None)


def packed_output(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int
                  ) -> FusedCausalLMOutput | None:
    """What TRL's `model(input_ids, attention_mask, labels=labels, fused_lm_head=True)` returns, computed on the
    packed layout: `log_probs` (2n, width - 1) whose rows sum to the packed sums (each at the row's first label
    column), and the metrics' per-token fields at TRL's columns. None when the batch is not TRL's pair layout."""
    completion = labels != -100
    pairs = batch_pairs(input_ids, attention_mask, completion)
    if pairs is None or input_ids.shape[1] < 2:
        return None
    sums, (entropy, mean, top1) = packed_policy_logps(model, pairs, pad_id, stats=True)
    device, shape = sums.device, (input_ids.shape[0], input_ids.shape[1] - 1)
    n = len(pairs)
    rows, cols = (torch.tensor(x, dtype=torch.long, device=device) for x in _slots(pairs))
    label_mask = completion[:, 1:].to(device)
    # each row's sum at its first label column (column 0 for a row without one, whose sum is 0)
    first = torch.where(label_mask.any(1), label_mask.float().argmax(1), 0)
    row_ids = torch.arange(2 * n, device=device)
    log_probs = torch.zeros(shape, dtype=torch.float32, device=device).index_put(
        (row_ids, first), torch.cat([sums[:, 0], sums[:, 1]]).float())

    def spread(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device).index_put_((rows, cols), values.to(dtype))

    return FusedCausalLMOutput(log_probs=log_probs, entropy=spread(entropy, torch.float32),
                               mean_logits=spread(mean, torch.float32), is_top1=spread(top1, torch.bool),
                               label_mask=label_mask)


def packed_unsupported(trainer) -> str | None:
    """Why a DPO trainer's policy forward cannot take the packed layout (None: it can): what TRL's loss reads
    besides each completion's summed log-prob, or a model wrapped or shaped in a way the packed forward does not
    handle. Checked once a trainer."""
    from peft import PeftModel

    if "sft" in trainer.loss_types or trainer.use_weighting or trainer.ld_alpha is not None:
        return "its loss reads per-token log-probs (sft, use_weighting or ld_alpha)"
    if trainer.aux_loss_enabled:
        return "the model's router loss comes from its own forward"
    if getattr(trainer, "_is_vision_dataset", False):
        return "vision inputs"
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return "DeepSpeed and FSDP run the model's own forward"
    if isinstance(trainer.model, PeftModel) and trainer.model.active_peft_config.is_prompt_learning:
        return "prompt-learning adapters add virtual tokens"
    return None


class PackedPolicy:
    """Stands in for the policy in TRL's `_compute_loss`: the call `model(..., labels=..., fused_lm_head=True)` is
    answered on the packed layout (under the trainer's autocast: accelerate puts autocast on the model's own forward,
    which the packed pass goes around); any other call, or a batch the packed layout cannot hold, goes to the model.
    `output`: the last answer to the fused call, whichever way it came."""

    def __init__(self, model, pad_id: int, autocast=contextlib.nullcontext, packed: bool = True) -> None:
        self.model, self.pad_id, self.autocast, self.packed = model, pad_id, autocast, packed
        self.output = None
        self.packed_calls = 0

    def __call__(self, *args, fused_lm_head: bool = False, **kwargs):
        out = None
        long = fused_lm_head and "input_ids" in kwargs and 2 * kwargs["input_ids"].shape[1] > tokenize.LONG_PAIR_TOKENS
        if long and self.packed:
            # a packed row can be twice TRL's (prompt + both completions) and its block mask is width²: past the
            # engine's own limit for scoring, TRL's rows (no materialised mask) cost less memory
            warnings.warn(f"rows of {kwargs['input_ids'].shape[1]} tokens: training forward on TRL's layout (a packed "
                          f"row's mask grows with the square of its length)", stacklevel=2)
        if self.packed and not long and fused_lm_head and not args and set(kwargs) <= _TRL_CALL and "labels" in kwargs:
            with self.autocast():
                out = packed_output(self.model, kwargs["input_ids"], kwargs["attention_mask"], kwargs["labels"],
                                    self.pad_id)
            self.packed_calls += out is not None
        if out is None:
            out = self.model(*args, fused_lm_head=fused_lm_head, **kwargs) if fused_lm_head else self.model(
                *args, **kwargs)
        if fused_lm_head:
            self.output = out
        return out


def policy_for(trainer, model, inputs) -> PackedPolicy:
    """What `trainer._compute_loss` calls as the policy for `inputs`: the packed forward when it holds for this
    trainer and model, else the model itself (through the same recorder). Decided once a trainer, on its first
    batch: `packed_unsupported`, a model wrapped for distributed training (DDP's gradient hooks run in its own
    forward), then `paths.packed_path_ok` on the batch's first pair (once a model and process). Any failure warns
    once and keeps TRL's own forward."""
    from prefsift.engine.paths import packed_path_ok

    pad = trainer._tokenizer.pad_token_id
    if getattr(trainer, "_prefsift_packed", None) is None:
        reason = packed_unsupported(trainer)
        if reason is None and trainer.accelerator.unwrap_model(model) is not model:
            reason = f"the model is wrapped ({type(model).__name__})"
        pairs = None if reason else batch_pairs(inputs["input_ids"], inputs["attention_mask"],
                                                inputs["completion_mask"])
        if reason is None and not pairs:
            reason = "TRL's batch is not one prompt and its completion a row (truncation_mode keep_end?)"
        if reason is None:
            was_training = model.training
            model.eval()  # no dropout, no activation checkpointing under inference mode
            try:
                with warnings.catch_warnings():  # one warning, this one, says why
                    warnings.simplefilter("ignore")
                    ok = packed_path_ok(model, pairs[0], pad)
            finally:
                model.train(was_training)
            if not ok:
                reason = f"the packed forward does not reproduce {type(model).__name__}'s own forward"
        if reason is not None:
            warnings.warn(f"DPO training runs TRL's own forward, not prefsift's packed one: {reason}", stacklevel=3)
        trainer._prefsift_packed = reason is None
    return PackedPolicy(model, pad, trainer.accelerator.autocast, packed=trainer._prefsift_packed)


# TRL 1.16's loss types whose batch loss is the mean of one term a pair (`DPOTrainer._compute_loss`): a step may sum
# its micro-batches' losses, each scaled by its share of the pairs. Not `aot` / `aot_unpaired` (they sort the batch)
# nor `sft` (a mean over the batch's tokens).
PER_PAIR_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "apo_zero", "apo_down", "discopop", "sigmoid_norm"})
# TRL's metrics that average over completion tokens, and which rows' tokens: the rest average over pairs
_TOKEN_METRICS = {"entropy": "both", "logits/chosen": "chosen", "logits/rejected": "rejected",
                  "mean_token_accuracy": "chosen"}


@dataclass
class MicroBatch:
    """A slice of a step's pairs, as TRL's collated batch (2n rows: chosen rows, then rejected ones), with its share
    of the step's loss and the counts its metrics are averaged by."""

    inputs: dict
    share: float
    counts: dict[str, float]


def _pair_widths(trainer, attention: torch.Tensor, completion: torch.Tensor) -> list[int]:
    """Each pair's row width in the layout its forward will use: prompt + chosen + rejected packed (each prompt once),
    or TRL's two rows of the longer length where the forward takes TRL's layout: the trainer fell back to it, or will
    on this first batch (`packed_unsupported`), or the rows are past the packed forward's length limit
    (`PackedPolicy`). Whether the packed forward reproduces the model's own is checked only later, on the first
    batch: until then the packed width is assumed."""
    n = attention.shape[0] // 2
    lengths, completions = attention.sum(1).tolist(), completion.sum(1).tolist()
    packed = getattr(trainer, "_prefsift_packed", None)
    if packed is None:
        packed = packed_unsupported(trainer) is None
    if not packed or 2 * attention.shape[1] > tokenize.LONG_PAIR_TOKENS:
        return [2 * max(lengths[b], lengths[n + b]) for b in range(n)]
    return [lengths[b] + completions[n + b] for b in range(n)]


def micro_batches(trainer, inputs: dict) -> list[MicroBatch]:
    """The step's batch cut into micro-batches of consecutive pairs, each holding at most the trainer's
    `micro_batch_tokens` (pairs × the widest pair's width: the padded size its activations take), or the batch
    whole (one entry) when it fits, or when the step cannot be cut exactly: a loss that is not a mean over pairs
    (PER_PAIR_LOSSES), a router loss, several processes (each would cut its batch differently, and TRL gathers its
    metrics every call), or a batch entry that is not one row a pair or two."""
    budget = getattr(trainer, "micro_batch_tokens", None)
    attention, completion = inputs.get("attention_mask"), inputs.get("completion_mask")
    whole = [MicroBatch(inputs, 1.0, {})]
    if (budget is None or attention is None or completion is None or attention.dim() != 2 or attention.shape[0] < 4
            or not set(trainer.loss_types) <= PER_PAIR_LOSSES or trainer.aux_loss_enabled
            or trainer.accelerator.num_processes != 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        return whole
    n = attention.shape[0] // 2
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] in (n, 2 * n) for v in inputs.values()):
        return whole
    widths = _pair_widths(trainer, attention, completion)
    if n * max(widths) <= budget:
        return whole
    cuts, start, widest = [], 0, 0
    for b, width in enumerate(widths):
        if b > start and (b - start + 1) * max(widest, width) > budget:
            cuts.append((start, b))
            start, widest = b, 0
        widest = max(widest, width)
    cuts.append((start, n))
    weight = inputs.get("weight")
    total = float(weight.sum()) if weight is not None else float(n)
    right_padded = bool((attention[:, :-1] >= attention[:, 1:]).all())
    shifted = completion[:, 1:]
    parts = []
    for lo, hi in cuts:
        rows = torch.cat([torch.arange(lo, hi), torch.arange(n + lo, n + hi)]).to(attention.device)
        width = int(attention[rows].sum(1).max()) if right_padded else attention.shape[1]
        part = {}
        for key, value in inputs.items():
            value = value[rows] if value.shape[0] == 2 * n else value[lo:hi]
            if right_padded and value.shape[0] == 2 * (hi - lo) and value.dim() == 2 and \
                    value.shape[1] == attention.shape[1]:
                value = value[:, :width]  # the columns only padding fills in this micro-batch
            part[key] = value
        share = (float(weight[lo:hi].sum()) / total if total > 0 else 0.0) if weight is not None else (hi - lo) / n
        counts = {"pairs": float(hi - lo), "chosen": float(shifted[lo:hi].sum()),
                  "rejected": float(shifted[n + lo:n + hi].sum())}
        counts["both"] = counts["chosen"] + counts["rejected"]
        parts.append(MicroBatch(part, share, counts))
    return parts


def merge_metrics(metrics: dict[str, list], before: dict[str, int], parts: list[MicroBatch]) -> None:
    """One entry a metric for the whole step, as TRL records it for an uncut batch: the entries the step's
    micro-batches appended, averaged with the weights TRL's own average uses (pairs, or the completion tokens the
    metric averages over)."""
    for key, values in metrics.items():
        new = values[before.get(key, 0):]
        if len(new) != len(parts):  # assigned, not appended a call (num_tokens): already the step's value
            continue
        weights = [part.counts[_TOKEN_METRICS.get(key, "pairs")] for part in parts]
        total = sum(weights)
        merged = sum(w * v for w, v in zip(weights, new, strict=True)) / total if total > 0 else 0.0
        del values[before.get(key, 0):]
        values.append(merged)
