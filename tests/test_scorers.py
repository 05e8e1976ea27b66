"""Each scorer against a hand computation from independent, unpacked log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BETA, make_pairs, make_tiny_llama, naive, provider, tiny_reward_model

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.models import LoadedModel
from prefsift.scorers import SCORERS, get_scorer


@pytest.fixture(scope="module")
def setting(bpe_tokenizer):
    rows = make_pairs(40, seed=11)
    models = {role: LoadedModel(make_tiny_llama(bpe_tokenizer, seed=s), bpe_tokenizer, role, role)
              for role, s in (("policy", 1), ("reference", 2), ("validation", 3))}
    logps = {role: naive(m.model, bpe_tokenizer, rows) for role, m in models.items()}
    return rows, models, logps


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def loss_difference_by_hand(lp):
    """ℓ(θ; d) − ℓ(θ_val; d) from the independent log-probs: the DPO loss −log σ(β·margin) under each model."""
    margin = {r: BETA * ((lp[r][:, 0] - lp["reference"][:, 0]) - (lp[r][:, 1] - lp["reference"][:, 1]))
              for r in ("policy", "validation")}
    return -logsigmoid(margin["policy"]) + logsigmoid(margin["validation"])


def test_irm_is_the_implicit_reward_margin(setting):
    rows, models, lp = setting
    context = provider(rows, models)
    expected = BETA * ((lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1]))
    np.testing.assert_allclose(get_scorer("irm").score(context)["irm"], expected, rtol=1e-4, atol=1e-5)


def test_lossdiff_is_the_dpo_loss_difference(setting):
    rows, models, lp = setting
    context = provider(rows, models)
    expected = loss_difference_by_hand(lp)
    np.testing.assert_allclose(get_scorer("lossdiff").score(context)["lossdiff"], expected, rtol=1e-4, atol=1e-5)


def test_rho_loss_is_lossdiff_kept_from_the_top(setting):
    """RHO-LOSS's score is the DPO loss difference computed by hand, and its rule keeps the pairs with the largest:
    a budget of k keeps exactly the k largest of the hand-computed values."""
    from prefsift.select import select_indices

    rows, models, lp = setting
    context = provider(rows, models)
    expected = loss_difference_by_hand(lp)
    scorer = get_scorer("rho-loss")
    out = scorer.score(context)
    np.testing.assert_allclose(out["rho_loss"], expected, rtol=1e-4, atol=1e-5)
    rule = scorer.selection_rule()
    assert rule == {"rule": "top", "column": "rho_loss"}
    ids = [f"{i:03d}" for i in range(len(rows))]
    kept = select_indices({"pair_id": ids, **out}, rule.pop("rule"), **rule, count=10)
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-expected, kind="stable")[:10]))


def test_lossdiff_irm_keeps_pairs_in_both_middle_bands(setting):
    rows, models, lp = setting
    context = provider(rows, models)
    out = get_scorer("lossdiff-irm", band_low=0.2, band_high=0.7).score(context)

    def ranks(values):  # rank 0..n-1 of each value from an independent argsort of the hand-computed scores
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        return r / (len(values) - 1)

    irm = BETA * ((lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1]))
    middle = [(ranks(v) >= 0.2) & (ranks(v) <= 0.7) for v in (loss_difference_by_hand(lp), irm)]
    np.testing.assert_array_equal(out["lossdiff_irm"].astype(bool), middle[0] & middle[1])
    assert 0 < out["lossdiff_irm"].sum() < 0.5 * len(rows)  # the bands bite
    assert context.seconds.keys() == {"policy", "reference", "validation"}  # each pass ran once


def test_same_policy_and_reference_give_zero_irm(bpe_tokenizer):
    model = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "m", "m")
    context = provider(make_pairs(6), {"policy": model, "reference": model})
    assert np.all(get_scorer("irm").score(context)["irm"] == 0.0)
    assert context.logps("policy") is context.logps("reference")  # one pass for both roles


def test_random_is_per_pair_and_seeded():
    rows = make_pairs(300, seed=5)
    a = get_scorer("random").score(provider(rows, seed=1))["random"]
    b = get_scorer("random").score(provider(rows[::-1], seed=1))["random"]
    c = get_scorer("random").score(provider(rows, seed=2))["random"]
    np.testing.assert_array_equal(a, b[::-1])  # a pair keeps its score whatever the order
    assert not np.allclose(a, c)
    # uniform on [0, 1): a Kolmogorov-Smirnov distance well inside the 1% critical value (1.63/sqrt(n))
    n = len(a)
    ks = np.max(np.abs(np.sort(a) - np.arange(1, n + 1) / n))
    assert 0 <= a.min() and a.max() < 1 and ks < 1.63 / np.sqrt(n)


def test_margin_from_rating_columns():
    rows = make_pairs(2, seed=3)
    rated = [{**rows[0], "score_chosen": 9.0, "score_rejected": 2.0}, {**rows[1], "score_chosen": 7.5,
                                                                      "score_rejected": 7.0}]
    np.testing.assert_allclose(get_scorer("margin").score(provider(rated))["margin"], [7.0, 0.5])
    with pytest.raises(PrefsiftError, match="score_chosen and score_rejected"):
        get_scorer("margin").score(provider(rows))


def test_margin_from_a_reward_model(bpe_tokenizer):
    reward = tiny_reward_model(bpe_tokenizer)
    rows = make_pairs(7, seed=12)
    context = provider(rows, {"reward_model": LoadedModel(reward, bpe_tokenizer, "rm", "rm")}, max_length=1024)

    def one(text):  # one unpadded sequence at a time
        with torch.no_grad():
            return reward(torch.tensor([bpe_tokenizer(text)["input_ids"]])).logits[0, 0].item()

    from prefsift.engine.reward import reward_text  # the reward model reads the pair through its chat template

    expected = [one(reward_text(bpe_tokenizer, r["prompt"], r["chosen"])) -
                one(reward_text(bpe_tokenizer, r["prompt"], r["rejected"])) for r in rows]
    np.testing.assert_allclose(get_scorer("margin", batch_size=3).score(context)["margin"], expected, rtol=1e-4,
                               atol=1e-5)


def test_registry_and_unknown_method():
    assert {"random", "margin", "irm", "lossdiff", "lossdiff-irm"} <= set(SCORERS)
    with pytest.raises(ConfigError, match=r"unknown method 'nope' \(known: .*irm, .*lossdiff, lossdiff-irm"):
        get_scorer("nope")


@pytest.mark.parametrize(("params", "message"), [
    ({"band_low": 0.9, "band_high": 0.1}, "0 <= low < high <= 1"),
    ({"band_low": -0.1}, "band_low must be >= 0.0"),
    ({"band_high": float("nan")}, "band_high must be a finite number"),
    ({"band_low": True}, "band_low must be a number"),
    ({"band_lo": 0.2}, r"unknown option\(s\) band_lo \(known: band_low, band_high\)"),
])
def test_bad_parameters_are_refused_at_construction(params, message):
    with pytest.raises(ConfigError, match=r"method 'irm': .*" + message):
        get_scorer("irm", **params)


def test_parameters_reach_the_selection_rule():
    assert get_scorer("lossdiff-irm", band_low=0.2, band_high=0.8).selection_rule() == {
        "rule": "intersection", "columns": ["lossdiff", "irm"], "low": 0.2, "high": 0.8}
    assert get_scorer("irm").selection_rule() == {"rule": "band", "column": "irm", "low": 0.1, "high": 0.9}


def test_missing_model_role_is_a_clear_error(bpe_tokenizer):
    context = provider(make_pairs(1))
    with pytest.raises(PrefsiftError, match=r"method 'lossdiff' needs --model \(the policy .*; --validation \(θ_val"):
        context.require(get_scorer("lossdiff").needs, "lossdiff")


@pytest.mark.parametrize("method", ["isa", "density"])
def test_a_nan_embedding_is_the_embedders_failure_not_a_score(method):
    """One NaN (or inf) vector: one line naming the embedder and a pair, never NaN scores left out as non-finite."""
    from datasets import Dataset
    from helpers import TableEmbedder

    from prefsift.data import load_pairs
    from prefsift.engine.embeddings import item_texts
    from prefsift.errors import ModelError
    from prefsift.resources import Resources
    from prefsift.score import score_pairs

    data = load_pairs(Dataset.from_list(make_pairs(12, seed=3)))
    texts = item_texts(data.pairs, "completion")
    rng = np.random.default_rng(0)
    table = {t: rng.normal(size=4) for t in texts["chosen"] + texts["rejected"]}
    table[texts["rejected"][7]] = np.array([0.0, np.nan, 1.0, np.inf])
    embedder = TableEmbedder(table)
    resources = Resources(data, sources={"embedder": embedder}, seed=0)
    with pytest.raises(ModelError, match=f"the embedder table \\(--embedder\\) gave NaN or inf for 1 of 12 pairs "
                                         f"\\(e.g. pair {data.pairs[7]['pair_id']}\\)"):
        score_pairs(data, [get_scorer(method)], resources)
