"""Exact influence of a training pair on the validation loss (TIF paper, identity Hessian), at forward-pass cost.
(Over 400 lines: ḡ_val and the exact methods share the scope, the layouts and the shards; apart, the formula
would be in four files.)

    IF(d) = β(1 − σ(Δ_θ(d))) · ⟨ḡ_val, g_w − g_l⟩,   g_y = ∇ log π_θ(y|x) over the parameters in scope,
    ḡ_val = (1/|V|) Σ_V (1 − σ(Δ_θ(d_i))) (g_w^i − g_l^i).

ḡ_val is one accumulated backward pass over the validation pairs. ⟨ḡ_val, g_w − g_l⟩ is the directional derivative
of log π(y_w|x) − log π(y_l|x) along ḡ_val, so every training pair then costs forward passes only:
- "finite-difference": central difference in fp32 on weights perturbed in place by ±ε·ḡ_val, with
  ε = step·‖θ_scope‖/‖ḡ_val‖ (a step relative to the weights: an absolute one vanishes under rounding). Along
  ḡ_val, the steepest direction there is, the step must be far smaller than along a random direction (METHODS.md
  §3's 1e-2): see DEFAULT_STEP. Each side is a `compute_logps` pass: the packed, bucketed engine, with resumable
  shards named by the direction and the step.
- "one-sided": the +ε pass only, against the policy's own unperturbed pass (which every influence score computes
  anyway, for its weight β(1 − σ(Δ_θ))): one perturbed pass a pair instead of two. Both sides must round alike
  (`same_rounding`).
Either difference's step is set by hand or, with `step=None`, chosen on the check pairs (`choose_step`).
- "jvp": forward-mode AD (`torch.func.jvp`) on the engine's packed rows (`logps.packed_logps`: the prompt once, the
  LM head on the completions only), with eager attention (SDPA kernels have no forward-AD rule).
ḡ_val's backward pass runs on the packed rows too. Either falls back to TRL's two rows a pair (`pair_logps`) where
the engine's packed path fails its check on the model.
- "per-example": one backward pass a pair dotted with ḡ_val: the slow, obvious reference the tests compare to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prefsift.engine.executors import RayExecutor
from prefsift.engine.forward import PackedBatch, _unwrap, packed_batch, packed_logps
from prefsift.engine.logps import compute_logps
from prefsift.engine.paths import logps_of_tokenized, packed_path_ok
from prefsift.engine.shards import LogpsRun
from prefsift.engine.tokenize import (
    LONG_PAIR_TOKENS,
    BatchPlan,
    TokenizedPair,
    pad_id,
    path_check_pair,
    tokenize_pairs,
)
from prefsift.errors import ConfigError, PrefsiftError
from prefsift.output import cheaper, temp_sibling
from prefsift.output import progress as progress_bar

SCOPES = ("all", "lora", "last_k")
METHODS = ("finite-difference", "one-sided", "jvp", "per-example")
DEFAULT_STEP = 1e-5  # ε·‖v‖ = step·‖θ_scope‖; chosen by the sweep in bench/results/influence.txt (SmolLM2: 1e-2
# gave ρ 0.69 along ḡ_val, 1e-4 ρ 0.95, 1e-5 ρ 1.000 / 0.5% error; tiny Llamas: 1e-5 ρ 1.000 / ≤0.3%)
GRAD_BATCH_TOKENS = 2048  # token budget of the batches that keep activations for a backward / forward-AD pass

Direction = dict[str, torch.Tensor]


# --- parameters in scope ----------------------------------------------------------------------------------------
def transformer_layers(model) -> nn.ModuleList:
    """The stack of transformer blocks: `model.model.layers` (Llama, Qwen, Mistral), `transformer.h` (GPT-2), else
    the longest ModuleList in the model."""
    base = _unwrap(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None) or base
    for owner in (backbone, base):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers):
                return layers
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(base).__name__} has no list of transformer layers: use scope 'all' or 'lora'")
    return max(lists, key=len)


def scope_parameters(model, scope: str = "all", last_k: int = 1) -> dict[str, nn.Parameter]:
    """The parameters influence is taken over, by name relative to the unwrapped model (peft's LoRA injected).
    "all": every parameter; "lora": names with "lora_"; "last_k": the last k transformer layers."""
    base = _unwrap(model)
    named = dict(base.named_parameters())  # tied weights appear once
    if scope == "all":
        return named
    if scope == "lora":
        chosen = {n: p for n, p in named.items() if "lora_" in n}
        if not chosen:
            raise ConfigError("scope 'lora' needs a model with LoRA adapters (no parameter named 'lora_*')")
        return chosen
    if scope == "last_k":
        layers = transformer_layers(base)
        if not 1 <= last_k <= len(layers):
            raise ConfigError(f"last_k must be between 1 and the model's {len(layers)} layers (got {last_k})")
        wanted = {id(p) for layer in list(layers)[-last_k:] for p in layer.parameters()}
        return {n: p for n, p in named.items() if id(p) in wanted}
    raise ConfigError(f"unknown scope '{scope}' (known: {', '.join(SCOPES)})")


@contextlib.contextmanager
def _grads_on(model, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """requires_grad on the parameters in scope only (no gradient is built for the rest), eval mode; restored."""
    base = _unwrap(model)
    before = {p: p.requires_grad for p in base.parameters()}
    was_training = base.training
    base.eval()
    try:
        for p in before:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
        base.train(was_training)


# --- a differentiable forward -----------------------------------------------------------------------------------
def pair_logps(model, pairs: list[TokenizedPair], pad_id: int, weights: dict[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed chosen / rejected log-probs (float64, differentiable) through the model's own forward on
    prompt+chosen and prompt+rejected rows (TRL's layout, as `logps._forward_batch_unpacked`). `weights` replaces
    parameters by name (`torch.func.functional_call`), for forward-mode AD."""
    base = _unwrap(model)
    device = next(base.parameters()).device
    rows = [p.prompt_ids + c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    which, predictor, target = [], [], []
    for k, (row, pair) in enumerate(zip(rows, (p for p in pairs for _ in range(2)), strict=True)):
        for t in range(max(len(pair.prompt_ids), 1), len(row)):  # an empty prompt leaves token 0 unscored, as TRL
            which.append(k)
            predictor.append(t - 1)
            target.append(row[t])
    inputs = {"input_ids": input_ids, "attention_mask": attention, "use_cache": False}
    if weights is None:
        logits = base(**inputs).logits
    else:
        logits = torch.func.functional_call(base, weights, (), inputs, strict=False).logits
    which_t = torch.tensor(which, device=device)
    picked = logits[which_t, torch.tensor(predictor, device=device)].float().log_softmax(-1)
    token_logps = picked.gather(-1, torch.tensor(target, device=device)[:, None])[:, 0].double()
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, which_t, token_logps)
    return sums[0::2], sums[1::2]


def _device(model) -> str:
    return next(model.parameters()).device.type


def _tokenize(tokenizer, pairs, max_length: int | None) -> list[TokenizedPair | None]:
    out: list[TokenizedPair | None] = []
    for lo in range(0, len(pairs), 1024):
        rows = pairs[lo:lo + 1024]
        out += tokenize_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"], max_length)
    return out


def _packed_ok(model, plan: BatchPlan, tokenized: list[TokenizedPair | None], pad: int) -> bool:
    """Whether the engine's packed rows (the prompt once, the head on the completions only) reproduce the model's own
    forward, checked as the log-prob engine checks it, on the same pair: then ḡ_val and forward-mode AD run on them
    too."""
    checked = path_check_pair(plan, tokenized)
    return checked is not None and packed_path_ok(_unwrap(model), checked, pad)


def _packs(packed: bool, chunk: list[TokenizedPair]) -> bool:
    """Whether this batch goes on the packed rows: a pair longer than LONG_PAIR_TOKENS would need a width² mask, so
    its batch keeps TRL's rows (a 2-D padding mask, the kernels' own causal attention)."""
    return packed and max(len(p) for p in chunk) <= LONG_PAIR_TOKENS


# --- ḡ_val ------------------------------------------------------------------------------------------------------
def validation_gradient(model, tokenizer, pairs, reference_logps: np.ndarray, params: dict[str, nn.Parameter], *,
                        beta: float, max_length: int | None, batch_tokens: int = GRAD_BATCH_TOKENS
                        ) -> tuple[Direction, np.ndarray]:
    """(ḡ_val by parameter name in fp32, the validation margins Δ_θ) from one pass over the validation `pairs`,
    gradients accumulated batch by batch: never one stored gradient a pair. Pairs TRL drops do not count in |V|. The
    log-probs are the engine's packed rows where its check allows (a backward through `packed_logps`)."""
    tokenized = _tokenize(tokenizer, pairs, max_length)
    plan = BatchPlan.of(tokenized, batch_tokens)
    names = list(params)
    total = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    margins = np.full(len(tokenized), np.nan)
    reference = torch.as_tensor(reference_logps, dtype=torch.float64)
    pad = pad_id(tokenizer)
    packed = _packed_ok(model, plan, tokenized, pad)
    # a backward over every validation pair: minutes on a CPU (~9.5 silent ones on SmolLM2, issue 22), so a bar
    with _grads_on(model, params), progress_bar(total=len(tokenized), desc="validation gradient", unit="pair",
                                       disable=not tokenized, cheaper=cheaper(max_length, _device(model),
                                       sample="fewer validation pairs")) as progress:
        progress.update(len(tokenized) - plan.n_kept)
        for batch in plan.batches:
            chunk = [tokenized[i] for i in batch]
            if _packs(packed, chunk):
                sums = packed_logps(model, packed_batch(model, chunk, pad))
                chosen, rejected = sums[:, 0], sums[:, 1]
            else:
                chosen, rejected = pair_logps(model, chunk, pad)
            ref = reference[batch].to(chosen.device)
            margin = beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))
            weight = (1 - torch.sigmoid(margin.detach())) / max(plan.n_kept, 1)
            grads = torch.autograd.grad((weight * (chosen - rejected)).sum(), [params[n] for n in names],
                                        allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.float()
            margins[batch] = margin.detach().cpu().numpy()
            progress.update(len(batch))
    return dict(zip(names, total, strict=True)), margins


def direction_hash(direction: Direction) -> str:
    digest = hashlib.sha256()
    for name in sorted(direction):
        digest.update(name.encode())
        digest.update(direction[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


NORM_CHUNK = 4096  # elements a row of the norm's reduction: one thread sums a row, whatever the thread count


def _norm(tensors) -> float:
    """‖tensors‖ in float64, the same float whatever torch's thread count (a reduction's split follows the threads,
    and ε, derived from this norm, sets the perturbed weights): each tensor's squares summed in rows of NORM_CHUNK,
    a row on one thread, on the tensor's own device; the row sums added exactly (math.fsum) on the host."""
    partial: list[float] = []
    for t in tensors:
        x = t.detach().flatten().double()
        x = torch.nn.functional.pad(x, (0, -len(x) % NORM_CHUNK))
        partial += x.view(-1, NORM_CHUNK).square().sum(dim=1).cpu().tolist()
    return math.sqrt(math.fsum(partial))


# --- ⟨v, g_w − g_l⟩ for every pair -------------------------------------------------------------------------------
def finite_difference(model, tokenizer, pairs, direction: Direction, params: dict[str, nn.Parameter], *,
                      step: float = DEFAULT_STEP, max_length: int | None, batch_tokens: int = 8192,
                      run_dir: Path | None = None, identity: dict | None = None, flush_rows: int = 512,
                      executor: RayExecutor | None = None, base_logps: np.ndarray | None = None,
                      layout: str = "padded", check_rounding: bool = True) -> np.ndarray:
    """Central difference of log π(y_w|x) − log π(y_l|x) along `direction`, weights perturbed in place by ±ε·v
    (ε = step·‖θ_scope‖/‖v‖), each side one `compute_logps` pass (resumable shards when `run_dir` is given). The
    weights are restored bit for bit from a copy, also when a pass is interrupted.

    With `base_logps` (the unperturbed policy's (n, 2) log-probs from the same engine settings, so the same batches
    and paths: their rounding cancels), a one-sided difference: the +ε pass only, one pass a pair instead of two.
    Its +ε shards are the central difference's, so either method reuses the other's. `base_logps` is first checked
    to round as this process does (`same_rounding`), unless `check_rounding` is off (the caller computed it here)."""
    if base_logps is not None and check_rounding:
        base_logps = same_rounding(model, tokenizer, pairs, base_logps, max_length=max_length,
                                   batch_tokens=batch_tokens, layout=layout)
    v_norm, theta_norm = _norm(direction.values()), _norm(params.values())
    if v_norm == 0.0:
        warnings.warn("the validation gradient is zero: every influence is 0", stacklevel=2)
        return np.where(np.isnan(_tokenized_mask(tokenizer, pairs, max_length)), np.nan, 0.0)
    if next(iter(params.values())).dtype != torch.float32:
        warnings.warn("finite differences need fp32 weights (bf16: ~20% error, METHODS.md §3); load the policy "
                      "in float32 or use method 'jvp'", stacklevel=2)
    epsilon = step * theta_norm / v_norm
    saved = {n: p.detach().clone() for n, p in params.items()}
    sides = []
    signs = ((1.0, "influence-plus"), (-1.0, "influence-minus"))[: 1 if base_logps is not None else 2]
    # the direction's bytes and the step name the runs, never ε: a float derived from them would tie the identity to
    # the reduction order of a norm (issue 19's flake: a resume recomputed everything). Hashed once for both sides.
    named = None if run_dir is None else {**(identity or {}), "direction": direction_hash(direction),
                                          "step": repr(float(step))}
    try:
        for sign, tag in signs:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n] + (sign * epsilon) * direction[n].to(p.dtype))
            run = None if named is None else LogpsRun(Path(run_dir), tag, named)
            sides.append(compute_logps(model, tokenizer, pairs, max_length=max_length, batch_tokens=batch_tokens,
                                       run=run, desc=f"{tag} log-probs", flush_rows=flush_rows, executor=executor,
                                       layout=layout))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    if base_logps is not None:
        (plus,) = sides
        return ((plus[:, 0] - plus[:, 1]) - (base_logps[:, 0] - base_logps[:, 1])) / epsilon
    plus, minus = sides
    return ((plus[:, 0] - plus[:, 1]) - (minus[:, 0] - minus[:, 1])) / (2 * epsilon)


def same_rounding(model, tokenizer, pairs, base_logps: np.ndarray, *, max_length: int | None, batch_tokens: int,
                  layout: str = "padded") -> np.ndarray:
    """`base_logps` (the policy's pass) when it rounds as this process's +ε pass will, else the policy's pass redone
    here, with a warning. A one-sided difference divides the change of a log-prob by a step of ~1e-6 relative, so the
    two sides' rounding must cancel: the same batches, path and thread count (a matmul's summation order follows the
    threads). A pass from another process (a Ray pool, a cache written at another thread count) may differ; the
    check recomputes the plan's smallest batch and compares it bit for bit."""
    tokenized = _tokenize(tokenizer, pairs, max_length)
    plan = BatchPlan.of(tokenized, batch_tokens)
    if not plan.batches:
        return base_logps
    batch = min(plan.batches, key=lambda rows: sum(len(tokenized[i]) for i in rows))  # type: ignore[arg-type]
    again = logps_of_tokenized(_unwrap(model), [tokenized[i] for i in batch], pad_id=pad_id(tokenizer),
                               batch_tokens=batch_tokens, layout=layout)
    if np.array_equal(again, base_logps[batch]):
        return base_logps
    gap = float(np.nanmax(np.abs(again - base_logps[batch])))
    warnings.warn(f"the policy's log-probs round differently here (up to {gap:.1e} nats on one batch: another thread "
                  f"count or process): a one-sided difference needs both sides rounded alike, so the policy's pass "
                  f"is recomputed here (one more pass)", stacklevel=3)
    return compute_logps(model, tokenizer, pairs, max_length=max_length, batch_tokens=batch_tokens,
                         desc="policy log-probs (this process's rounding)", layout=layout)


def _tokenized_mask(tokenizer, pairs, max_length: int | None) -> np.ndarray:
    return np.array([0.0 if t is not None else np.nan for t in _tokenize(tokenizer, pairs, max_length)])


@contextlib.contextmanager
def eager_attention(model) -> Iterator[None]:
    """The model's attention switched to the eager implementation (forward-AD has no rule for SDPA kernels)."""
    config = _unwrap(model).config
    before = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


class _Packed(nn.Module):
    """The engine's packed forward as a module, so `torch.func.functional_call` can swap the weights in scope."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return packed_logps(self.base, batch)


def forward_ad(model, tokenizer, pairs, direction: Direction, params: dict[str, nn.Parameter], *,
               max_length: int | None, batch_tokens: int = GRAD_BATCH_TOKENS, run_dir: Path | None = None,
               identity: dict | None = None) -> np.ndarray:
    """⟨v, g_w − g_l⟩ by forward-mode AD: one dual forward a batch, on the same length-bucketed plan as the log-prob
    engine, finished batches kept as resumable shards (chosen / rejected tangents) when `run_dir` is given. Where the
    engine's packed path is verified on the model, each pair is one `prompt | chosen | rejected` row (the prompt once,
    the LM head on the completions only); else TRL's two padded rows a pair."""
    tokenized = _tokenize(tokenizer, pairs, max_length)
    plan = BatchPlan.of(tokenized, batch_tokens)
    names = list(params)
    primals = tuple(params[n].detach() for n in names)
    tangents = tuple(direction[n].to(params[n].dtype) for n in names)
    out = np.full((len(tokenized), 2), np.nan)
    base = _unwrap(model)
    pad = pad_id(tokenizer)
    packed = _packed_ok(model, plan, tokenized, pad)
    packed_module = _Packed(base)
    # the layout is part of a shard's identity: in bf16 the two layouts' tangents differ by rounding (~1%)
    run = None if run_dir is None else LogpsRun(Path(run_dir), "influence-jvp",
                                                {**(identity or {}), "direction": direction_hash(direction),
                                                 "layout": "packed" if packed else "two rows"})
    done = run.finished() if run is not None else {}
    if run is not None:
        run.shard_dir.mkdir(parents=True, exist_ok=True)
    was_training = base.training
    base.eval()
    try:
        with eager_attention(base), torch.no_grad():
            for number, batch in enumerate(plan.batches):
                if number in done and sorted(done[number][:, 0].astype(int)) == sorted(batch):
                    out[done[number][:, 0].astype(int)] = done[number][:, 1:]
                    continue
                chunk = [tokenized[i] for i in batch]
                if _packs(packed, chunk):
                    inputs = packed_batch(base, chunk, pad)

                    def f(*values, inputs=inputs):
                        weights = {f"base.{n}": v for n, v in zip(names, values, strict=True)}
                        sums = torch.func.functional_call(packed_module, weights, (inputs,), strict=False)
                        return sums[:, 0], sums[:, 1]
                else:
                    def f(*values, chunk=chunk):
                        return pair_logps(base, chunk, pad, dict(zip(names, values, strict=True)))

                _, (d_chosen, d_rejected) = torch.func.jvp(f, primals, tangents)
                values = torch.stack([d_chosen, d_rejected], 1).cpu().numpy()
                out[batch] = values
                if run is not None:
                    run.write([number] * len(batch), batch, values)
    finally:
        base.train(was_training)
    return out[:, 0] - out[:, 1]


