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
    assert sum(r["is_flipped"] for r in rows) / n == pytest.approx(config.flip_rate, abs=0.01)
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
    # the visible ratings are the oracle reward plus noise: they recover the true order more often than not
    rated = np.asarray([r["score_chosen"] - r["score_rejected"] for r in rows])
    truth = np.asarray([r["oracle_margin"] for r in rows])
    real = np.abs(truth) >= config.tie_epsilon
    assert 0.7 < np.mean(np.sign(rated[real]) == np.sign(truth[real])) < 0.95
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
    assert len(flipped) == round(config.validation_flip_rate * len(task.validation))
    for row in task.validation:
        assert abs(row["oracle_margin"]) >= config.tie_epsilon and (row["oracle_margin"] < 0) == row["is_flipped"]


def test_config_rejects_impossible_rates():
    with pytest.raises(ConfigError):
        TaskConfig(flip_rate=1.5)
    with pytest.raises(ConfigError):
        TaskConfig(flip_rate=0.6, near_tie_rate=0.5)
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
