"""Which exact path a model's batches take, and the verdicts that decide it: each fast path is checked once a
model and process against the model's own forward on one pair, and the cheaper of the exact fast paths is chosen by
estimated FLOPs (a function of the batch's lengths alone, so a resumed run takes the same path for every batch).
"""

from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
from tqdm.auto import tqdm

from prefsift.config import EngineConfig
from prefsift.engine import tokenize
from prefsift.engine.forward import (
    FLAT_KERNELS,
    _backbone_and_head,
    _forward_batch,
    _forward_batch_cached,
    _forward_batch_flat,
    _forward_batch_unpacked,
    _forward_long,
)
from prefsift.engine.tokenize import BatchPlan, TokenizedPair
from prefsift.errors import ConfigError


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


PATHS = ("packed", "cached", "unpacked", *FLAT_KERNELS)  # the exact ways to a batch's log-probs; see `forward_batch`


class PathVerdicts:
    """Each model's verdicts, checked once a model and process: whether the packed and the cached-prefix paths
    reproduce its own forward. Held weakly, so a freed model's verdicts go with it."""

    def __init__(self) -> None:
        self.packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> packed path verified on it
        self.cached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> cached path verified on it
        self.flat: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {flat kernel: verified}

    def of(self, model) -> dict[str, bool | None]:
        flat = self.flat.get(model, {})
        return {"packed": self.packed.get(model), "cached": self.cached.get(model),
                **{kernel: flat.get(kernel) for kernel in FLAT_KERNELS}}


VERDICTS = PathVerdicts()  # this process's: every pass and every `Engine` shares them


def _tolerance(model, pair: TokenizedPair) -> tuple[float, float]:
    """(rtol, atol) between the packed and the model's own forward on `pair`. They reduce in another order: ~1e-4
    nats apart in fp32. In bf16 each token's log-prob moves by rounding, so the sums drift apart like a random walk:
    0.05 nats times the square root of the completion's tokens. An architecture the packed path gets wrong is off by
    more (a sliding window forced through it: 0.29 nats in fp32); bf16 cannot see errors below its own noise."""
    if next(model.parameters()).dtype == torch.float32:
        return 1e-4, 1e-3
    return 0.0, 0.05 * math.sqrt(max(len(pair.chosen_ids), len(pair.rejected_ids)))


def _agrees_with_own_forward(model, pair: TokenizedPair, pad_id: int, forward, path: str, fallback: str,
                             want: torch.Tensor | None = None) -> tuple[bool, torch.Tensor | None]:
    """Whether `forward()` (a path's batch forward on [pair]) reproduces the model's own forward on `pair` (`want`,
    computed here when None), and those own values. A failure or a mismatch warns, naming the `path` and the
    `fallback` taken: every path and layout is checked this one way."""
    name = type(model).__name__
    try:
        got = torch.stack(forward())[:, 0]
    except Exception as error:  # noqa: BLE001 - any failure means: not this path
        warnings.warn(f"the {path} forward fails on {name} ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}): using {fallback}", stacklevel=4)
        return False, want
    if want is None:
        want = torch.stack(_forward_batch_unpacked(model, [pair], pad_id))[:, 0]
    rtol, atol = _tolerance(model, pair)
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        warnings.warn(f"the {path} forward disagrees with {name}'s own forward ({got.tolist()} vs {want.tolist()}): "
                      f"using {fallback}", stacklevel=4)
        return False, want
    return True, want


def packed_path_ok(model, pair: TokenizedPair, pad_id: int) -> bool:
    """Whether the packed fast path reproduces this model's own forward, checked once a model and process on one
    pair; any failure or mismatch warns once and sends the model to the unpacked path."""
    if model in VERDICTS.packed:
        return VERDICTS.packed[model]
    ok, want = can_pack(model), None
    if ok:  # e.g. ALiBi models (Bloom) build their bias from a 2-D mask: the packed forward fails
        ok, want = _agrees_with_own_forward(model, pair, pad_id, lambda: _forward_batch(model, [pair], pad_id),
                                            "packed", "the unpacked path")
    VERDICTS.packed[model] = ok
    if ok:  # on the same pair, so a resumed run makes the same choices; the model's own forward is not rerun
        cached_path_ok(model, pair, pad_id, want)
    return ok


def cached_path_ok(model, pair: TokenizedPair, pad_id: int, want: torch.Tensor | None = None) -> bool:
    """Whether the cached-prefix path reproduces this model's own forward (checked once, as `packed_path_ok`; `want`:
    that forward's values on `pair` if already computed): a model whose cache or explicit positions behave otherwise
    warns once and keeps to the packed path."""
    if model not in VERDICTS.cached:
        VERDICTS.cached[model], _ = _agrees_with_own_forward(
            model, pair, pad_id, lambda: _forward_batch_cached(model, [pair], pad_id), "cached-prefix",
            "the packed path", want)
    return VERDICTS.cached[model]


