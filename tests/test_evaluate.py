"""Evaluation against independent computations: preference accuracy, greedy answers, the judged win rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama, naive

from prefsift.config import EngineConfig, EvalConfig
from prefsift.evaluate import evaluate, greedy_answers, preference_accuracy, win_rate
from prefsift.models import LoadedModel


@pytest.fixture(scope="module")
def models(bpe_tokenizer):
    return (LoadedModel(make_tiny_llama(bpe_tokenizer, seed=5), bpe_tokenizer, "policy", "p"),
            LoadedModel(make_tiny_llama(bpe_tokenizer, seed=6), bpe_tokenizer, "reference", "r"))


def test_preference_accuracy_counts_ties_half():
    policy = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [np.nan, np.nan]])
    reference = np.zeros((4, 2))
    assert preference_accuracy(policy, reference, beta=0.5) == pytest.approx((1 + 0 + 0.5) / 3)


def test_evaluate_matches_textbook_log_probs(models, bpe_tokenizer):
    policy, reference = models
    rows = make_pairs(12, seed=40)
    record = evaluate(policy, reference, test_pairs=Dataset.from_list(rows), engine=EngineConfig(beta=0.2,
                                                                                                    max_length=None))
    lp, lr = naive(policy.model, bpe_tokenizer, rows), naive(reference.model, bpe_tokenizer, rows)
    margin = 0.2 * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))
    assert record["pref_accuracy"] == pytest.approx(np.mean(margin > 0))
    alone = evaluate(policy, None, test_pairs=Dataset.from_list(rows), engine=EngineConfig(max_length=None))
    assert alone["logp_accuracy"] == pytest.approx(np.mean(lp[:, 0] > lp[:, 1]))


def test_greedy_answers_are_the_argmax_continuation(models, bpe_tokenizer):
    policy, _ = models
    prompts = ["\n\nHuman: the cat\n\nAssistant:", "\n\nHuman: why is the sky blue and not red\n\nAssistant:"]
    answers = greedy_answers(policy.model, bpe_tokenizer, prompts, max_new_tokens=5, batch_size=2)  # left-padded
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = bpe_tokenizer(prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(5):  # one unpadded sequence, one token at a time
                token = int(policy.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == bpe_tokenizer.eos_token_id:
                    break
                new.append(token)
        assert answer == bpe_tokenizer.decode(new, skip_special_tokens=True)


class LengthJudge:
    name = "length"

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


def test_win_rate_counts_wins_ties_and_losses():
    result = win_rate(LengthJudge(), ["p"] * 4, ["aaa", "a", "aa", "aaaa"], ["a", "aa", "aa", "a"])
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.win_rate == pytest.approx(2.5 / 4)


def test_evaluate_win_rate_against_the_reference(models):
    policy, reference = models
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me a joke\n\nAssistant:"]
    record = evaluate(policy, reference, prompts=prompts, judge=LengthJudge(),
                      config=EvalConfig(max_new_tokens=6), engine=EngineConfig())
    ours = greedy_answers(policy.model, policy.tokenizer, prompts, max_new_tokens=6)
    theirs = greedy_answers(reference.model, reference.tokenizer, prompts, max_new_tokens=6)
    wins = sum(len(a) > len(b) for a, b in zip(ours, theirs, strict=True))
    ties = sum(len(a) == len(b) for a, b in zip(ours, theirs, strict=True))
    assert record["wins"] == wins and record["ties"] == ties
    assert record["win_rate"] == pytest.approx((wins + 0.5 * ties) / 2)


def test_what_the_judge_saw_and_each_pair_margin_are_written(models, bpe_tokenizer, tmp_path, capsys):
    import json

    from prefsift.evaluate import write_eval_outputs

    policy, reference = models
    rows = make_pairs(6, seed=41)
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me a joke\n\nAssistant:"]
    test = Dataset.from_list([{"pair_id": f"p{i}", **r} for i, r in enumerate(rows)])
    record = evaluate(policy, reference, test_pairs=test, prompts=prompts, judge=LengthJudge(),
                      config=EvalConfig(max_new_tokens=6, batch_size=1), engine=EngineConfig(beta=0.2,
                                                                                             max_length=None))
    assert "policy answers: 100%" in capsys.readouterr().err  # the judge's generation has a progress bar
    summary = write_eval_outputs(record, tmp_path, pair_ids=test["pair_id"], prompts=prompts)
    assert "answers" not in summary and summary["win_rate"] == record["win_rate"]
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    ours = greedy_answers(policy.model, bpe_tokenizer, prompts, max_new_tokens=6, quiet=True)
    theirs = greedy_answers(reference.model, bpe_tokenizer, prompts, max_new_tokens=6, quiet=True)
    assert [a["prompt"] for a in answers] == prompts
    assert [(a["answer"], a["reference_answer"]) for a in answers] == list(zip(ours, theirs, strict=True))
    assert [(a["score"], a["reference_score"]) for a in answers] == [(len(a), len(b)) for a, b in zip(ours, theirs,
                                                                                                       strict=True)]
    assert [a["outcome"] for a in answers] == [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
                                               for a, b in zip(ours, theirs, strict=True)]
    pairs = [json.loads(x) for x in (tmp_path / "eval_pairs.jsonl").read_text().splitlines()]
    lp, lr = naive(policy.model, bpe_tokenizer, rows), naive(reference.model, bpe_tokenizer, rows)
    margin = 0.2 * ((lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1]))
    assert [p["pair_id"] for p in pairs] == [f"p{i}" for i in range(6)]
    assert [p["margin"] for p in pairs] == pytest.approx(margin.tolist(), abs=1e-4)
    assert [p["correct"] for p in pairs] == [float(m > 0) for m in margin]
    quiet = evaluate(policy, reference, prompts=prompts, judge=LengthJudge(), config=EvalConfig(max_new_tokens=2),
                     quiet=True)
    assert "answers" in quiet and "policy answers" not in capsys.readouterr().err


def test_the_reward_model_judge_shows_a_progress_bar_unless_quiet(bpe_tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from prefsift.evaluate import RewardModelJudge

    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=bpe_tokenizer.pad_token_id))
    loaded = LoadedModel(reward, bpe_tokenizer, "rm", "r")
    prompts, answers = ["a question"] * 5, ["yes", "no", "maybe so", "a", "b c"]
    loud = RewardModelJudge(loaded, 64, batch_size=2).score(prompts, answers)
    err = capsys.readouterr().err
    assert "judge scores" in err and "5/5" in err  # one bar over the five answers, batch by batch
    quiet = RewardModelJudge(loaded, 64, batch_size=2, quiet=True).score(prompts, answers)
    assert "judge scores" not in capsys.readouterr().err
    assert quiet == loud and len(loud) == 5


# --- a NaN is the model's failure, never a dropped pair ------------------------------------------------------------


def _with_nan_row(bpe_tokenizer, rows) -> tuple[LoadedModel, int]:
    """A tiny policy whose embedding row of a token that some (not all) test pairs hold is NaN, and how many hold it."""
    model = make_tiny_llama(bpe_tokenizer, seed=5)
    token = bpe_tokenizer(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"][-1]
    holding = sum(any(token in bpe_tokenizer(r["prompt"] + r[side])["input_ids"] for side in ("chosen", "rejected"))
                  for r in rows)
    assert 0 < holding < len(rows)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    return LoadedModel(model, bpe_tokenizer, "poisoned", "x"), holding


def test_a_nan_log_prob_of_a_pair_that_fits_is_the_models_failure(models, bpe_tokenizer):
    from prefsift.errors import ModelError

    policy, reference = models
    rows = make_pairs(12, seed=40)
    poisoned, holding = _with_nan_row(bpe_tokenizer, rows)
    with pytest.raises(ModelError, match=f"the evaluated model poisoned gave NaN or inf for {holding} of 12 pairs "
                                         "that fit max_length 1024") as caught:
        evaluate(poisoned, reference, test_pairs=Dataset.from_list(rows), engine=EngineConfig())
    assert "prompt fills" not in str(caught.value)
    reference_logps = naive(reference.model, bpe_tokenizer, rows)
    reference_logps[4, 1] = np.nan  # e.g. a reference pass of a broken model handed in by `run`
    with pytest.raises(ModelError, match="the reference model reference gave NaN or inf for 1 of 12 pairs"):
        evaluate(policy, reference, test_pairs=Dataset.from_list(rows), engine=EngineConfig(),
                 reference_logps=reference_logps)


def test_a_pair_whose_prompt_fills_max_length_is_still_dropped(models, bpe_tokenizer):
    policy, reference = models
    rows = make_pairs(12, seed=40)
    lengths = [len(bpe_tokenizer(r["prompt"])["input_ids"]) for r in rows]
    cut = sorted(lengths)[-3]  # the prompts this long or longer fill max_length: TRL drops their pairs
    record = evaluate(policy, reference, test_pairs=Dataset.from_list(rows), engine=EngineConfig(max_length=cut))
    dropped = [i for i, o in enumerate(record["pref_outcomes"]) if o is None]
    assert dropped == [i for i, n in enumerate(lengths) if n >= cut] and dropped


class NaNJudge:
    name = "broken"

    def score(self, prompts, responses):
        return [float("nan") if i == 1 else 1.0 for i in range(len(responses))]


def test_a_judge_that_gives_nan_is_one_line_not_a_loss():
    from prefsift.errors import ModelError

    with pytest.raises(ModelError, match=r"the judge \(broken\) gave NaN or inf for 1 of 3 answers \(e.g. row 2\)"):
        win_rate(NaNJudge(), ["p"] * 3, ["a", "b", "c"], ["d", "e", "f"])
