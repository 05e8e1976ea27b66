"""The hot path: per-pair summed completion log-probs, exactly as TRL's DPOTrainer computes them.

Tokenization mirrors TRL 1.16 (`DPOTrainer._prepare_dataset` and `DataCollatorForPreference`): the text is
prompt + completion with EOS appended (plain text) or the chat template (conversational); the completion starts
where the tokenized prompt and prompt + completion stop matching; sequences are cut to `max_length` keeping
their start; a pair whose prompt alone reaches `max_length` is dropped (NaN here).

Speed comes from running each pair's unique tokens once. A pair becomes ONE sequence
`prompt | chosen | rejected`: the rejected tokens take the positions right after the prompt and a block mask
hides the chosen tokens from them, so both completions see exactly the context TRL gives them while the prompt
is computed once (TRL runs it twice). Pairs are sorted by length and batched to a token budget, so padding is
small, and only the completion positions go through the LM head.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def tokenize_pairs(tokenizer, prompts: list, chosens: list, rejecteds: list, max_length: int | None
                   ) -> list[TokenizedPair | None]:
    """TRL's tokenization of preference pairs; `None` marks a pair TRL drops (prompt fills `max_length`)."""
    if prompts and isinstance(prompts[0], list):  # conversational: chat template, no EOS appended
        prompt_ids = [_chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]
        chosen_full = [_chat_ids(tokenizer, p + c) for p, c in zip(prompts, chosens, strict=True)]
        rejected_full = [_chat_ids(tokenizer, p + r) for p, r in zip(prompts, rejecteds, strict=True)]
    else:
        eos = tokenizer.eos_token
        chosens = [c if c.endswith(eos) else c + eos for c in chosens]
        rejecteds = [r if r.endswith(eos) else r + eos for r in rejecteds]
        prompt_ids = tokenizer(list(prompts))["input_ids"]
        chosen_full = tokenizer([p + c for p, c in zip(prompts, chosens, strict=True)])["input_ids"]
        rejected_full = tokenizer([p + r for p, r in zip(prompts, rejecteds, strict=True)])["input_ids"]
    out: list[TokenizedPair | None] = []
    for p, pc, pr in zip(prompt_ids, chosen_full, rejected_full, strict=True):
        n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
        if max_length is not None and n >= max_length:
            out.append(None)
            continue
        room = None if max_length is None else max_length - n
        out.append(TokenizedPair(list(p[:n]), list(pc[n:])[:room], list(pr[n:])[:room]))
    return out


