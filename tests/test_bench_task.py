"""The embedded benchmark: tiny tokenizer/model round trips, task determinism, oracle, corruption rates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefsift.errors import ConfigError
from prefsift.synthetic.task import (
    HIDDEN_COLUMNS,
    OracleJudge,
    TaskConfig,
    answer,
    make_response,
    make_task,
    parse_prompt,
)
from prefsift.synthetic.tiny import (
    build_char_tokenizer,
    build_tiny_llama,
    completion_loss,
    greedy_answers,
    sft_train,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def task():
    return make_task(
        TaskConfig(seed=3, n_train=1000, n_validation=50, n_test=50, n_eval_prompts=30, n_sft=200)
    )


def test_char_tokenizer_one_id_per_char_and_round_trip(tokenizer, tmp_path):
    text = "rev:abc=cba\nHello, World! ~{}"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no BOS/EOS added
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == text

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    messages = [{"role": "user", "content": "hi"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>hi\n<|assistant|>"


def test_char_tokenizer_custom_alphabet():
    tokenizer = build_char_tokenizer("abc")
    assert len(tokenizer) == 4 + 3
    assert tokenizer("cab")["input_ids"] == [6, 4, 5]
    assert tokenizer("z")["input_ids"] == [tokenizer.unk_token_id]


def test_tiny_llama_save_load_same_logits(tokenizer, tmp_path):
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    ids = torch.tensor([tokenizer("srt:cab=abc")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # Same seed, same weights: the benchmark's runs depend on it.
    again = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_make_task_is_deterministic_and_seeded():
    config = TaskConfig(seed=5, n_train=200, n_validation=20, n_test=20, n_eval_prompts=20, n_sft=50)
    first, second = make_task(config), make_task(dataclasses.replace(config))
    assert first.train == second.train
    assert first.validation == second.validation and first.test == second.test
    assert first.eval_prompts == second.eval_prompts and first.sft_examples == second.sft_examples
    other = make_task(dataclasses.replace(config, seed=6))
    assert other.train != first.train and other.eval_prompts != first.eval_prompts


def test_splits_do_not_share_prompts(task):
    groups = [
        {r["prompt"] for r in task.train},
        {r["prompt"] for r in task.validation},
        {r["prompt"] for r in task.test},
        set(task.eval_prompts),
        {p for p, _ in task.sft_examples},
    ]
    assert sum(len(g) for g in groups) == len(set().union(*groups))


def test_oracle_ranks_exact_above_corrupted(task):
    import random

    rng = random.Random(0)
    judge = OracleJudge(task)
    for prompt in task.eval_prompts:
        exact = answer(prompt)
        corrupted = [make_response(rng, prompt, kind) for kind in [("sub", 1), ("short", 1), ("long", 1)]]
        scores = judge.score([prompt] * 4, [exact, *corrupted])
        assert scores[0] == 1.0
        assert all(0.0 <= s < 1.0 for s in scores[1:])
    assert task.oracle_reward("rev:abcd=", "dcba") == 1.0
    assert task.oracle_reward("rev:abcd=", "dcbb") == pytest.approx(0.75)
    assert task.oracle_reward("rev:abcd=", "dcb") == pytest.approx(0.75 - 0.1)  # wrong length costs extra
    assert task.oracle_reward("nxt:aca=", "aca") == 0.0  # this lazy echo shares no character with "bdb"
    assert parse_prompt("srt:hga=") == ("srt", "hga")


def test_corruption_rates_realised_and_flags_consistent(task):
    config, rows = task.config, task.train
    assert len(rows) == config.n_train
    n = len(rows)
    # Bradley-Terry flips are independent draws: the share is flip_rate in expectation, binomial around it
    assert sum(r["is_flipped"] for r in rows) / n == pytest.approx(config.flip_rate, abs=4 * (0.21 / n) ** 0.5)
    assert sum(r["is_near_tie"] for r in rows) / n == pytest.approx(config.near_tie_rate, abs=0.01)
    assert sum(r["is_near_duplicate"] for r in rows) / n == pytest.approx(
        config.near_duplicate_rate, abs=0.01
    )
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", *HIDDEN_COLUMNS}
        assert row["chosen"] != row["rejected"]
        margin = task.oracle_reward(row["prompt"], row["chosen"]) - task.oracle_reward(
            row["prompt"], row["rejected"]
        )
        assert row["oracle_margin"] == pytest.approx(margin)
        assert row["is_flipped"] == (row["oracle_margin"] < 0)
        assert row["is_near_tie"] == (abs(row["oracle_margin"]) < config.tie_epsilon)
    prompts = {r["prompt"] for r in rows if not r["is_near_duplicate"]}
    for row in rows:
        if row["is_near_duplicate"]:
            family, text = parse_prompt(row["prompt"])
            assert any(
                sum(a != b for a, b in zip(text, parse_prompt(p)[1], strict=True)) == 1
                for p in prompts
                if p.startswith(family) and len(p) == len(row["prompt"])
            )
    for row in task.test:  # the test split: clean labels, no ties
        assert row["oracle_margin"] >= config.tie_epsilon
        assert not (row["is_flipped"] or row["is_near_tie"] or row["is_near_duplicate"])
    flipped = [row for row in task.validation if row["is_flipped"]]  # validation: mostly, not perfectly, clean
    assert 0 < len(flipped) < 0.15 * len(task.validation)
    for row in task.validation:
        assert abs(row["oracle_margin"]) >= config.tie_epsilon and (row["oracle_margin"] < 0) == row["is_flipped"]


def test_lazy_biased_regime_flips_exact_counts_away_from_ties():
    # the task before issue 20, kept as an option: exact counts, and its flips have LARGER margins than clean pairs
    task = make_task(TaskConfig(seed=3, n_train=1000, n_validation=50, n_test=50, n_eval_prompts=30, n_sft=200,
                                label_noise="lazy-biased", ratings="independent"))
    config, rows = task.config, task.train
    assert sum(r["is_flipped"] for r in rows) == round(config.flip_rate * len(rows))
    assert sum(r["is_flipped"] for r in task.validation) == round(config.validation_flip_rate * len(task.validation))
    flipped = [-r["oracle_margin"] for r in rows if r["is_flipped"]]
    clean = [r["oracle_margin"] for r in rows if not r["is_flipped"] and not r["is_near_tie"]]
    assert np.mean(flipped) > np.mean(clean)
    assert task.flip_temperatures == {}


def test_bradley_terry_flips_follow_the_closed_form():
    """Each pair is flipped with probability σ(−m/τ) of its oracle margin m: per margin, the flipped share matches the
    closed form; τ gives flip_rate in expectation; flipped pairs' margins are smaller than clean ones', by the amount
    the closed form predicts."""
    config = TaskConfig(seed=1, n_train=6000, n_validation=50, n_test=50, n_eval_prompts=30, n_sft=50)
    task = make_task(config)
    tau = task.flip_temperatures["train"]
    margins = np.abs([r["oracle_margin"] for r in task.train])  # the margin before any flip
    flipped = np.asarray([r["is_flipped"] for r in task.train])
    p = np.where(margins > 0, 1.0 / (1.0 + np.exp(margins / tau)), 0.0)  # σ(−m/τ), independently of the code
    assert p.mean() == pytest.approx(config.flip_rate, rel=1e-6)  # τ is calibrated to the rate
    checked = 0
    for m in np.unique(np.round(margins, 6)):
        at = np.isclose(margins, m)
        if at.sum() >= 100 and m > 0:
            expected = 1.0 / (1.0 + np.exp(m / tau))
            assert flipped[at].mean() == pytest.approx(expected, abs=4 * (expected * (1 - expected) / at.sum()) ** 0.5)
            checked += 1
    assert checked >= 4
    clean = ~flipped & (margins > 0)
    assert margins[flipped].mean() < margins[clean].mean()
    expected_flipped = (margins * p).sum() / p.sum()  # E[m | flipped] under the closed form
    assert margins[flipped].mean() == pytest.approx(expected_flipped, abs=0.02)
    # ties (equal rewards) are shuffled by a coin, never counted as flips
    ties = margins == 0
    assert ties.sum() > 100 and not flipped[ties].any()


@pytest.mark.parametrize("noise", ["bradley-terry", "lazy-biased"])
def test_label_derived_ratings_never_contradict_labels(noise):
    base = dict(seed=2, n_train=1000, n_validation=50, n_test=50, n_eval_prompts=30, n_sft=50, label_noise=noise)
    derived = make_task(TaskConfig(**base, ratings="label-derived")).train
    assert all(r["score_chosen"] >= r["score_rejected"] for r in derived)
    independent = make_task(TaskConfig(**base, ratings="independent")).train
    flipped = [r for r in independent if r["is_flipped"]]
    assert flipped and [r["prompt"] for r in derived] == [r["prompt"] for r in independent]  # only ratings differ
    # an external rater: it contradicts a flipped label more often than not
    assert np.mean([r["score_chosen"] < r["score_rejected"] for r in flipped]) > 0.6
    if noise == "bradley-terry":
        # the label-derived ratings are the annotator's utilities, oracle + centred Gumbel(τ): mean noise near 0
        task = make_task(TaskConfig(**base, ratings="label-derived"))
        noise_values = [r[f"score_{side}"] - task.oracle_reward(r["prompt"], r[side])
                        for r in task.train for side in ("chosen", "rejected")]
        tau = task.flip_temperatures["train"]
        assert abs(np.mean(noise_values)) < 4 * tau * (np.pi / 6**0.5) / len(noise_values) ** 0.5 + 0.01


def test_validation_shift_changes_validation_not_test():
    base = dict(seed=4, n_train=300, n_validation=150, n_test=150, n_eval_prompts=30, n_sft=50)
    plain, shifted = make_task(TaskConfig(**base)), make_task(TaskConfig(**base, validation_shift="family"))
    assert shifted.test == plain.test and shifted.eval_prompts == plain.eval_prompts
    assert {r["family"] for r in shifted.validation} == {"rev"}
    assert {r["family"] for r in plain.validation} == {"rev", "srt", "nxt"}
    assert {r["family"] for r in shifted.test} == {"rev", "srt", "nxt"}
    other = make_task(TaskConfig(**base, validation_shift="family", shift_family="nxt"))
    assert {r["family"] for r in other.validation} == {"nxt"}


def test_config_rejects_impossible_rates():
    with pytest.raises(ConfigError):
        TaskConfig(flip_rate=1.5)
    with pytest.raises(ConfigError):
        TaskConfig(flip_rate=0.6, near_tie_rate=0.5, label_noise="lazy-biased")
    with pytest.raises(ConfigError, match="probability < 0.5"):  # no Bradley-Terry flip is likelier than not
        TaskConfig(flip_rate=0.46)
    for bad in ({"label_noise": "uniform"}, {"ratings": "oracle"}, {"validation_shift": "length"},
                {"shift_family": "abc"}, {"rating_noise": -0.1}, {"n_train": 1.5}, {"tie_epsilon": 0.0}):
        with pytest.raises(ConfigError):
            TaskConfig(**bad)
    with pytest.raises(ConfigError):  # more prompts than strings of length 2 over the alphabet
        make_task(TaskConfig(min_len=2, max_len=2, n_train=500))


def test_sft_train_lowers_the_completion_loss_deterministically(tokenizer, task):
    examples = [(p, answer(p)) for p, _ in task.sft_examples[:64]]

    def trained() -> torch.nn.Module:
        model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
        return sft_train(model, tokenizer, examples, epochs=4, lr=1e-2, batch_size=16, seed=0)

    before = completion_loss(
        build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2), tokenizer, examples
    )
    first, second = trained(), trained()
    after = completion_loss(first, tokenizer, examples)
    assert after < before - 1.0
    assert not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_greedy_answers_stop_at_eos(tokenizer):
    # Teach a tiny model two fixed completions, so greedy decoding must emit them and then EOS.
    examples = [("rev:ab=", "ba"), ("rev:abcd=", "dcba")] * 16
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    sft_train(model, tokenizer, examples, epochs=30, lr=1e-2, batch_size=8, seed=0)
    # Different prompt lengths in one batch exercise the left padding.
    answers = greedy_answers(model, tokenizer, ["rev:ab=", "rev:abcd="], max_new_tokens=10, batch_size=2)
    assert answers == ["ba", "dcba"]
    one_by_one = greedy_answers(model, tokenizer, ["rev:abcd="], max_new_tokens=10, batch_size=1)
    assert one_by_one == ["dcba"]


def test_committed_demo_meets_check_task_requirement():
    """The committed demo (bench/results/demo.json) ran today's default task, and its full rows meet check_task's
    requirement (full DPO's win-rate interval above 0.5): the CI line `check_task --against` adds that a fresh
    full-data run reproduces its win rate. A change of the task's defaults without a rerun of the demo fails here."""
    from pathlib import Path

    from prefsift.synthetic.check_task import committed_demo, full_beats_sft

    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "demo.json"
    checks, win = committed_demo(path, TaskConfig(), seed=0)
    assert all(ok for _, ok in checks), checks
    assert win is not None
    assert full_beats_sft(0.51) and not full_beats_sft(0.5)  # the bar is the interval's lower end, strictly above ½
