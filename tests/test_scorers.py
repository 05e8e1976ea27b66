"""Each scorer against a hand computation from independent, unpacked log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pairs, make_tiny_llama
from datasets import Dataset

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.models import LoadedModel
from prefsift.scorers import SCORERS, ScoringContext, get_scorer

BETA = 0.2


def naive_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log π(completion | prompt) the textbook way: one unpadded sequence, full logits, sum over the completion."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, full[t]] for t in range(len(prompt_ids), len(full))))


def naive(model, tokenizer, rows) -> np.ndarray:
    return np.array([[naive_logp(model, tokenizer, r["prompt"], r["chosen"]),
                      naive_logp(model, tokenizer, r["prompt"], r["rejected"])] for r in rows])


@pytest.fixture
def setting(bpe_tokenizer):
    rows = make_pairs(40, seed=11)
    models = {role: LoadedModel(make_tiny_llama(bpe_tokenizer, seed=s), bpe_tokenizer, role, role)
              for role, s in (("policy", 1), ("reference", 2), ("validation", 3))}
    context = ScoringContext(pairs=Dataset.from_list([{**r, "pair_id": f"{i:03d}"} for i, r in enumerate(rows)]),
                             models=models, beta=BETA, max_length=None)
    logps = {role: naive(m.model, bpe_tokenizer, rows) for role, m in models.items()}
    return context, logps


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_irm_is_the_implicit_reward_margin(setting):
    context, lp = setting
    expected = BETA * ((lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1]))
    np.testing.assert_allclose(get_scorer("irm").score(context)["irm"], expected, rtol=1e-4, atol=1e-5)


def test_lossdiff_is_the_dpo_loss_difference(setting):
    context, lp = setting
    margin = {r: BETA * ((lp[r][:, 0] - lp["reference"][:, 0]) - (lp[r][:, 1] - lp["reference"][:, 1]))
              for r in ("policy", "validation")}
    expected = -logsigmoid(margin["policy"]) + logsigmoid(margin["validation"])
    np.testing.assert_allclose(get_scorer("lossdiff").score(context)["lossdiff"], expected, rtol=1e-4, atol=1e-5)


def test_lossdiff_irm_keeps_pairs_in_both_middle_bands(setting):
    context, _ = setting
    out = get_scorer("lossdiff-irm").score(context)

    def middle(values):  # 10th-90th percentile by rank, computed by hand
        ranks = np.empty(len(values))
        ranks[np.argsort(values, kind="stable")] = np.arange(len(values)) / (len(values) - 1)
        return (ranks >= 0.1) & (ranks <= 0.9)

    expected = middle(out["lossdiff"]) & middle(out["irm"])
    np.testing.assert_array_equal(out["lossdiff_irm"].astype(bool), expected)
    assert context.seconds.keys() == {"policy", "reference", "validation"}  # each pass ran once


def test_same_policy_and_reference_give_zero_irm(bpe_tokenizer):
    model = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "m", "m")
    context = ScoringContext(pairs=Dataset.from_list([{**r, "pair_id": str(i)} for i, r in
                                                      enumerate(make_pairs(6))]),
                             models={"policy": model, "reference": model}, max_length=None)
    assert np.all(get_scorer("irm").score(context)["irm"] == 0.0)
    assert len(context.seconds) == 1  # one pass for both roles


def test_random_is_per_pair_and_seeded():
    ids = [f"id{i}" for i in range(100)]
    a = get_scorer("random").score(ScoringContext(pairs=Dataset.from_dict({"pair_id": ids}), seed=1))["random"]
    b = get_scorer("random").score(ScoringContext(pairs=Dataset.from_dict({"pair_id": ids[::-1]}), seed=1))
    c = get_scorer("random").score(ScoringContext(pairs=Dataset.from_dict({"pair_id": ids}), seed=2))["random"]
    np.testing.assert_array_equal(a, b["random"][::-1])  # a pair keeps its score whatever the order
    assert not np.allclose(a, c)
    assert 0 <= a.min() and a.max() < 1 and 0.3 < a.mean() < 0.7


def test_margin_from_rating_columns():
    raw = Dataset.from_dict({"score_chosen": [9.0, 7.5], "score_rejected": [2.0, 7.0]})
    out = get_scorer("margin").score(ScoringContext(pairs=Dataset.from_dict({"pair_id": ["a", "b"]}), raw=raw))
    np.testing.assert_allclose(out["margin"], [7.0, 0.5])
    with pytest.raises(PrefsiftError, match="score_chosen and score_rejected"):
        get_scorer("margin").score(ScoringContext(pairs=raw, raw=Dataset.from_dict({"x": [1, 2]})))


def test_margin_from_a_reward_model(bpe_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=bpe_tokenizer.pad_token_id)
    reward = LlamaForSequenceClassification(config).eval()
    rows = make_pairs(7, seed=12)
    context = ScoringContext(pairs=Dataset.from_list([{**r, "pair_id": str(i)} for i, r in enumerate(rows)]),
                             models={"reward_model": LoadedModel(reward, bpe_tokenizer, "rm", "rm")})

    def one(text):  # one unpadded sequence at a time
        with torch.no_grad():
            return reward(torch.tensor([bpe_tokenizer(text)["input_ids"]])).logits[0, 0].item()

    expected = [one(r["prompt"] + r["chosen"]) - one(r["prompt"] + r["rejected"]) for r in rows]
    np.testing.assert_allclose(get_scorer("margin").score(context)["margin"], expected, rtol=1e-4, atol=1e-5)


def test_registry_and_unknown_method():
    assert {"random", "margin", "irm", "lossdiff", "lossdiff-irm"} <= set(SCORERS)
    with pytest.raises(ConfigError, match=r"unknown method 'tif' \(known: irm, lossdiff"):
        get_scorer("tif")


def test_missing_model_role_is_a_clear_error(bpe_tokenizer):
    context = ScoringContext(pairs=Dataset.from_list([{**make_pairs(1)[0], "pair_id": "a"}]), models={})
    with pytest.raises(PrefsiftError, match="needs a policy model"):
        get_scorer("irm").score(context)