def _batches(lengths: list[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices sorted by length (longest first, so memory peaks at once), cut into batches of ≤ batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA is injected


def _backbone_and_head(model):
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix, None)
    return base, backbone, base.get_output_embeddings()


@torch.inference_mode()
def _forward_batch(model, pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs of a batch of packed pairs (one sequence a pair)."""
    base, backbone, head = _backbone_and_head(model)
    device = head.weight.device
    width = max(len(p) for p in pairs)
    batch = len(pairs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.zeros((batch, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    rows, predictors, targets, sides = [], [], [], []
    for b, pair in enumerate(pairs):
        n_p, n_c, n_r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        total = n_p + n_c + n_r
        input_ids[b, :total] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        position_ids[b, : n_p + n_c] = torch.arange(n_p + n_c)
        position_ids[b, n_p + n_c : total] = torch.arange(n_p, n_p + n_r)
        allowed[b, :total, :total] = causal[:total, :total]
        allowed[b, n_p + n_c : total, n_p : n_p + n_c] = False  # rejected never sees chosen
        # token k of a completion is predicted by the position before it; the first one by the prompt's last
        chosen_pred = [n_p - 1 + k for k in range(n_c)]
        rejected_pred = [n_p - 1] + [n_p + n_c + k - 1 for k in range(1, n_r)] if n_r else []
        for side, preds, ids in ((0, chosen_pred, pair.chosen_ids), (1, rejected_pred, pair.rejected_ids)):
            for pred, tok in zip(preds, ids, strict=True):
                if pred >= 0:  # an empty prompt leaves the first completion token unscored, as in TRL
                    rows.append(b)
                    predictors.append(pred)
                    targets.append(tok)
                    sides.append(side)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked row
    dtype = head.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
              "position_ids": position_ids.to(device), "use_cache": False}
    rows_t, preds_t = torch.tensor(rows, device=device), torch.tensor(predictors, device=device)
    hidden = backbone(**inputs).last_hidden_state
    logits = _scale_logits(base.config, head(hidden[rows_t, preds_t]).float())
    token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    sums = torch.zeros(batch * 2, dtype=torch.float64, device=device)
    index = rows_t * 2 + torch.tensor(sides, device=device)
    sums.index_add_(0, index, token_logps.double())
    sums = sums.view(batch, 2).cpu()
    return sums[:, 0], sums[:, 1]


def _scale_logits(config, logits: torch.Tensor) -> torch.Tensor:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def can_pack(model) -> bool:
    """Whether the packed fast path reproduces this model's own forward: it supplies its own attention mask (so no
    sliding windows) and applies the LM head by hand (so only the logit scalings `_scale_logits` knows)."""
    base, backbone, head = _backbone_and_head(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    sliding = sliding or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    unknown_scaling = any(getattr(config, name, None) not in (None, 1, 1.0)
                          for name in ("logits_scaling", "lm_head_multiplier", "output_multiplier"))
    return backbone is not None and backbone is not base and head is not None and not sliding and not unknown_scaling


@torch.inference_mode()
def _forward_batch_unpacked(model, pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own forward on prompt+chosen and prompt+rejected rows (TRL's layout): the slow, general path."""
    base = _unwrap(model)
    device = next(base.parameters()).device
    rows = [p.prompt_ids + c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    starts = [len(p.prompt_ids) for p in pairs for _ in range(2)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    logps = base(input_ids=input_ids, attention_mask=attention, use_cache=False).logits.float().log_softmax(-1)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    for k, (row, start) in enumerate(zip(rows, starts, strict=True)):
        positions = torch.arange(max(start, 1), len(row), device=device)
        sums[k] = logps[k, positions - 1, input_ids[k, positions]].double().sum().cpu()
    return sums[0::2], sums[1::2]


def logps_of_tokenized(model, tokenized: list[TokenizedPair | None], *, pad_id: int, batch_tokens: int = 8192,
                       progress: tqdm | None = None, packed: bool | None = None) -> np.ndarray:
    """(n, 2) array of summed chosen / rejected log-probs; NaN rows for dropped pairs.

    `packed=None` takes the packed fast path where `can_pack` allows it and checks it once, on the longest pair,
    against the model's own forward; on a mismatch it warns and falls back to the unpacked path."""
    out = np.full((len(tokenized), 2), np.nan)
    kept = [i for i, t in enumerate(tokenized) if t is not None]
    lengths = [len(tokenized[i]) for i in kept]
    use_packed = can_pack(model) if packed is None else packed
    for number, batch in enumerate(_batches(lengths, batch_tokens)):
        pairs = [tokenized[kept[i]] for i in batch]
        forward = _forward_batch if use_packed else _forward_batch_unpacked
        chosen, rejected = forward(model, pairs, pad_id)
        if number == 0 and use_packed and packed is None:
            check_c, check_r = _forward_batch_unpacked(model, pairs[:1], pad_id)
            got, want = torch.stack([chosen[0], rejected[0]]), torch.cat([check_c, check_r])
            if not torch.allclose(got, want, rtol=1e-3, atol=_tolerance(model)):
                warnings.warn(f"the packed forward disagrees with {type(model).__name__}'s own forward "
                              f"({got.tolist()} vs {want.tolist()}): using the slower unpacked path", stacklevel=2)
                use_packed = False
                chosen, rejected = _forward_batch_unpacked(model, pairs, pad_id)
        for j, i in enumerate(batch):
            out[kept[i]] = (chosen[j].item(), rejected[j].item())
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.update(len(tokenized) - len(kept))
    return out


def _tolerance(model) -> float:
    # Packed and unpacked runs reduce in another order: ~1e-4 nats apart in fp32, up to ~1 nat over a long
    # completion in bf16; an architecture the fast path gets wrong is off by far more.
    return 1e-3 if next(model.parameters()).dtype == torch.float32 else 1.0


@dataclass
class LogpsRun:
    """Where and under which identity a log-prob pass keeps its finished shards, so a killed run resumes."""

    directory: Path
    tag: str  # "policy", "reference", "validation", ...
    identity: dict  # model fingerprint, tokenizer, max_length, data hash: shards from another identity are stale

    @property
    def shard_dir(self) -> Path:
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.directory / "shards" / f"{self.tag}-{key}"


def compute_logps(model, tokenizer, pairs, *, max_length: int | None, batch_tokens: int = 8192,
                  shard_size: int = 512, run: LogpsRun | None = None, desc: str = "log-probs") -> np.ndarray:
    """Summed completion log-probs of every pair of `pairs` (a table with prompt/chosen/rejected columns).

    Returns an (n, 2) array [chosen_logps, rejected_logps] in row order, NaN where TRL would drop the pair.
    With `run`, each finished shard of `shard_size` rows is written to Parquet and skipped on a rerun.
    """
    n = len(pairs)
    out = np.full((n, 2), np.nan)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_shards = max(1, math.ceil(n / shard_size))
    if run is not None:
        run.shard_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with tqdm(total=n, desc=desc, unit="pair", dynamic_ncols=True) as progress:
        for k in range(n_shards):
            lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
            path = run.shard_dir / f"{k:05d}.parquet" if run is not None else None
            if path is not None and path.exists():
                table = pq.read_table(path)
                out[lo:hi, 0] = table["chosen_logps"].to_numpy()
                out[lo:hi, 1] = table["rejected_logps"].to_numpy()
                progress.update(hi - lo)
                continue
            rows = pairs[lo:hi]
            tokenized = tokenize_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"], max_length)
            out[lo:hi] = logps_of_tokenized(model, tokenized, pad_id=pad_id, batch_tokens=batch_tokens,
                                            progress=progress)
            if path is not None:
                table = pa.table({"chosen_logps": out[lo:hi, 0], "rejected_logps": out[lo:hi, 1]})
                tmp = path.with_suffix(".tmp")
                pq.write_table(table, tmp)
                tmp.replace(path)  # atomic: a killed run never leaves a half-written shard behind
    model.train(was_training)
    return out