def per_example(model, tokenizer, pairs, direction: Direction, params: dict[str, nn.Parameter], *,
                max_length: int | None) -> np.ndarray:
    """The reference: for each pair, the explicit gradient of log π(y_w|x) − log π(y_l|x) dotted with ḡ_val."""
    tokenized = _tokenize(tokenizer, pairs, max_length)
    names = list(params)
    out = np.full(len(tokenized), np.nan)
    with _grads_on(model, params), progress_bar(total=len(tokenized), desc="exact gradients", unit="pair",
                                       disable=not tokenized, cheaper=cheaper(max_length, _device(model),
                                       sample="the finite difference instead")) as progress:
        for i, pair in enumerate(tokenized):
            if pair is not None:
                chosen, rejected = pair_logps(model, [pair], pad_id(tokenizer))
                grads = torch.autograd.grad((chosen - rejected).sum(), [params[n] for n in names],
                                            allow_unused=True)
                out[i] = float(sum((g.double() * direction[n].double()).sum()
                                   for n, g in zip(names, grads, strict=True) if g is not None))
            progress.update(1)
    return out


def directional_derivatives(model, tokenizer, pairs, direction: Direction, params: dict[str, nn.Parameter], *,
                            method: str = "finite-difference", step: float = DEFAULT_STEP,
                            max_length: int | None, batch_tokens: int = 8192, run_dir: Path | None = None,
                            identity: dict | None = None, executor: RayExecutor | None = None,
                            policy_logps: np.ndarray | None = None, layout: str = "padded") -> np.ndarray:
    """⟨direction, g_w − g_l⟩ for every pair of `pairs` (NaN where TRL drops the pair), by `method`; "one-sided"
    needs `policy_logps`, the unperturbed pass at the same engine settings."""
    if method in ("finite-difference", "one-sided"):
        if method == "one-sided" and policy_logps is None:
            raise ConfigError("a one-sided difference needs the policy's log-probs of the same pairs")
        return finite_difference(model, tokenizer, pairs, direction, params, step=step, max_length=max_length,
                                 batch_tokens=batch_tokens, run_dir=run_dir, identity=identity,
                                 executor=executor, base_logps=policy_logps if method == "one-sided" else None,
                                 layout=layout)
    if method == "jvp":
        try:
            return forward_ad(model, tokenizer, pairs, direction, params, max_length=max_length,
                              batch_tokens=min(batch_tokens, GRAD_BATCH_TOKENS), run_dir=run_dir, identity=identity)
        except (NotImplementedError, RuntimeError) as error:
            warnings.warn(f"forward-mode AD fails on {type(_unwrap(model)).__name__} ({str(error).splitlines()[0]}):"
                          " using finite differences", stacklevel=2)
            return finite_difference(model, tokenizer, pairs, direction, params, step=step, max_length=max_length,
                                     batch_tokens=batch_tokens, run_dir=run_dir, identity=identity,
                                     executor=executor)
    if method == "per-example":
        return per_example(model, tokenizer, pairs, direction, params, max_length=max_length)
    raise ConfigError(f"unknown influence method '{method}' (known: {', '.join(METHODS)})")


