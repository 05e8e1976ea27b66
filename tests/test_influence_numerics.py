"""Influence that stays finite: forward-mode AD on a deep model whose pad token embeds to zero (the GPU's NaN on the
0.6B shape, reproduced on a CPU), and a pass that stops with one line rather than write a NaN influence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import invoke, make_pairs, saved_tiny_llama, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from prefsift.engine import influence as inf
from prefsift.engine.logps import compute_logps
from prefsift.errors import PrefsiftError

pytestmark = pytest.mark.usefixtures("one_thread")


def deep_tied_model(tokenizer, layers: int = 28) -> LlamaForCausalLM:
    """The 0.6B shape's traits at toy width: 28 layers, a tied head, grouped-query attention, heads × head_dim ≠
    hidden, and `padding_idx` (the pad token's embedding row zero, as every Llama built by transformers has it)."""
    torch.manual_seed(0)
    # At a zero hidden state each layer multiplies the tangent by about (0.02·√hidden)²/√eps (the attention's value
    # and output projections after a norm): 51 at hidden 128, so 28 layers overflow fp32 (≈ 2e47 > 3e38); hidden 32
    # would not (13 a layer).
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def test_jvp_on_a_deep_model_with_a_zero_pad_embedding_matches_per_example_gradients(bpe_tokenizer):
    """Padding positions attend only to themselves in the packed rows: fed the zero-embedded pad token, their hidden
    state stayed zero, each RMSNorm multiplied their tangent by 1/sqrt(eps), fp32 overflowed by layer 14 and the
    masked attention's 0 × inf made 6 of 8 pairs NaN. Pairs of unequal lengths, so every batch pads."""
    model = deep_tied_model(bpe_tokenizer)
    assert float(model.get_input_embeddings().weight[bpe_tokenizer.pad_token_id].abs().max()) == 0.0  # the premise
    pairs = Dataset.from_list(make_pairs(8, seed=31))
    params = inf.scope_parameters(model, "all")
    torch.manual_seed(1)
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in direction.values())))
    direction = {n: t / norm for n, t in direction.items()}
    jvp = inf.forward_ad(model, bpe_tokenizer, pairs, direction, params, max_length=None, batch_tokens=4096)
    exact = inf.per_example(model, bpe_tokenizer, pairs, direction, params, max_length=None)
    assert np.isfinite(jvp).all()
    # forward-mode AD is exact up to fp32 rounding (measured 4e-7 of the largest value at this depth)
    np.testing.assert_allclose(jvp, exact, atol=1e-4 * np.abs(exact).max(), rtol=0)


def test_a_non_finite_influence_stops_with_the_method_to_use(bpe_tokenizer, monkeypatch):
    """Should a method still fail on some model, no NaN influence reaches a scores file: one line naming the method
    to use instead. A pair TRL drops (its prompt fills max_length) stays NaN without stopping anything."""
    model = deep_tied_model(bpe_tokenizer, layers=2)
    train = Dataset.from_list(make_pairs(6, seed=32))
    val = Dataset.from_list(make_pairs(3, seed=33))
    policy = compute_logps(model, bpe_tokenizer, train, max_length=None)
    kwargs = {"policy_logps": policy, "reference_logps": policy - 0.1,
              "validation_reference_logps": compute_logps(model, bpe_tokenizer, val, max_length=None) - 0.1,
              "beta": 0.1, "max_length": None, "method": "jvp"}
    real = inf.forward_ad

    def one_nan(*args, **kw):
        out = real(*args, **kw)
        out[2] = np.nan
        return out

    monkeypatch.setattr(inf, "forward_ad", one_nan)
    with pytest.raises(PrefsiftError, match=r"not finite for 1 of 6 pairs .*--param method=finite-difference"):
        inf.influence_scores(model, bpe_tokenizer, train, val, **kwargs)
    dropped = policy.copy()
    dropped[2] = np.nan  # that pair is one TRL drops: its NaN is the drop, not a failure
    scores = inf.influence_scores(model, bpe_tokenizer, train, val, **{**kwargs, "policy_logps": dropped})
    assert np.isnan(scores[2]) and np.isfinite(np.delete(scores, 2)).all()


def test_the_cli_writes_no_scores_file_when_influence_is_not_finite(bpe_tokenizer, tmp_path, monkeypatch):
    model = saved_tiny_llama(tmp_path / "model", bpe_tokenizer)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=34))
    real = inf.forward_ad
    monkeypatch.setattr(inf, "forward_ad", lambda *a, **k: real(*a, **k) * np.nan)
    out = tmp_path / "scores"
    result = invoke("score", "--data", data, "--method", "if", "--model", model, "--validation-data", data,
                    "--param", "method=jvp", "--max-length", 64, "--out", out)
    assert result.exit_code == 2, result.output
    assert "error: influence by jvp is not finite for 8 of 8 pairs" in result.output
    assert "--param method=finite-difference" in result.output
    assert not (out / "scores.parquet").exists()


