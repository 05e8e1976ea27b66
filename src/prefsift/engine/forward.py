"""The exact forward paths of a batch of tokenized pairs: the summed chosen / rejected log-probs that TRL's
DPOTrainer computes, each path a different layout of the same computation.

- packed: a pair becomes ONE sequence `prompt | chosen | rejected`: the rejected tokens take the positions right
  after the prompt and a block mask hides the chosen tokens from them, so both completions see exactly the context
  TRL gives them while the prompt is computed once (TRL runs it twice);
- cached: the batch's prompts once, then both completions from the prompts' cached keys and values;
- unpacked: the model's own forward on TRL's two rows a pair (the slow, general path every other is checked on);
- long: one very long pair, each side unpadded with no mask;
- flat (the unpadded layout, `EngineConfig.layout` flex or jagged): the whole batch one sequence, no padding, the
  prompt-once pattern a document mask applied by flex attention or by variable-length attention over documents.
Only completion positions go through the LM head, a chunk at a time. Which path a batch takes is `paths.py`'s.
(Over 400 lines: the layouts share the head, the unwrapping and the pad rule; apart, each would copy them.)
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from prefsift.engine.tokenize import TokenizedPair


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
        # Padding positions attend only to themselves. Fed the pad token, whose embedding row is zero in models built
        # with `padding_idx` (it never trains), their hidden state stays exactly zero through every layer, and each
        # RMSNorm multiplies their forward-mode tangent by 1/sqrt(eps): 28 layers overflow fp32, and the masked
        # attention's 0 x inf spreads NaN to every pair of the batch (jvp's NaN on the 0.6B shape, bench/jvp_probe.py).
        # A real token of the row there keeps them ordinary; no value changes: no pair ever attends to them.
        input_ids[b, total:] = input_ids[b, 0]
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


# --- the unpadded layout -----------------------------------------------------------------------------------------
# A batch as ONE flat sequence: each pair's `prompt | chosen | rejected` tokens one after another, no padding row, so
# the backbone's matmuls see each pair's unique tokens once. The attention pattern (each pair on its own, the
# rejected tokens blind to the chosen ones) is a document mask, applied by one of two kernels (`FLAT_KERNELS`):
# - flex: flex attention's block mask (blocks outside every pair are skipped when compiled: on a GPU always; on a
#   CPU eager flex computes the dense pattern, the reference the tests check);
# - jagged: variable-length attention over the pairs' documents `prompt|chosen` and `prompt|rejected` (the prompt's
#   keys gathered twice, its queries' outputs kept from the first), plain causal within each: FlashAttention's varlen
#   kernel in bf16/fp16 on a GPU, else SDPA one document at a time.
# The model's attention is swapped for `_flat_attention` by name (transformers' AttentionInterface) while the flat
# forward runs; a model whose attention does not go through that interface fails the path's check and keeps the
# padded layout.
FLAT_KERNELS = ("flex", "jagged")
FLAT_ATTENTION = "prefsift_flat"
_FLAT_LAYOUT: contextvars.ContextVar[FlatBatch | None] = contextvars.ContextVar("prefsift_flat_layout", default=None)


@dataclass
class FlatBatch:
    """The unpadded layout of a batch: the flat tokens and positions, which position predicts which scored token
    (`index`: 2 × pair + side), and what the kernel needs: the block mask (flex) or the documents (jagged)."""

    kernel: str
    input_ids: torch.Tensor  # (1, tokens)
    position_ids: torch.Tensor  # (1, tokens)
    predictors: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor
    n_pairs: int
    block_mask: object | None = None  # flex
    documents: torch.Tensor | None = None  # jagged: flat position of each document slot, documents one after another
    bounds: torch.Tensor | None = None  # jagged: cumulative document lengths (int32), for the varlen kernel
    back: torch.Tensor | None = None  # jagged: the document slot each flat position's output is read from
    longest: int = 0  # jagged: the longest document


def flat_bucket(tokens: int, batch_tokens: int) -> int:
    """The flat length a batch of `tokens` is padded to when flex attention is compiled: a multiple of a sixteenth
    of the token budget (at least flex's 128-token block), so one budget compiles at most ~16 shapes."""
    step = max(128, -(-batch_tokens // 16 // 128) * 128)
    return -(-tokens // step) * step


def flat_batch(model, pairs: list[TokenizedPair], kernel: str, pad_to: int | None = None) -> FlatBatch:
    """`pairs` in the unpadded layout for `kernel` (one of FLAT_KERNELS), on the model's device. `pad_to`: a flat
    length to pad to (flex compiled: a bounded set of shapes); padding is a document of its own that no pair sees,
    filled with the batch's first token (a real token: see `packed_batch`)."""
    device = _backbone_and_head(model)[2].weight.device
    ids: list[int] = []
    positions: list[int] = []
    pair_of: list[int] = []  # which pair a flat position belongs to (-1: padding)
    side_of: list[int] = []  # 0 prompt, 1 chosen, 2 rejected
    predictors, targets, index = [], [], []
    documents: list[int] = []
    lengths: list[int] = []
    for b, pair in enumerate(pairs):
        start, n_p, n_c, n_r = len(ids), len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        positions += list(range(n_p + n_c)) + list(range(n_p, n_p + n_r))
        pair_of += [b] * (n_p + n_c + n_r)
        side_of += [0] * n_p + [1] * n_c + [2] * n_r
        # token k of a completion is predicted by the position before it; the first one by the prompt's last
        chosen_pred = [start + n_p - 1 + k for k in range(n_c)]
        rejected_pred = ([start + n_p - 1] + [start + n_p + n_c + k - 1 for k in range(1, n_r)]) if n_r else []
        for side, preds, tokens in ((0, chosen_pred, pair.chosen_ids), (1, rejected_pred, pair.rejected_ids)):
            for pred, tok in zip(preds, tokens, strict=True):
                if pred >= start:  # an empty prompt leaves the first completion token unscored, as in TRL
                    predictors.append(pred)
                    targets.append(tok)
                    index.append(2 * b + side)
        documents += list(range(start, start + n_p + n_c))
        documents += list(range(start, start + n_p)) + list(range(start + n_p + n_c, start + n_p + n_c + n_r))
        lengths += [n_p + n_c, n_p + n_r]
    n_real = len(ids)
    if pad_to is not None and pad_to > n_real:
        ids += [ids[0]] * (pad_to - n_real)
        positions += list(range(pad_to - n_real))
        pair_of += [-1] * (pad_to - n_real)
        side_of += [0] * (pad_to - n_real)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    batch = FlatBatch(kernel, tensor(ids)[None], tensor(positions)[None], tensor(predictors), tensor(targets),
                      tensor(index), len(pairs))
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        pair_t, side_t = tensor(pair_of), tensor(side_of)

        def same_pair_causal(b, h, q, kv):  # rejected queries never see chosen keys
            return (pair_t[q] == pair_t[kv]) & (kv <= q) & ~((side_t[q] == 2) & (side_t[kv] == 1))

        batch.block_mask = create_block_mask(same_pair_causal, None, None, len(ids), len(ids), device=device)
    elif kernel == "jagged":
        slots = torch.arange(len(documents))
        document = torch.tensor(documents)
        back = torch.empty(n_real, dtype=torch.long)
        # a prompt position is in both of its pair's documents; its output is read from the first (`prompt|chosen`),
        # so that one is written last
        second = torch.repeat_interleave(torch.arange(len(lengths)) % 2 == 1, torch.tensor(lengths))
        back[document[second]] = slots[second]
        back[document[~second]] = slots[~second]
        batch.documents, batch.back = document.to(device), back.to(device)
        batch.bounds = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=device)
        batch.longest = max(lengths)
    else:
        raise ValueError(f"unknown flat kernel {kernel!r} (known: {', '.join(FLAT_KERNELS)})")
    return batch


def _flat_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of a flat batch (transformers' attention-function interface: query (1, heads, tokens, dim),
    key and value (1, kv heads, tokens, dim); returns (1, tokens, heads, dim)). Anything this does not implement
    (soft-capped scores, attention sinks, dropout) raises, so the path's check sends the model elsewhere."""
    layout = _FLAT_LAYOUT.get()
    if layout is None or dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("the flat layout's attention supports plain scaled dot-product attention only")
    gqa = query.shape[1] != key.shape[1]
    if layout.kernel == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        attend = _compiled_flex() if _flex_compiled(query.device) else flex_attention
        with warnings.catch_warnings():  # eager flex on a CPU is chosen knowingly (FLEX_COMPILE): no advice to compile
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            out = attend(query, key, value, block_mask=layout.block_mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2), None
    q, k, v = (x[0, :, layout.documents] for x in (query, key, value))  # (heads, document slots, dim)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        accepts = inspect.signature(varlen_attn).parameters  # torch 2.11 said is_causal, 2.13 window_size
        options = {"window_size": (-1, 0)} if "window_size" in accepts else {"is_causal": True}
        if gqa and "enable_gqa" not in accepts:
            k, v = (x.repeat_interleave(q.shape[0] // x.shape[0], dim=0) for x in (k, v))
        elif gqa:
            options["enable_gqa"] = True
        out = varlen_attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), layout.bounds, layout.bounds,
                          layout.longest, layout.longest, scale=scaling, **options).transpose(0, 1)
    else:
        bounds = layout.bounds.tolist()
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[None, :, lo:hi], k[None, :, lo:hi], v[None, :, lo:hi], is_causal=True, scale=scaling,
            enable_gqa=gqa)[0] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)], dim=1)
    return out[:, layout.back][None].transpose(1, 2), None