def check_against_exact(model, tokenizer, pairs, directional: np.ndarray, direction: Direction,
                        params: dict[str, nn.Parameter], *, max_length: int | None, n_pairs: int = 4,
                        tolerance: float = 0.05, exact: np.ndarray | None = None) -> float:
    """Largest error of `directional` on the first `n_pairs` scored pairs against per-example gradients, as a share
    of their largest |value|; warns above `tolerance`. Cheap insurance: the best finite-difference step moved 100x
    between the models measured (bench/results/influence.txt). `exact`: those pairs' per-example values, when
    already computed (`choose_step`)."""
    rows = [i for i in range(len(directional)) if np.isfinite(directional[i])][:n_pairs]
    if not rows:
        return 0.0
    if exact is None or len(exact) != len(rows):
        exact = per_example(model, tokenizer, pairs.select(rows), direction, params, max_length=max_length)
    scale = np.abs(exact).max()
    error = float(np.abs(directional[rows] - exact).max() / scale) if scale > 0 else 0.0
    if error > tolerance:
        warnings.warn(f"finite differences are {error:.0%} off exact gradients on {len(rows)} pairs: change the "
                      "step (or use method 'jvp')", stacklevel=2)
    return error


# Steps the adaptive choice may take, a decade apart. The truncation error of a difference falls with the step (the
# one-sided's as the step, the central's as its square) until fp32 rounding, growing as 1/step, takes over: on
# SmolLM2 the one-sided difference's ρ was 0.993 at 1e-5 and 1.000 at 1e-6 (bench/results/influence-onesided-*), on
# random-weight GPU shapes 1e-5 gave ρ ≥ 0.9996: the best step depends on the model.
STEPS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def choose_step(model, tokenizer, pairs, direction: Direction, params: dict[str, nn.Parameter], *, method: str,
                max_length: int | None, batch_tokens: int = 8192, n_pairs: int = 4, layout: str = "padded"
                ) -> tuple[float, dict[float, float], np.ndarray | None]:
    """(step, {step tried: error}, the check pairs' per-example values): the finite-difference step whose values on
    the first `n_pairs` kept pairs agree best with their per-example gradients (the largest error over the largest
    |value|, as `check_against_exact` measures it). From DEFAULT_STEP and the decade below it, the search walks the
    decades of STEPS in the better direction until the error grows: three or four passes over `n_pairs` pairs, a
    once-off cost like ḡ_val's, whatever the number of pairs scored. The one-sided difference's unperturbed side is
    recomputed on the same pairs here, so both sides of every trial round alike."""
    tokenized = _tokenize(tokenizer, pairs, max_length)
    rows = [i for i, t in enumerate(tokenized) if t is not None][:n_pairs]
    if not rows:
        return DEFAULT_STEP, {}, None
    subset = pairs.select(rows)
    exact = per_example(model, tokenizer, subset, direction, params, max_length=max_length)
    scale = float(np.abs(exact).max())
    base = (compute_logps(model, tokenizer, subset, max_length=max_length, batch_tokens=batch_tokens, layout=layout,
                          desc="step check") if method == "one-sided" else None)
    errors: dict[float, float] = {}

    def error(step: float) -> float:
        if step not in errors:
            found = finite_difference(model, tokenizer, subset, direction, params, step=step, max_length=max_length,
                                      batch_tokens=batch_tokens, base_logps=base, layout=layout,
                                      check_rounding=False)
            errors[step] = float(np.abs(found - exact).max() / scale) if scale > 0 else 0.0
        return errors[step]

    at = STEPS.index(DEFAULT_STEP)
    way = 1 if error(STEPS[at + 1]) < error(STEPS[at]) else -1  # smaller steps, or larger ones
    at += 1 if way == 1 else 0
    while 0 <= at + way < len(STEPS) and error(STEPS[at + way]) < error(STEPS[at]):
        at += way
    return STEPS[at], errors, exact


