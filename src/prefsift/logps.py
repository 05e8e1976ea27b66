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
import inspect
import json
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from prefsift.config import EngineConfig
from prefsift.errors import PrefsiftError
from prefsift.output import temp_sibling


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


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (as TRL pads)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(lengths: list[int], batch_tokens: int, slack: float = 0.125) -> Iterator[list[int]]:
    """Indices sorted by length (longest first, so memory peaks at once), cut into batches of ≤ batch_tokens; a batch
    also ends where the next pair is shorter than 1 - `slack` of its longest, so padding stays under an eighth of any
    batch (12 HH pairs in one batch fed 1.78× their unique tokens; cut this way, 1.04×)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and ((len(batch) + 1) * lengths[batch[0]] > batch_tokens
                      or lengths[i] < (1 - slack) * lengths[batch[0]]):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def default_threads() -> int:
    """torch CPU threads when none are asked for: the cores other processes leave idle (by the 1-minute load
    average), at least one. A thread waiting for a busy core stalls every op of the others (bench/threads.py: 2
    threads ran 1.1-1.8x slower than 1 on a busy 2-core box with OMP_WAIT_POLICY=PASSIVE, 7-21x without)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return cores
    return max(1, min(cores, round(idle)))


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA is injected


def _backbone_and_head(model):
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix, None)
    return base, backbone, base.get_output_embeddings()


@dataclass
class PackedBatch:
    """The packed layout of a batch: one `prompt | chosen | rejected` row a pair, its block mask and positions, and
    which position predicts which scored token (`index`: 2 × row + side, the slot of the token's sum)."""

    inputs: dict[str, torch.Tensor | bool]  # the backbone's keyword arguments
    rows: torch.Tensor
    predictors: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    n_pairs: int


def packed_batch(model, pairs: list[TokenizedPair], pad_id: int) -> PackedBatch:
    """`pairs` in the packed layout, on the device and in the dtype of the model's LM head (the mask is additive in
    that dtype): the same for the log-prob pass, its exactness check and the influence passes."""
    head = _backbone_and_head(model)[2]
    dtype, device = head.weight.dtype, head.weight.device
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
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
              "position_ids": position_ids.to(device), "use_cache": False}
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    return PackedBatch(inputs, rows_t, torch.tensor(predictors, dtype=torch.long, device=device),
                       torch.tensor(targets, dtype=torch.long, device=device),
                       rows_t * 2 + torch.tensor(sides, dtype=torch.long, device=device), batch)


def packed_logps(model, batch: PackedBatch) -> torch.Tensor:
    """(pairs, 2) summed chosen / rejected log-probs of a packed batch, in float64. Differentiable, also in forward
    mode: `_forward_batch` runs it under inference mode, forward-mode influence through `torch.func.jvp`."""
    base, backbone, head = _backbone_and_head(model)
    hidden = backbone(**batch.inputs).last_hidden_state
    token_logps = _token_logps(base.config, head, hidden[batch.rows, batch.predictors], batch.targets)
    sums = torch.zeros(batch.n_pairs * 2, dtype=torch.float64, device=hidden.device)
    return sums.index_add(0, batch.index, token_logps.double()).view(batch.n_pairs, 2)


