"""The peer selection rules against hand computations from independent, unpacked log-probs (helpers.naive)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BETA, make_pairs, make_tiny_llama, naive, provider, tiny_reward_model

from prefsift.errors import ConfigError, PrefsiftError
from prefsift.models import LoadedModel
from prefsift.scorers import SCORERS, get_scorer
from prefsift.select import select_indices


@pytest.fixture(scope="module")
def setting(bpe_tokenizer):
    rows = make_pairs(30, seed=21)
    rng = np.random.default_rng(3)
    for row in rows:  # ratings as UltraFeedback gives them: chosen mostly, not always, above rejected
        row["score_chosen"], row["score_rejected"] = float(rng.integers(1, 11)), float(rng.integers(1, 11))
    models = {role: LoadedModel(make_tiny_llama(bpe_tokenizer, seed=s), bpe_tokenizer, role, role)
              for role, s in (("policy", 5), ("reference", 6))}
    lp = {role: naive(m.model, bpe_tokenizer, rows) for role, m in models.items()}
    irm = BETA * ((lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1]))
    return rows, models, irm


def test_small_margin_keeps_the_smallest_signed_margins(setting):
    """The authors' script: the signed gap sorted ascending, a reversed pair first."""
    rows, models, irm = setting
    scorer = get_scorer("small-margin")
    out = scorer.score(provider(rows, models))["small_margin"]
    np.testing.assert_allclose(out, irm, rtol=1e-4, atol=1e-6)
    kept = select_indices({"small_margin": out}, **scorer.selection_rule(), count=7)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(irm)[:7]))


def test_small_margin_absolute_keeps_the_closest_to_a_tie(setting):
    rows, models, irm = setting
    scorer = get_scorer("small-margin", margin="absolute")
    out = scorer.score(provider(rows, models))["small_margin"]
    np.testing.assert_allclose(out, np.abs(irm), rtol=1e-4, atol=1e-6)
    assert (irm < 0).any() and (irm > 0).any()  # both signs occur, so |.| matters
    kept = select_indices({"small_margin": out}, **scorer.selection_rule(), count=7)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(np.abs(irm))[:7]))
    assert set(kept) != set(np.argsort(irm)[:7])  # and it picks other pairs than the signed rule


def test_small_margin_band(setting):
    rows, models, irm = setting
    scorer = get_scorer("small-margin", margin="absolute", band_low=0.1, band_high=0.5)
    out = scorer.score(provider(rows, models))["small_margin"]
    kept = select_indices({"small_margin": out}, **scorer.selection_rule())
    rank = np.empty(len(irm))
    rank[np.argsort(np.abs(irm))] = np.arange(len(irm)) / (len(irm) - 1)
    np.testing.assert_array_equal(kept, np.flatnonzero((rank >= 0.1) & (rank <= 0.5)))
    with pytest.raises(ConfigError, match="band_low=0.2 needs band_high"):
        get_scorer("small-margin", band_low=0.2)
    with pytest.raises(ConfigError, match="0 <= low < high <= 1"):
        get_scorer("small-margin", band_low=0.6, band_high=0.5)
    with pytest.raises(ConfigError, match="margin must be one of signed, absolute"):
        get_scorer("small-margin", margin="abs")


def test_large_margin_keeps_the_largest_signed_margins(setting):
    rows, models, irm = setting
    scorer = get_scorer("large-margin")
    out = scorer.score(provider(rows, models))["large_margin"]
    np.testing.assert_allclose(out, irm, rtol=1e-4, atol=1e-6)
    kept = select_indices({"large_margin": out}, **scorer.selection_rule(), count=5)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-irm)[:5]))


def test_alignment_potential_is_the_authors_z_score_difference(setting):
    rows, models, irm = setting
    rated = np.array([r["score_chosen"] - r["score_rejected"] for r in rows])
    for weight in (1.0, 2.5):
        out = get_scorer("alignment-potential", logp_weight=weight).score(provider(rows, models))
        z_ex = (rated - rated.mean()) / np.sqrt(np.mean((rated - rated.mean()) ** 2))
        implicit = np.abs(irm)
        z_im = (implicit - implicit.mean()) / np.sqrt(np.mean((implicit - implicit.mean()) ** 2))
        np.testing.assert_allclose(out["alignment_potential"], z_ex - weight * z_im, rtol=1e-4, atol=1e-5)