_COMPILED_FLEX = None
FLEX_COMPILE: bool | None = None  # None: compiled on a GPU (eager flex is a dense reference there), eager on a CPU


def _flex_compiled(device: torch.device) -> bool:
    return FLEX_COMPILE if FLEX_COMPILE is not None else device.type == "cuda"


def _compiled_flex():
    """flex attention compiled once a process (each new flat length recompiles: `flat_bucket` bounds them)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


@contextlib.contextmanager
def _flat_attention_on(model, batch: FlatBatch) -> Iterator[None]:
    """The model's attention swapped for `_flat_attention` on `batch` while the block runs; restored after."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLAT_ATTENTION, _flat_attention)
    config = _unwrap(model).config
    before = config._attn_implementation
    token = _FLAT_LAYOUT.set(batch)
    config._attn_implementation = FLAT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        _FLAT_LAYOUT.reset(token)


def flat_logps(model, batch: FlatBatch) -> torch.Tensor:
    """(pairs, 2) summed chosen / rejected log-probs of a flat batch, in float64 (as `packed_logps`)."""
    base, backbone, head = _backbone_and_head(model)
    with _flat_attention_on(model, batch):
        hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
                          ).last_hidden_state[0]
    token_logps = _token_logps(base.config, head, hidden[batch.predictors], batch.targets)
    sums = torch.zeros(batch.n_pairs * 2, dtype=torch.float64, device=hidden.device)
    return sums.index_add(0, batch.index, token_logps.double()).view(batch.n_pairs, 2)


@torch.inference_mode()
def _forward_batch_flat(model, pairs: list[TokenizedPair], kernel: str, batch_tokens: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs of a batch in the unpadded layout (`kernel`: one of FLAT_KERNELS). Compiled
    flex pads the flat length to `flat_bucket` of `batch_tokens`, so the pass compiles a bounded number of times."""
    device = _backbone_and_head(model)[2].weight.device
    pad_to = None
    if kernel == "flex" and _flex_compiled(device):
        pad_to = flat_bucket(sum(len(p) for p in pairs), batch_tokens or 8192)
    sums = flat_logps(model, flat_batch(model, pairs, kernel, pad_to)).cpu()
    return sums[:, 0], sums[:, 1]