INSTEAD = {"jvp": "finite-difference", "finite-difference": "jvp", "one-sided": "jvp",
           "per-example": "finite-difference"}


def check_finite(directional: np.ndarray, policy_logps: np.ndarray, reference_logps: np.ndarray, method: str) -> None:
    """One line, never a NaN influence in a scores file: a pair with finite log-probs must get a finite derivative
    (forward-mode AD returned NaN on a GPU for a 0.6B shape that agreed on a CPU). A pair TRL drops stays NaN."""
    kept = np.isfinite(policy_logps).all(axis=1) & np.isfinite(reference_logps).all(axis=1)
    bad = kept & ~np.isfinite(directional)
    if bad.any():
        raise PrefsiftError(f"influence by {method} is not finite for {int(bad.sum())} of {int(kept.sum())} pairs "
                            f"(a numerical failure of the method on this model, not a property of the pairs): use "
                            f"--param method={INSTEAD[method]}")


def influence(margins: np.ndarray, directional: np.ndarray, beta: float) -> np.ndarray:
    """IF(d) = β(1 − σ(Δ_θ(d))) · ⟨ḡ_val, g_w − g_l⟩."""
    return beta * (1.0 - 1.0 / (1.0 + np.exp(-np.asarray(margins, dtype=float)))) * directional


