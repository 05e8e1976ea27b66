"""Exact influence: the fast paths against the per-example-gradient reference on tiny models, the validation
gradient against per-pair gradients summed by hand, the scorers' rules, resume, and the proxy analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama
from scipy.stats import pearsonr, spearmanr

import prefsift.engine.paths as paths
from prefsift.analyze import analyze, overlap_coefficient, render_markdown, write_scatter
from prefsift.engine import influence as inf
from prefsift.engine.logps import compute_logps
from prefsift.errors import ConfigError

BETA = 0.1
# Finite differences at the default step against per-example gradients, largest error over the largest |value|:
# measured 1e-4 to 4e-3 on these models (bench/results/influence.txt has SmolLM2's); the bound leaves room.
FD_TOLERANCE = 2e-2
JVP_TOLERANCE = 1e-4  # forward-mode AD is exact up to fp32 rounding (measured ~2e-7)


def table(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{**r, "pair_id": f"{i:03d}"} for i, r in enumerate(rows)])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data():
    return table(make_pairs(40, seed=21)), table(make_pairs(8, seed=22))


def model_with_scope(tokenizer, seed: int, scope: str):
    model = make_tiny_llama(tokenizer, seed=seed)
    if scope == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # both LoRA factors random: B = 0 would make A's gradient vanish
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


def reference_logps(tokenizer, pairs, seed: int = 99) -> np.ndarray:
    return compute_logps(make_tiny_llama(tokenizer, seed=seed), tokenizer, pairs, max_length=None)


@pytest.fixture(scope="module")
def cases(bpe_tokenizer, data):
    """(model, params, ḡ_val, per-example reference) for three seeds and the three scopes."""
    train, val = data
    val_ref = reference_logps(bpe_tokenizer, val)
    out = {}
    for seed in (0, 1, 2):
        for scope in inf.SCOPES:
            model = model_with_scope(bpe_tokenizer, seed, scope)
            params = inf.scope_parameters(model, scope, last_k=1)
            direction, _ = inf.validation_gradient(model, bpe_tokenizer, val, val_ref, params, beta=BETA,
                                                   max_length=None)
            reference = inf.per_example(model, bpe_tokenizer, train, direction, params, max_length=None)
            out[seed, scope] = (model, params, direction, reference)
    return out


def test_differentiable_forward_is_the_engine(bpe_tokenizer, data):
    train, _ = data
    model = make_tiny_llama(bpe_tokenizer, seed=3)
    tokenized = inf._tokenize(bpe_tokenizer, train, None)
    with torch.no_grad():
        chosen, rejected = inf.pair_logps(model, tokenized, bpe_tokenizer.pad_token_id)
    engine = compute_logps(model, bpe_tokenizer, train, max_length=None)
    np.testing.assert_allclose(np.stack([chosen.numpy(), rejected.numpy()], 1), engine, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["packed", "two rows"])
def test_validation_gradient_is_the_weighted_mean_of_pair_gradients(bpe_tokenizer, data, layout, monkeypatch):
    """ḡ_val from one accumulated pass equals Σ (1 − σ(Δ_i)) (g_w^i − g_l^i) / |V| built pair by pair with .backward,
    on the engine's packed rows and on TRL's two rows a pair (where the packed check fails)."""
    _, val = data
    if layout == "two rows":
        monkeypatch.setattr(inf, "packed_path_ok", lambda *args: False)
        monkeypatch.setattr(inf, "packed_logps", lambda *args: pytest.fail("packed rows used"))
    model = make_tiny_llama(bpe_tokenizer, seed=4)
    ref = reference_logps(bpe_tokenizer, val)
    params = inf.scope_parameters(model, "all")
    direction, margins = inf.validation_gradient(model, bpe_tokenizer, val, ref, params, beta=BETA, max_length=None,
                                                 batch_tokens=64)  # several batches: the accumulation is tested
    policy = compute_logps(model, bpe_tokenizer, val, max_length=None)
    expected_margins = BETA * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    np.testing.assert_allclose(margins, expected_margins, atol=1e-5)
    model.zero_grad()
    for i, row in enumerate(val):
        full = [bpe_tokenizer(row["prompt"] + c + bpe_tokenizer.eos_token)["input_ids"]
                for c in (row["chosen"], row["rejected"])]
        n_prompt = len(bpe_tokenizer(row["prompt"])["input_ids"])
        sides = [model(torch.tensor([ids])).logits[0].log_softmax(-1)[torch.arange(n_prompt - 1, len(ids) - 1),
                                                                       ids[n_prompt:]].sum() for ids in full]
        weight = (1 - 1 / (1 + np.exp(-expected_margins[i]))) / len(val)
        (weight * (sides[0] - sides[1])).backward()
    for name, p in params.items():
        torch.testing.assert_close(direction[name], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope", inf.SCOPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_paths_match_per_example_gradients(bpe_tokenizer, data, cases, seed, scope):
    train, _ = data
    model, params, direction, reference = cases[seed, scope]
    assert np.abs(reference).max() > 0
    scale = np.abs(reference).max()
    saved = {n: p.detach().clone() for n, p in params.items()}
    fd = inf.finite_difference(model, bpe_tokenizer, train, direction, params, max_length=None)
    assert all(torch.equal(p, saved[n]) for n, p in params.items())  # weights restored bit for bit
    assert spearmanr(fd, reference)[0] >= 0.999
    assert np.abs(fd - reference).max() <= FD_TOLERANCE * scale
    # one-sided: the +ε pass against the policy's own pass at the same engine settings (same batches, same paths)
    base = compute_logps(model, bpe_tokenizer, train, max_length=None)
    one_sided = inf.finite_difference(model, bpe_tokenizer, train, direction, params, max_length=None, base_logps=base)
    assert all(torch.equal(p, saved[n]) for n, p in params.items())
    # its error is about twice the central one's (an O(ε) term and one pass's rounding over ε, not 2ε): measured
    # ≤ 9e-3 of the largest value over these nine models. Ranks of 40 near-equal values on a random tiny model move
    # with such errors: 0.9988 at worst measured (the central difference: 0.9990).
    assert spearmanr(one_sided, reference)[0] >= 0.998
    assert np.abs(one_sided - reference).max() <= FD_TOLERANCE * scale
    jvp = inf.forward_ad(model, bpe_tokenizer, train, direction, params, max_length=None)
    assert spearmanr(jvp, reference)[0] >= 0.999
    assert np.abs(jvp - reference).max() <= JVP_TOLERANCE * scale


def test_forward_ad_runs_on_the_packed_engine_and_without_it(bpe_tokenizer, data, cases, monkeypatch):
    """Forward-mode AD goes through the engine's packed rows where the packed path is verified, TRL's two rows a pair
    where it is not; both are exact."""
    train, _ = data
    model, params, direction, reference = cases[1, "lora"]
    scale = np.abs(reference).max()
    packed_pairs: list[int] = []
    original = inf.packed_logps
    monkeypatch.setattr(inf, "packed_logps",
                        lambda m, batch: (packed_pairs.append(batch.n_pairs), original(m, batch))[1])
    packed = inf.forward_ad(model, bpe_tokenizer, train, direction, params, max_length=None, batch_tokens=256)
    assert sum(packed_pairs) == len(train)  # every pair, over several batches
    monkeypatch.setattr(inf, "LONG_PAIR_TOKENS", 40)  # batches holding a longer pair keep TRL's rows
    packed_pairs.clear()
    mixed = inf.forward_ad(model, bpe_tokenizer, train, direction, params, max_length=None, batch_tokens=256)
    long_pairs = sum(len(t) > 40 for t in inf._tokenize(bpe_tokenizer, train, None))
    assert 0 < long_pairs and 0 < sum(packed_pairs) <= len(train) - long_pairs
    monkeypatch.setattr(inf, "packed_path_ok", lambda *args: False)
    packed_pairs.clear()
    unpacked = inf.forward_ad(model, bpe_tokenizer, train, direction, params, max_length=None, batch_tokens=256)
    assert not packed_pairs
    for values in (packed, mixed, unpacked):
        assert np.abs(values - reference).max() <= JVP_TOLERANCE * scale


def test_a_bad_step_is_caught_against_exact_gradients(bpe_tokenizer, data, cases):
    train, _ = data
    model, params, direction, reference = cases[0, "all"]
    kw = {"max_length": None, "n_pairs": 4}
    coarse = inf.finite_difference(model, bpe_tokenizer, train, direction, params, step=0.1, max_length=None)
    with pytest.warns(UserWarning, match="off exact gradients"):
        error = inf.check_against_exact(model, bpe_tokenizer, train, coarse, direction, params, **kw)
    assert error == pytest.approx(np.abs(coarse[:4] - reference[:4]).max() / np.abs(reference[:4]).max(), rel=1e-4)
    assert inf.check_against_exact(model, bpe_tokenizer, train, reference, direction, params, **kw) < 1e-6


def test_scopes(bpe_tokenizer):
    model = make_tiny_llama(bpe_tokenizer)
    last = inf.scope_parameters(model, "last_k", last_k=1)
    assert last and all(name.startswith("model.layers.1.") for name in last)
    assert len(inf.scope_parameters(model, "last_k", last_k=2)) == 2 * len(last)
    assert set(inf.scope_parameters(model, "all")) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ConfigError, match="LoRA"):
        inf.scope_parameters(model, "lora")
    with pytest.raises(ConfigError, match="last_k"):
        inf.scope_parameters(model, "last_k", last_k=3)


def test_influence_weights_the_directional_derivative():
    margins, directional = np.array([0.0, 2.0, -1.0]), np.array([1.0, -3.0, 0.5])
    expected = BETA * np.array([0.5, 1 - 1 / (1 + np.exp(-2.0)), 1 - 1 / (1 + np.exp(1.0))]) * directional
    np.testing.assert_allclose(inf.influence(margins, directional, BETA), expected)


def _influence_resources(tokenizer, data, out_dir):
    """The policy (seed 5), the reference (seed 99) and a Resources over the training pairs with both and the
    validation pairs: what the influence scorers read."""
    from prefsift.config import EngineConfig
    from prefsift.data import load_pairs
    from prefsift.models import LoadedModel
    from prefsift.resources import Resources

    train, val = data
    policy = LoadedModel(make_tiny_llama(tokenizer, seed=5), tokenizer, "policy", "policy")
    reference = LoadedModel(make_tiny_llama(tokenizer, seed=99), tokenizer, "reference", "reference")
    resources = Resources(pairs=load_pairs(train), engine=EngineConfig(beta=BETA, max_length=None, dtype="float32"),
                          sources={"policy": policy, "reference": reference, "validation_pairs": load_pairs(val)},
                          out_dir=out_dir)
    return policy, reference, resources


def test_scorers_compute_influence_and_keep_their_band(bpe_tokenizer, data, tmp_path):
    from prefsift.scorers import get_scorer
    from prefsift.select import select_indices

    train, val = data
    policy, reference, resources = _influence_resources(bpe_tokenizer, data, tmp_path)
    got = get_scorer("if", method="jvp").score(resources)["influence"]
    # by hand: ḡ_val, per-example gradients, the DPO weight from independent log-prob passes
    params = inf.scope_parameters(policy.model, "all")
    direction, _ = inf.validation_gradient(policy.model, bpe_tokenizer, val, reference_logps(bpe_tokenizer, val),
                                           params, beta=BETA, max_length=None)
    dot = inf.per_example(policy.model, bpe_tokenizer, train, direction, params, max_length=None)
    lp, ref = (compute_logps(m.model, bpe_tokenizer, train, max_length=None) for m in (policy, reference))
    margin = BETA * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
    np.testing.assert_allclose(got, BETA / (1 + np.exp(margin)) * dot, rtol=1e-3, atol=1e-4 * np.abs(got).max())

    tif = get_scorer("tif", band_low=0.25, band_high=0.75)
    assert get_scorer("if").selection_rule() == {"rule": "top", "column": "influence"}
    rule = tif.selection_rule()
    assert rule == {"rule": "band", "column": "influence", "low": 0.25, "high": 0.75}
    kept = select_indices({"influence": got, "pair_id": list(train["pair_id"])}, **rule)
    ranks = np.empty(len(got))
    ranks[np.argsort(got)] = np.arange(len(got)) / (len(got) - 1)
    np.testing.assert_array_equal(kept, np.flatnonzero((ranks >= 0.25) & (ranks <= 0.75)))


def kill_and_resume(tokenizer, data, tmp_path, monkeypatch, threads: tuple = (None, None, None)) -> dict:
    """An influence run killed during its minus pass, then rerun on the same run directory, beside an uninterrupted
    run; `threads`: torch's thread count of the clean, the killed and the resumed run (None: as it is). Returns both
    runs' scores, the batches the resumed run computed, the plan's batch count, and whether the kill left the
    weights as they were."""
    train, val = data
    model = make_tiny_llama(tokenizer, seed=6)
    logps = compute_logps(model, tokenizer, train, max_length=None)
    kwargs = {"policy_logps": logps, "reference_logps": reference_logps(tokenizer, train),
              "validation_reference_logps": reference_logps(tokenizer, val), "beta": BETA, "max_length": None,
              "batch_tokens": 96, "identity": {"data": "t"}}
    n_batches = len(paths.BatchPlan.of(inf._tokenize(tokenizer, train, None), 96).batches)
    real, calls = paths.forward_batch, []

    def counting(*args, fail_at: int | None = None, **kw):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    def run(where: str, n_threads: int | None):
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        return inf.influence_scores(model, tokenizer, train, val, run_dir=tmp_path / where, **kwargs)

    before = torch.get_num_threads()
    try:
        clean = run("clean", threads[0])
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        monkeypatch.setattr(paths, "forward_batch", lambda *a, **k: counting(*a, fail_at=n_batches + 2, **k))
        with pytest.raises(KeyboardInterrupt):  # killed during the minus pass, the plus pass on disk
            run("resumed", threads[1])
        restored = all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
        calls.clear()
        monkeypatch.setattr(paths, "forward_batch", counting)
        resumed = run("resumed", threads[2])
    finally:
        torch.set_num_threads(before)
    return {"clean": clean, "resumed": resumed, "computed": len(calls), "n_batches": n_batches,
            "restored": restored}


def test_interrupted_run_resumes_to_identical_scores(bpe_tokenizer, data, tmp_path, monkeypatch):
    run = kill_and_resume(bpe_tokenizer, data, tmp_path, monkeypatch)
    assert run["restored"]  # the weights restored despite the kill
    assert run["computed"] == run["n_batches"]  # the plus pass came from its shards, the direction from disk
    np.testing.assert_array_equal(run["resumed"], run["clean"])


def test_analysis_of_perfectly_tracking_proxies():
    rng = np.random.default_rng(0)
    influence = rng.normal(size=300)
    scores = {"influence": influence, "lossdiff": 3 * influence + 1, "irm": np.exp(influence),
              "pair_id": [f"{i:04d}" for i in range(300)]}
    result = analyze(scores)
    assert result["correlations"]["lossdiff"]["pearson"] == pytest.approx(1.0)
    assert result["correlations"]["irm"]["spearman"] == pytest.approx(1.0)  # monotone: ranks agree ...
    assert result["correlations"]["irm"]["pearson"] == pytest.approx(pearsonr(np.exp(influence), influence)[0])
    assert result["correlations"]["irm"]["pearson"] < 0.95  # ... values do not
    assert all(o["overlap"] == 1.0 for o in result["overlaps"].values())
    assert result["overlaps"]["lossdiff-irm"]["paper"] == [0.73, 0.78]


def test_analysis_overlap_known_answer(tmp_path):
    """Influence 0..99; LossDiff shifted by 25 (mod 100): at a 50% budget the TIF band is pairs 25-74, the LossDiff
    band pairs 0-49, so they share 25 of 50."""
    i = np.arange(100, dtype=float)
    scores = {"influence": i, "lossdiff": (i + 25) % 100, "pair_id": [f"{k:03d}" for k in range(100)]}
    result = analyze(scores, fraction=0.5)
    assert result["budget"]["count"] == 50
    assert result["overlaps"]["lossdiff"]["overlap"] == 0.5
    assert result["overlaps"]["lossdiff"]["chance"] == 0.5
    assert result["correlations"]["lossdiff"]["spearman"] == pytest.approx(spearmanr(scores["lossdiff"], i)[0])
    assert overlap_coefficient([1, 2, 3, 4], [3, 4]) == 1.0
    assert "| lossdiff | " in render_markdown(result)
    assert write_scatter(scores, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resume_under_another_thread_count_keeps_the_finished_shards(bpe_tokenizer, data, tmp_path, monkeypatch):
    """A run killed on a busy machine (2 threads) and resumed on a quiet one (1 thread) recomputes only its missing
    batches and gives the uninterrupted run's scores: the shards are named by the direction's bytes and the step,
    never by ε, a float whose last bits follow a norm's reduction order, i.e. the thread count (this recomputed
    every batch once, on a loaded CI machine)."""
    run = kill_and_resume(bpe_tokenizer, data, tmp_path, monkeypatch, threads=(1, 2, 1))
    clean, resumed = run["clean"], run["resumed"]
    assert run["computed"] == run["n_batches"]  # the minus pass only: the plus shards and the direction reused
    # the reused ḡ_val and plus pass ran at 2 threads, the clean run at 1: equal to rounding (bit-equal here, where a
    # tiny model's matmuls stay below torch's parallel grain; a BLAS that splits them could differ in the last bits)
    np.testing.assert_allclose(resumed, clean, rtol=1e-6, atol=1e-9 * np.abs(clean[np.isfinite(clean)]).max())


def test_the_step_an_influence_score_took_is_recorded(bpe_tokenizer, data, tmp_path):
    """With `step` unset the step is chosen on the check pairs; the scorer's description (what the score manifest
    records) says which step it took and the errors it was chosen on, so a rerun can reproduce it."""
    from prefsift.engine.influence import DEFAULT_STEP
    from prefsift.scorers import get_scorer

    *_, resources = _influence_resources(bpe_tokenizer, data, tmp_path)
    scorer = get_scorer("if", method="one-sided")
    assert scorer.params.step is None
    scorer.score(resources)
    described = scorer.describe()
    errors = {float(step): error for step, error in described["step_errors"].items()}
    assert described["params"]["step"] is None and DEFAULT_STEP in errors
    assert described["step_taken"] == min(errors, key=errors.get)  # the step with the smallest check error