def flat_path_ok(model, pair: TokenizedPair, pad_id: int, kernel: str) -> bool:
    """Whether the unpadded layout with `kernel` (one of FLAT_KERNELS) reproduces this model's own forward, checked
    once a model, kernel and process on one pair, as `packed_path_ok`; a failure or mismatch warns once and the
    model keeps the padded layout."""
    verdicts = VERDICTS.flat.setdefault(model, {})
    if kernel not in verdicts:
        ok = can_pack(model)
        if ok:
            ok, _ = _agrees_with_own_forward(model, pair, pad_id, lambda: _forward_batch_flat(model, [pair], kernel),
                                             f"unpadded {kernel}", "the padded layout")
        verdicts[kernel] = ok
    return verdicts[kernel]


def chosen_layout(model, plan: BatchPlan, tokenized, pad_id: int, layout: str, executor=None) -> str:
    """The layout a pass takes: `layout` as asked (EngineConfig.layout) when it is padded or its check passes on the
    plan's check pair (`flat_path_ok`), else padded. The unpadded layout runs in this process only."""
    if layout == "padded":
        return layout
    if layout not in FLAT_KERNELS:
        raise ConfigError(f"unknown layout {layout!r} (known: padded, {', '.join(FLAT_KERNELS)})")
    if executor is not None:
        raise ConfigError(f"layout {layout} runs in this process only: use --backend local or --layout padded")
    checked = tokenize.path_check_pair(plan, tokenized)
    return layout if checked is not None and flat_path_ok(model, checked, pad_id, layout) else "padded"


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
                       progress: tqdm | None = None, packed: bool | None = None, path: str | None = None,
                       executor=None, layout: str = "padded") -> np.ndarray:
    """(n, 2) array of summed chosen / rejected log-probs; NaN rows for dropped pairs. `packed=None` takes the
    packed fast path where `packed_path_ok` allows it; `path` forces one of PATHS; `layout` (padded, or one of
    FLAT_KERNELS) as `chosen_layout` decides. `executor(model, batches, pad_id, packed)` (an
    `executors.RayExecutor`) runs the batches elsewhere, yielding them in order; None: here."""
    out = np.full((len(tokenized), 2), np.nan)
    plan = BatchPlan.of(tokenized, batch_tokens)
    batches = ([tokenized[i] for i in batch] for batch in plan.batches)
    if path is None:
        layout = chosen_layout(model, plan, tokenized, pad_id, layout, executor)
    results = (executor(model, batches, pad_id, packed) if executor is not None and path is None
               else (forward_batch(model, pairs, pad_id, packed, path, batch_tokens, layout) for pairs in batches))
    for batch in plan.batches:
        chosen, rejected = next(results)
        out[batch, 0], out[batch, 1] = chosen.numpy(), rejected.numpy()
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.update(len(tokenized) - plan.n_kept)
    return out


def forward_batch(model, pairs: list[TokenizedPair], pad_id: int, packed: bool | None = None,
                  path: str | None = None, batch_tokens: int | None = None, layout: str = "padded"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's (chosen, rejected) summed log-probs. `path` forces one of PATHS; else a very long lone pair takes
    `_forward_long`, a `layout` of FLAT_KERNELS whose check passed on the model takes the unpadded layout, and the
    rest the cheaper verified padded path (packed or cached-prefix), or the unpacked one."""
    if path in FLAT_KERNELS:  # one flat sequence of the batch's pairs, no padding; flex or jagged attention
        return _forward_batch_flat(model, pairs, path, batch_tokens)
    if path is not None:  # packed: one prompt|chosen|rejected row a pair under a block mask; cached: the prompt once,
        # the completions from its cached keys and values; unpacked: the model's own forward in TRL's layout
        paths = {"packed": _forward_batch, "cached": _forward_batch_cached, "unpacked": _forward_batch_unpacked}
        return paths[path](model, pairs, pad_id)
    if len(pairs) == 1 and len(pairs[0]) > tokenize.LONG_PAIR_TOKENS and can_pack(model):
        return _forward_long(model, pairs[0])
    if layout in FLAT_KERNELS and VERDICTS.flat.get(model, {}).get(layout):  # checked by the pass (flat_path_ok)
        return _forward_batch_flat(model, pairs, layout, batch_tokens)
    use_packed = packed_path_ok(model, pairs[0], pad_id) if packed is None else packed
    if not use_packed:
        return _forward_batch_unpacked(model, pairs, pad_id)
    # the cheaper of the two exact fast paths, by estimated FLOPs: a function of the batch's lengths alone, so a
    # resumed run takes the same path for every batch
    costs = _costs(model, pairs)
    if costs["cached"] < costs["packed"] and cached_path_ok(model, pairs[0], pad_id):
        return _forward_batch_cached(model, pairs, pad_id)
    return _forward_batch(model, pairs, pad_id)