def test_one_sided_and_central_share_the_plus_pass(bpe_tokenizer, tmp_path, monkeypatch):
    """The one-sided difference runs the +ε pass only, against the policy's own pass; its +ε shards are the central
    difference's, so switching methods on the same run computes only the −ε pass."""
    from helpers import make_tiny_llama

    import prefsift.engine.paths as paths

    model = make_tiny_llama(bpe_tokenizer, seed=7)
    train = Dataset.from_list(make_pairs(12, seed=35))
    val = Dataset.from_list(make_pairs(4, seed=36))
    policy = compute_logps(model, bpe_tokenizer, train, max_length=None, batch_tokens=96)
    kwargs = {"policy_logps": policy, "reference_logps": policy - 0.1,
              "validation_reference_logps": compute_logps(model, bpe_tokenizer, val, max_length=None) - 0.1,
              "beta": 0.1, "max_length": None, "batch_tokens": 96, "identity": {"data": "t"}, "check_pairs": 0,
              "run_dir": tmp_path}
    real, calls = paths.forward_batch, []
    monkeypatch.setattr(paths, "forward_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    n_batches = len(paths.BatchPlan.of(inf._tokenize(bpe_tokenizer, train, None), 96).batches)
    one_sided = inf.influence_scores(model, bpe_tokenizer, train, val, method="one-sided", **kwargs)
    # the +ε pass, and the policy's smallest batch once more (its rounding checked): the unperturbed side is given
    assert len(calls) == n_batches + 1
    calls.clear()
    central = inf.influence_scores(model, bpe_tokenizer, train, val, method="finite-difference", **kwargs)
    assert len(calls) == n_batches  # the −ε pass only: the +ε shards were the one-sided run's
    scale = np.abs(central).max()
    assert np.abs(one_sided - central).max() <= 2e-2 * scale and np.isfinite(one_sided).all()


def _influence_setup(tokenizer, seed: int = 7):
    from helpers import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=seed)
    train = Dataset.from_list(make_pairs(12, seed=35))
    val = Dataset.from_list(make_pairs(4, seed=36))
    policy = compute_logps(model, tokenizer, train, max_length=None, batch_tokens=96)
    kwargs = {"policy_logps": policy, "reference_logps": policy - 0.1,
              "validation_reference_logps": compute_logps(model, tokenizer, val, max_length=None) - 0.1,
              "beta": 0.1, "max_length": None, "batch_tokens": 96}
    return model, train, val, kwargs


def test_the_adaptive_step_is_the_best_one_tried_on_the_check_pairs(bpe_tokenizer):
    """step=None: the difference's step is chosen on the 4 check pairs against their per-example gradients (a walk
    over decades from the default, in the better direction, stopping where the error grows); the chosen step's
    error is the least of those tried, and the influence then agrees with per-example gradients on every pair."""
    model, train, val, kwargs = _influence_setup(bpe_tokenizer)
    for method in ("one-sided", "finite-difference"):
        info: dict = {}
        scores = inf.influence_scores(model, bpe_tokenizer, train, val, method=method, step=None, info=info, **kwargs)
        errors = info["step_errors"]
        assert len(errors) >= 3 and info["step"] in inf.STEPS
        assert errors[info["step"]] == min(errors.values())
        tried = sorted(errors, reverse=True)  # a run of neighbouring decades, the default among them
        assert inf.DEFAULT_STEP in tried and all(inf.STEPS.index(b) == inf.STEPS.index(a) + 1
                                                 for a, b in zip(tried, tried[1:], strict=False))
        # the independent reference: per-example gradients on every pair, weighted as the formula says
        params = inf.scope_parameters(model, "all")
        direction, _ = inf.validation_gradient(model, bpe_tokenizer, val, kwargs["validation_reference_logps"],
                                               params, beta=0.1, max_length=None)
        exact = inf.per_example(model, bpe_tokenizer, train, direction, params, max_length=None)
        policy, reference = kwargs["policy_logps"], kwargs["reference_logps"]
        margins = 0.1 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
        expected = inf.influence(margins, exact, 0.1)
        assert np.abs(scores - expected).max() <= 0.02 * np.abs(expected).max()


def test_a_policy_pass_rounded_elsewhere_is_recomputed_for_the_one_sided_difference(bpe_tokenizer):
    """A one-sided difference needs the policy's pass rounded as its +ε pass (same batches, path, threads). One that
    was not (here: moved by 1e-9 nats, as another thread count moves it) is found on one batch and recomputed with a
    warning, giving the values the matching pass gives; a matching pass passes silently."""
    import warnings

    model, train, val, kwargs = _influence_setup(bpe_tokenizer)
    kwargs = {**kwargs, "check_pairs": 0}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*round differently")
        right = inf.influence_scores(model, bpe_tokenizer, train, val, method="one-sided", **kwargs)
    with pytest.warns(UserWarning, match="round differently here"):
        mended = inf.influence_scores(model, bpe_tokenizer, train, val, method="one-sided",
                                      **{**kwargs, "policy_logps": kwargs["policy_logps"] + 1e-9})
    # the weights β(1 − σ(Δ)) still read the log-probs given (1e-9 apart); the differences are the matching ones
    np.testing.assert_allclose(mended, right, rtol=1e-7, atol=0)


def test_the_validation_gradient_shows_a_bar(bpe_tokenizer, monkeypatch):
    """The backward over the validation pairs (minutes on a CPU) advances a bar to every pair, as the exact check's
    per-example gradients do."""
    bars = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.done = total, desc, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(inf, "progress_bar", Bar)
    model, train, val, kwargs = _influence_setup(bpe_tokenizer)
    params = inf.scope_parameters(model, "last_k", 1)
    direction, _ = inf.validation_gradient(model, bpe_tokenizer, val, kwargs["validation_reference_logps"], params,
                                           beta=0.1, max_length=None, batch_tokens=64)
    inf.per_example(model, bpe_tokenizer, train.select(range(3)), direction, params, max_length=None)
    assert [(b.desc, b.total, b.done) for b in bars] == [("validation gradient", 4, 4), ("exact gradients", 3, 3)]