def test_alignment_potential_with_a_reward_model(setting, bpe_tokenizer):
    """The external margin from a sequence-classification reward model, one (prompt, response) at a time; the
    data's rating columns are there too, and the reward model wins."""
    import torch

    from prefsift.engine.reward import reward_text

    rows, models, irm = setting
    reward = tiny_reward_model(bpe_tokenizer)

    def one(prompt, response):  # one unpadded sequence, the text the reward model reads
        ids = bpe_tokenizer(reward_text(bpe_tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return reward(torch.tensor([ids])).logits[0, 0].item()

    external = np.array([one(r["prompt"], r["chosen"]) - one(r["prompt"], r["rejected"]) for r in rows])
    context = provider(rows, {**models, "reward_model": LoadedModel(reward, bpe_tokenizer, "rm", "rm")},
                       max_length=1024)
    out = get_scorer("alignment-potential", batch_size=4).score(context)["alignment_potential"]
    implicit = np.abs(irm)
    expected = (external - external.mean()) / external.std() - (implicit - implicit.mean()) / implicit.std()
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)


def test_alignment_potential_without_spread_in_the_implicit_margin(bpe_tokenizer):
    rows = [{**r, "score_chosen": float(i), "score_rejected": 0.0} for i, r in enumerate(make_pairs(5, seed=2))]
    same = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "m", "m")  # policy = reference: IRM ≡ 0
    out = get_scorer("alignment-potential").score(provider(rows, {"policy": same, "reference": same}))
    np.testing.assert_allclose(out["alignment_potential"], (np.arange(5) - 2) / np.sqrt(2))


def test_alignment_potential_needs_an_external_margin(setting):
    rows, models, _ = setting
    bare = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    with pytest.raises(PrefsiftError, match="method 'alignment-potential' needs a --reward-model or the columns"):
        get_scorer("alignment-potential").score(provider(bare, models))


def test_reward_margin_is_margin_under_its_own_name():
    rows = make_pairs(3, seed=4)
    rated = [{**r, "score_chosen": c, "score_rejected": w} for r, c, w in zip(rows, (9.0, 3.0, 5.5), (2.0, 4.0, 5.0),
                                                                              strict=True)]
    scorer = get_scorer("reward-margin")
    np.testing.assert_allclose(scorer.score(provider(rated))["reward_margin"], [7.0, -1.0, 0.5])
    assert scorer.selection_rule() == {"rule": "top", "column": "reward_margin"}
    with pytest.raises(PrefsiftError, match="method 'reward-margin' needs a --reward-model"):
        scorer.score(provider(rows))


def test_peer_rules_are_listed_by_prefsift_methods():
    from typer.testing import CliRunner

    from prefsift.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    for name in ("small-margin", "large-margin", "alignment-potential", "reward-margin"):
        assert name in SCORERS
        assert f"{name}: needs" in result.output


def test_selective_is_the_held_out_dpo_loss_of_cross_fitted_models(bpe_tokenizer, monkeypatch, one_thread):
    """Each pair's score is the mean over seeds of its DPO loss under the model trained on the other fold(s),
    recomputed here from those models with the unpacked textbook log-probs."""
    import copy

    import prefsift.train as train_module

    rows = make_pairs(12, seed=23)
    sft = LoadedModel(make_tiny_llama(bpe_tokenizer, seed=7), bpe_tokenizer, "sft", "sft")
    trainings = []  # (pair_ids trained on, a copy of the trained model)
    real_train = train_module.train

    def spy(loaded, pairs, config, engine, **kwargs):
        result = real_train(loaded, pairs, config, engine, **kwargs)
        trainings.append((set(pairs["pair_id"]), copy.deepcopy(result.model)))
        return result

    monkeypatch.setattr(train_module, "train", spy)
    scorer = get_scorer("selective", folds=2, seeds=2, learning_rate=5e-3, batch_size=3)
    context = provider(rows, {"reference": sft}, max_length=64)
    out = scorer.score(context)["selective"]

    ids = list(context.pairs.pairs["pair_id"])
    ref = naive(sft.model, bpe_tokenizer, rows)
    assert len(trainings) == 4  # 2 folds × 2 seeds
    expected = np.zeros(len(rows))
    for seed in range(2):
        seen = [trainings[2 * seed + k][0] for k in range(2)]
        assert seen[0].isdisjoint(seen[1]) and len(seen[0]) == len(seen[1]) == 6  # two halves
        for trained_on, model in trainings[2 * seed: 2 * seed + 2]:
            held = [i for i, pid in enumerate(ids) if pid not in trained_on]
            lp = naive(model, bpe_tokenizer, [rows[i] for i in held])
            margin = BETA * ((lp[:, 0] - ref[held, 0]) - (lp[:, 1] - ref[held, 1]))
            expected[held] += np.logaddexp(0, -margin) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected - np.log(2)).max() > 1e-2  # the cross-fitting models moved off the reference
    assert scorer.selection_rule() == {"rule": "bottom", "column": "selective"}
    # a seed: 2 trainings on 6 pairs at 3 passes a pair (36) and one pass over the 12 held-out pairs: 48; 2 seeds
    assert scorer.compute_passes(12, 0) == 96


def test_selective_needs_as_many_pairs_as_folds(bpe_tokenizer):
    sft = LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "sft", "sft")
    with pytest.raises(PrefsiftError, match="folds=3 parts: it needs at least that many pairs"):
        get_scorer("selective", folds=3).score(provider(make_pairs(2), {"reference": sft}))