# --- the whole computation, with ḡ_val kept on disk ----------------------------------------------------------------
def cached_validation_gradient(model, tokenizer, pairs, reference_logps: np.ndarray,
                               params: dict[str, nn.Parameter], *, beta: float, max_length: int | None,
                               run_dir: Path | None = None, identity: dict | None = None) -> Direction:
    """`validation_gradient`, saved under run_dir/shards by its identity, so a resumed run reuses the very same
    direction (and so finds its finite-difference shards)."""
    path = None
    if run_dir is not None:
        key = hashlib.sha256(json.dumps({**(identity or {}), "beta": beta, "max_length": max_length,
                                         "reference": hashlib.sha256(np.ascontiguousarray(reference_logps)
                                                                     .tobytes()).hexdigest()},
                                        sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = Path(run_dir) / "shards" / f"influence-direction-{key}.safetensors"
        if path.is_file():
            with contextlib.suppress(Exception):  # an unreadable file is recomputed, never trusted
                from safetensors.torch import load_file

                saved = load_file(path, device="cpu")  # safetensors: a cache file never runs code
                if set(saved) == set(params):
                    return {n: t.to(params[n].device) for n, t in saved.items()}
    direction, _ = validation_gradient(model, tokenizer, pairs, reference_logps, params, beta=beta,
                                       max_length=max_length)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)  # unique per process and call
        from safetensors.torch import save_file

        save_file({n: t.detach().cpu().contiguous() for n, t in direction.items()}, str(tmp))
        tmp.replace(path)
    return direction


def influence_scores(model, tokenizer, pairs, validation_pairs, *, policy_logps: np.ndarray,
                     reference_logps: np.ndarray, validation_reference_logps: np.ndarray, beta: float,
                     max_length: int | None, batch_tokens: int = 8192, method: str = "finite-difference",
                     step: float | None = DEFAULT_STEP, scope: str = "all", last_k: int = 1,
                     run_dir: Path | None = None, identity: dict | None = None, check_pairs: int = 4,
                     executor: RayExecutor | None = None, layout: str = "padded", info: dict | None = None
                     ) -> np.ndarray:
    """IF of every pair of `pairs` (tables with prompt/chosen/rejected) under `model` (the policy θ): ḡ_val over
    `validation_pairs`, then ⟨ḡ_val, g_w − g_l⟩ by `method`, weighted by β(1 − σ(Δ_θ)) from the given log-probs.
    A finite difference is checked against exact gradients on `check_pairs` pairs (a warning when off by > 5%);
    `step=None` chooses its step on those pairs first (`choose_step`). `info`, when given, receives the step taken
    and the errors of the steps tried."""
    params = scope_parameters(model, scope, last_k)
    identity = {**(identity or {}), "scope": scope, "last_k": last_k if scope == "last_k" else None}
    direction = cached_validation_gradient(model, tokenizer, validation_pairs, validation_reference_logps, params,
                                           beta=beta, max_length=max_length, run_dir=run_dir, identity=identity)
    if not all(bool(torch.isfinite(t).all()) for t in direction.values()):
        raise PrefsiftError("the validation gradient ḡ_val is not finite (NaN or inf): every influence would be "
                            "NaN; load the policy in float32 (--dtype float32) or check the validation pairs")
    differencing = method in ("finite-difference", "one-sided")
    exact = None
    if differencing and step is None:
        step, errors, exact = choose_step(model, tokenizer, pairs, direction, params, method=method,
                                          max_length=max_length, batch_tokens=batch_tokens,
                                          n_pairs=check_pairs or 4, layout=layout)
        if info is not None:
            info["step_errors"] = errors
    if info is not None:
        info["step"] = step
    directional = directional_derivatives(model, tokenizer, pairs, direction, params, method=method,
                                          step=DEFAULT_STEP if step is None else step, max_length=max_length,
                                          batch_tokens=batch_tokens, run_dir=run_dir, identity=identity,
                                          executor=executor, policy_logps=policy_logps, layout=layout)
    check_finite(directional, policy_logps, reference_logps, method)
    if differencing and check_pairs:
        check_against_exact(model, tokenizer, pairs, directional, direction, params, max_length=max_length,
                            n_pairs=check_pairs, exact=exact)
    margins = beta * ((policy_logps[:, 0] - reference_logps[:, 0]) - (policy_logps[:, 1] - reference_logps[:, 1]))
    return influence(margins, directional, beta)