@torch.inference_mode()
def _forward_batch(model, pairs: list[TokenizedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs of a batch of packed pairs (one sequence a pair)."""
    sums = packed_logps(model, packed_batch(model, pairs, pad_id)).cpu()
    return sums[:, 0], sums[:, 1]


@torch.inference_mode()
def _forward_batch_cached(model, pairs: list[TokenizedPair], pad_id: int, chunk: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached-prefix path: the batch's prompts run once, then both completions continue from the prompts' cached
    keys and values, with the model's own causal attention (no block mask of ours). Prompts are padded on the left,
    so every prompt ends at the same column and the completions follow it; positions are given explicitly. Queries
    go `chunk` positions at a time, so nothing grows with the square of a pair's length."""
    from transformers import DynamicCache

    chunk = chunk or QUERY_CHUNK
    base, backbone, head = _backbone_and_head(model)
    device = head.weight.device
    batch, n_prompt = len(pairs), max(len(p.prompt_ids) for p in pairs)
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]  # row 2b: chosen, 2b + 1: rejected
    width = max(len(c) for c in completions) - 1  # a completion's last token predicts nothing: never fed
    ids = torch.full((2 * batch, n_prompt + max(width, 0)), pad_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.long)
    for k, completion in enumerate(completions):
        prompt, fed = pairs[k // 2].prompt_ids, completion[:-1]
        ids[k, n_prompt - len(prompt):n_prompt + len(fed)] = torch.tensor(prompt + fed, dtype=torch.long)
        mask[k, n_prompt - len(prompt):n_prompt + len(fed)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = DynamicCache(config=base.config)
    sums = torch.zeros(2 * batch, dtype=torch.float64, device=device)

    # transformers 5.24 renamed `past_key_values` to `cache`; 5.0 knows only the old name
    cache_arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"

    def run(rows: slice, lo: int, hi: int) -> torch.Tensor:
        return backbone(input_ids=ids[rows, lo:hi], attention_mask=mask[rows, :hi], position_ids=positions[rows, lo:hi],
                        use_cache=True, **{cache_arg: cache}).last_hidden_state

    last = None
    for lo in range(0, n_prompt, chunk):  # the prompts, once: the chosen rows stand for their pair
        last = run(slice(0, None, 2), lo, min(lo + chunk, n_prompt))[:, -1]
    if last is not None:
        cache.batch_repeat_interleave(2)  # each pair's cache, once for its chosen row and once for its rejected row
        # a completion's first token is predicted by its prompt's last position (unscored after an empty prompt, as
        # in TRL)
        first = [k for k, c in enumerate(completions) if c and pairs[k // 2].prompt_ids]
        rows_t = torch.tensor(first, device=device)
        targets = torch.tensor([completions[k][0] for k in first], device=device)
        sums.index_add_(0, rows_t, _token_logps(base.config, head, last[rows_t // 2], targets).double())
    for lo in range(n_prompt, n_prompt + max(width, 0), chunk):  # both completions, from the cache
        hi = min(lo + chunk, n_prompt + width)
        hidden = run(slice(None), lo, hi)
        # column j holds completion token j - n_prompt, which predicts the token after it
        rows, cols, targets = [], [], []
        for k, completion in enumerate(completions):
            for j in range(lo, min(hi, n_prompt + len(completion) - 1)):
                rows.append(k)
                cols.append(j - lo)
                targets.append(completion[j - n_prompt + 1])
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        hidden = hidden[rows_t, torch.tensor(cols, dtype=torch.long, device=device)]
        token_logps = _token_logps(base.config, head, hidden, torch.tensor(targets, device=device))
        sums.index_add_(0, rows_t, token_logps.double())
    sums = sums.view(batch, 2).cpu()
    return sums[:, 0], sums[:, 1]


QUERY_CHUNK = 2048  # positions a cached-prefix forward feeds at once: its mask is rows × chunk × (cache + chunk)


# Logits the LM head holds at once: 2^24 floats (64 MB in fp32), i.e. 341 positions of a 49k vocabulary. A batch's
# full-vocabulary logits would be positions × vocabulary (1.6 GB for 8k positions), then as much again for the
# log-softmax; chunks this size cost no measurable speed (the head's matmul stays large).
HEAD_ELEMENTS = 1 << 24


def _token_logps(config, head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each row of `hidden` (positions × hidden size), through the LM head a chunk of positions at a
    time: memory is bounded by HEAD_ELEMENTS whatever the batch."""
    step = max(1, HEAD_ELEMENTS // head.weight.shape[0])
    out = []
    for lo in range(0, hidden.shape[0], step):
        logits = _scale_logits(config, head(hidden[lo:lo + step]).float())
        out.append(logits.log_softmax(-1).gather(-1, targets[lo:lo + step, None])[:, 0])
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


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


PATHS = ("packed", "cached", "unpacked")  # the exact ways to a batch's log-probs; see `forward_batch`


_PACKED_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> packed path verified on it


def _tolerance(model, pair: TokenizedPair) -> tuple[float, float]:
    """(rtol, atol) between the packed and the model's own forward on `pair`. They reduce in another order: ~1e-4
    nats apart in fp32. In bf16 each token's log-prob moves by rounding, so the sums drift apart like a random walk:
    0.05 nats times the square root of the completion's tokens. An architecture the packed path gets wrong is off by
    more (a sliding window forced through it: 0.29 nats in fp32); bf16 cannot see errors below its own noise."""
    if next(model.parameters()).dtype == torch.float32:
        return 1e-4, 1e-3
    return 0.0, 0.05 * math.sqrt(max(len(pair.chosen_ids), len(pair.rejected_ids)))


def packed_path_ok(model, pair: TokenizedPair, pad_id: int) -> bool:
    """Whether the packed fast path reproduces this model's own forward, checked once a model and process on one
    pair; any failure or mismatch warns once and sends the model to the unpacked path."""
    if model in _PACKED_OK:
        return _PACKED_OK[model]
    ok, want = can_pack(model), None
    if ok:
        try:
            got = torch.stack(_forward_batch(model, [pair], pad_id))[:, 0]
        except Exception as error:  # e.g. ALiBi models (Bloom) build their bias from a 2-D mask
            warnings.warn(f"the packed forward fails on {type(model).__name__} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}): using the unpacked path",
                          stacklevel=3)
            ok = False
        else:
            want = torch.stack(_forward_batch_unpacked(model, [pair], pad_id))[:, 0]
            rtol, atol = _tolerance(model, pair)
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                warnings.warn(f"the packed forward disagrees with {type(model).__name__}'s own forward "
                              f"({got.tolist()} vs {want.tolist()}): using the unpacked path", stacklevel=3)
                ok = False
    _PACKED_OK[model] = ok
    if ok:  # on the same pair, so a resumed run makes the same choices; the model's own forward is not rerun
        cached_path_ok(model, pair, pad_id, want)
    return ok


_CACHED_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> cached-prefix path verified on it


def cached_path_ok(model, pair: TokenizedPair, pad_id: int, want: torch.Tensor | None = None) -> bool:
    """Whether the cached-prefix path reproduces this model's own forward (checked once, as `packed_path_ok`; `want`:
    that forward's values on `pair` if already computed): a model whose cache or explicit positions behave otherwise
    warns once and keeps to the packed path."""
    if model not in _CACHED_OK:
        try:
            got = torch.stack(_forward_batch_cached(model, [pair], pad_id))[:, 0]
        except Exception as error:  # noqa: BLE001 - any failure means: not this path
            warnings.warn(f"the cached-prefix forward fails on {type(model).__name__} ({type(error).__name__}): "
                          f"using the packed path", stacklevel=3)
            _CACHED_OK[model] = False
        else:
            if want is None:
                want = torch.stack(_forward_batch_unpacked(model, [pair], pad_id))[:, 0]
            rtol, atol = _tolerance(model, pair)
            _CACHED_OK[model] = bool(torch.allclose(got, want, rtol=rtol, atol=atol))
            if not _CACHED_OK[model]:
                warnings.warn(f"the cached-prefix forward disagrees with {type(model).__name__}'s own forward "
                              f"({got.tolist()} vs {want.tolist()}): using the packed path", stacklevel=3)
    return _CACHED_OK[model]


def _costs(model, pairs: list[TokenizedPair]) -> dict[str, float]:
    """Estimated FLOPs of a batch on the packed and the cached-prefix paths, padding included: 2 × the backbone's
    weights a token fed, and 4 × width × layers a query-key entry its attention computes (scores, then values).
    The packed row attends densely over prompt|chosen|rejected (masked entries cost too); the cached path pads the
    prompts to the longest and every completion to the longest of the batch. On SmolLM2 (CPU) the matmuls were 77%
    of either path's time and attention 11-14%: these two terms are the cost (see bench/logps.py)."""
    per_token, per_entry = _flops(model)
    batch, n_prompt = len(pairs), max(len(p.prompt_ids) for p in pairs)
    width = max(len(p) for p in pairs)
    fed = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs) - 1
    packed = batch * width * per_token + batch * width * width * per_entry
    cached = (batch * n_prompt + 2 * batch * fed) * per_token
    cached += (batch * n_prompt * n_prompt + 2 * batch * fed * (n_prompt + fed)) * per_entry
    return {"packed": packed, "cached": cached}


_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flops(model) -> tuple[float, float]:
    """(FLOPs a token, FLOPs an attention entry) of the model's backbone."""
    if model not in _FLOPS:
        base, backbone, _ = _backbone_and_head(model)
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        weights = sum(p.numel() for p in backbone.parameters()) - backbone.get_input_embeddings().weight.numel()
        heads = getattr(config, "num_attention_heads", 1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        _FLOPS[model] = (2.0 * weights, 4.0 * heads * head_dim * config.num_hidden_layers)
    return _FLOPS[model]


def logps_of_tokenized(model, tokenized: list[TokenizedPair | None], *, pad_id: int,
                       batch_tokens: int = EngineConfig.batch_tokens,
                       progress: tqdm | None = None, packed: bool | None = None, path: str | None = None
                       ) -> np.ndarray:
    """(n, 2) array of summed chosen / rejected log-probs; NaN rows for dropped pairs. `packed=None` takes the
    packed fast path where `packed_path_ok` allows it; `path` forces one of PATHS."""
    out = np.full((len(tokenized), 2), np.nan)
    plan = BatchPlan.of(tokenized, batch_tokens)
    for batch in plan.batches:
        chosen, rejected = forward_batch(model, [tokenized[i] for i in batch], pad_id, packed, path)
        out[batch, 0], out[batch, 1] = chosen.numpy(), rejected.numpy()
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.update(len(tokenized) - plan.n_kept)
    return out


# A packed pair's mask is width² entries (bool + the model's dtype): ~9 GB at 36k tokens. A pair longer than this
# goes alone through `_forward_long`, whose memory grows linearly with its length.
LONG_PAIR_TOKENS = 8192


def check_pair(pair: TokenizedPair, prompt: int = 128, completion: int = 64) -> TokenizedPair:
    """The pair that checks a model's exact paths (`packed_path_ok`): `pair` with its prompt and each completion cut
    to their first `prompt` / `completion` tokens."""
    return TokenizedPair(pair.prompt_ids[:prompt], pair.chosen_ids[:completion], pair.rejected_ids[:completion])


def path_check_pair(plan: BatchPlan, tokenized: Sequence[TokenizedPair | None]) -> TokenizedPair | None:
    """The one pair a model's exact paths are checked on, fixed by the plan whichever batches a resumed run still has
    to compute: the longest pair short enough to pack, cut to `check_pair`'s size. The check runs three forwards of
    it; on the whole longest pair they took a third of a 16-pair HH-RLHF pass (bench/logps.py). A cut pair tests the
    block mask and the positions as well (sliding windows are refused by `can_pack`, whatever the length)."""
    short = [b[0] for b in plan.batches if len(tokenized[b[0]]) <= LONG_PAIR_TOKENS]  # type: ignore[arg-type]
    return check_pair(tokenized[short[0]]) if short else None  # type: ignore[arg-type]


def forward_batch(model, pairs: list[TokenizedPair], pad_id: int, packed: bool | None = None,
                  path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if path is not None:  # packed: one prompt|chosen|rejected row a pair under a block mask; cached: the prompt once,
        # the completions from its cached keys and values; unpacked: the model's own forward in TRL's layout
        paths = {"packed": _forward_batch, "cached": _forward_batch_cached, "unpacked": _forward_batch_unpacked}
        return paths[path](model, pairs, pad_id)
    if len(pairs) == 1 and len(pairs[0]) > LONG_PAIR_TOKENS and can_pack(model):
        return _forward_long(model, pairs[0])
    use_packed = packed_path_ok(model, pairs[0], pad_id) if packed is None else packed
    if not use_packed:
        return _forward_batch_unpacked(model, pairs, pad_id)
    # the cheaper of the two exact fast paths, by estimated FLOPs: a function of the batch's lengths alone, so a
    # resumed run takes the same path for every batch
    costs = _costs(model, pairs)
    if costs["cached"] < costs["packed"] and cached_path_ok(model, pairs[0], pad_id):
        return _forward_batch_cached(model, pairs, pad_id)
    return _forward_batch(model, pairs, pad_id)


@torch.inference_mode()
def _forward_long(model, pair: TokenizedPair, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One very long pair: each side as its own unpadded row with no mask (the model's causal kernel, no width²
    mask), and the LM head on the completion's positions only, `chunk` at a time (no length × vocabulary logits)."""
    base, backbone, head = _backbone_and_head(model)
    device = head.weight.device
    sums = []
    for completion in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + completion], device=device)
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[0]
        targets = torch.arange(max(len(pair.prompt_ids), 1), ids.shape[1], device=device)
        total = torch.zeros((), dtype=torch.float64)
        for lo in range(0, len(targets), chunk):
            at = targets[lo:lo + chunk]
            logits = _scale_logits(base.config, head(hidden[at - 1]).float())
            total += logits.log_softmax(-1).gather(-1, ids[0, at][:, None]).double().sum().cpu()
        sums.append(total)
    return sums[0].view(1), sums[1].view(1)


def _in_process(model, batches: Iterable[list[TokenizedPair]], pad_id: int, packed: bool | None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The default executor of `compute_logps`: each batch's forward pass here, one after another."""
    for pairs in batches:
        yield forward_batch(model, pairs, pad_id, packed)


@dataclass
class BatchPlan:
    """Row indices of each forward batch, fixed by the tokenized lengths and the token budget alone, so a resumed
    run computes every pair in the same batch, with the same padding, as an uninterrupted one: identical values."""

    batches: list[list[int]]
    n_kept: int

    @classmethod
    def of(cls, tokenized: Sequence[TokenizedPair | None], batch_tokens: int) -> BatchPlan:
        if isinstance(tokenized, CompactPairs):
            kept, lengths = tokenized.kept_and_lengths()
        else:
            kept = [i for i, t in enumerate(tokenized) if t is not None]
            lengths = [len(tokenized[i]) for i in kept]  # type: ignore[arg-type]
        return cls([[kept[i] for i in batch] for batch in _batches(lengths, batch_tokens)], len(kept))


class CompactPairs(Sequence):
    """Tokenized pairs held as one int32 array, 4 bytes a token (a list of Python ints costs ~36), so a pass over a
    large dataset does not hold several times the data's size between tokenization and the forward passes. Indexing
    gives the `TokenizedPair` (or None for a dropped pair) back."""

    def __init__(self, parts: Iterable[list[TokenizedPair | None]]) -> None:
        chunks, meta, offset = [], [], 0
        for part in parts:
            flat: list[int] = []
            for pair in part:
                if pair is None:
                    meta.append((-1, 0, 0, 0))
                    continue
                meta.append((offset + len(flat), len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)))
                flat += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
            chunks.append(np.asarray(flat, dtype=np.int32))
            offset += len(flat)
        self.ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        self.meta = np.asarray(meta, dtype=np.int64).reshape(-1, 4)  # start, prompt, chosen, rejected lengths

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i):  # type: ignore[override]
        start, n_p, n_c, n_r = (int(v) for v in self.meta[i])
        if start < 0:
            return None
        ids = self.ids[start:start + n_p + n_c + n_r].tolist()
        return TokenizedPair(ids[:n_p], ids[n_p:n_p + n_c], ids[n_p + n_c:])

    def kept_and_lengths(self) -> tuple[list[int], list[int]]:
        kept = np.flatnonzero(self.meta[:, 0] >= 0)
        return kept.tolist(), self.meta[kept, 1:].sum(axis=1).tolist()


@dataclass
class LogpsRun:
    """Where and under which identity a log-prob pass keeps its finished shards, so a killed run resumes."""

    directory: Path
    tag: str  # "policy", "reference", "validation", ...
    identity: dict  # model fingerprint, tokenizer, max_length, batch_tokens, data hash: other shards are stale

    @property
    def shard_dir(self) -> Path:
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.directory / "shards" / f"{self.tag}-{key}"

    def finished(self) -> dict[int, np.ndarray]:
        """{batch number: its rows' [row, chosen, rejected]} from the shards on disk; a corrupt shard (a kill
        mid-write on a filesystem without atomic rename, a 0-byte file) is deleted and its batches recomputed."""
        done: dict[int, np.ndarray] = {}
        for path in sorted(self.shard_dir.glob("*.parquet")):
            try:
                table = pq.read_table(path).to_pydict()
                batch, rows = np.asarray(table["batch"]), np.asarray(table["row"])
                values = np.stack([rows, table["chosen_logps"], table["rejected_logps"]], axis=1)
            except Exception:  # noqa: BLE001 - any unreadable shard is recomputed, never trusted
                warnings.warn(f"unreadable shard {path} is recomputed", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            for number in np.unique(batch):
                done[int(number)] = values[batch == number]
        return done

    def write(self, batches: list[int], rows: list[int], values: np.ndarray) -> None:
        table = pa.table({"batch": batches, "row": rows, "chosen_logps": values[:, 0],
                          "rejected_logps": values[:, 1]})
        path = self.shard_dir / f"{batches[0]:06d}-{batches[-1]:06d}.parquet"
        tmp = temp_sibling(path)  # unique per process and call
        pq.write_table(table, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written shard behind


class ShardBuffer:
    """Finished batches of one pass, kept in `run`'s shards every `flush_rows` rows or `flush_seconds`, whichever
    comes first (the log-prob and reward passes share it); without a run, nothing is written."""

    def __init__(self, run: LogpsRun | None, flush_rows: int, flush_seconds: float) -> None:
        self.run, self.flush_rows, self.flush_seconds = run, flush_rows, flush_seconds
        self.batches: list[int] = []
        self.rows: list[int] = []
        self.values: list[np.ndarray] = []
        self.last_flush = time.monotonic()

    def add(self, number: int, rows: list[int], values: np.ndarray) -> None:
        self.batches.extend([number] * len(rows))
        self.rows.extend(rows)
        self.values.append(values)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.run is not None and self.rows:
            self.run.write(self.batches, self.rows, np.concatenate(self.values))
        self.batches, self.rows, self.values, self.last_flush = [], [], [], time.monotonic()


def compute_logps(model, tokenizer, pairs, *, max_length: int | None, batch_tokens: int = EngineConfig.batch_tokens,
                  run: LogpsRun | None = None, desc: str = "log-probs", flush_rows: int = 512,
                  flush_seconds: float = 60.0, check_dropped: Callable[[int, int], None] | None = None,
                  executor: Callable | None = None) -> np.ndarray:
    """Summed completion log-probs of every pair of `pairs` (a table with prompt/chosen/rejected columns).

    Returns an (n, 2) array [chosen_logps, rejected_logps] in row order, NaN where TRL would drop the pair.
    With `run`, finished batches are written to a shard every `flush_rows` pairs or `flush_seconds`, whichever
    comes first, so a kill loses at most about a minute of work; a rerun skips them and gives identical values.

    Before any forward pass, `check_dropped(n_dropped, n)` may refuse the plan (one line); without it, a plan that
    drops every pair is refused: a table of NaN is never a result.

    `executor(model, batches, pad_id, packed)` runs the forward passes of the batches still to compute and yields
    their (chosen, rejected) in order: this process by default, `prefsift.distributed.RayExecutor` on a Ray pool.
    """
    n = len(pairs)
    out = np.full((n, 2), np.nan)
    pad = pad_id(tokenizer)
    tokenized = CompactPairs(tokenize_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"], max_length)
                             for rows in (pairs[lo:lo + 1024] for lo in range(0, n, 1024)))
    plan = BatchPlan.of(tokenized, batch_tokens)
    if check_dropped is not None:
        check_dropped(n - plan.n_kept, n)
    elif n and not plan.n_kept:
        raise PrefsiftError(f"max_length {max_length} drops all {n} pairs (each prompt alone fills it): raise "
                            f"--max-length")
    done: dict[int, np.ndarray] = {}
    if run is not None:
        run.shard_dir.mkdir(parents=True, exist_ok=True)
        done = run.finished()
    was_training = model.training
    model.eval()
    shards = ShardBuffer(run, flush_rows, flush_seconds)
    checked = path_check_pair(plan, tokenized)  # the path is chosen once, on one pair fixed by the plan
    packed = packed_path_ok(model, checked, pad) if checked is not None else None

    def on_disk(number: int, batch: list[int]) -> bool:
        return number in done and sorted(done[number][:, 0].astype(int)) == sorted(batch)

    todo = ([tokenized[i] for i in batch] for number, batch in enumerate(plan.batches) if not on_disk(number, batch))
    results = (executor or _in_process)(model, todo, pad, packed)
    with tqdm(total=n, desc=desc, unit="pair", dynamic_ncols=True, disable=n == 0) as progress:
        progress.update(n - plan.n_kept)
        for number, batch in enumerate(plan.batches):
            if on_disk(number, batch):
                values = done[number]
                out[values[:, 0].astype(int)] = values[:, 1:]
            else:
                chosen, rejected = next(results)
                values = np.stack([chosen.numpy(), rejected.numpy()], axis=1)
                out[batch] = values
                shards.add(number, batch, values)
            progress.update(len(batch))
        shards.flush()
    model.train(was_training)
    return out
