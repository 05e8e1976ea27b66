"""Training through TRL with prefsift's reference log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pairs
from datasets import Dataset

import prefsift.train as train_module
from prefsift.errors import ConfigError
from prefsift.logps import compute_logps
from prefsift.models import LoadedModel, load_model
from prefsift.train import TrainConfig, train


def test_dpo_uses_our_reference_logps_and_learns(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch):
    pairs = Dataset.from_list(make_pairs(32, seed=7))
    ref = compute_logps(tiny_llama, bpe_tokenizer, pairs, max_length=64)
    # TRL's own reference pass must not run: our log-probs are handed over as they are.
    monkeypatch.setattr(train_module.DPOTrainer, "_precompute_ref_logps",
                        lambda *a, **k: pytest.fail("TRL recomputed the reference log-probs"))
    config = TrainConfig(learning_rate=5e-3, epochs=3, batch_size=8, max_length=64, logging_steps=1)
    result = train(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "x"), pairs, config, tmp_path / "out",
                   ref_logps=ref)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    # At step one the policy IS the reference, so if our reference log-probs match TRL's policy log-probs the
    # first DPO loss is exactly log 2.
    assert losses[0] == pytest.approx(np.log(2), abs=1e-3)
    assert np.mean(losses[-3:]) < np.log(2) - 0.05
    after = compute_logps(result.model, bpe_tokenizer, pairs, max_length=64)
    assert np.mean((after[:, 0] - ref[:, 0]) - (after[:, 1] - ref[:, 1])) > 0  # chosen rose against rejected
    reloaded = load_model(str(tmp_path / "out"), device="cpu")
    np.testing.assert_allclose(compute_logps(reloaded.model, reloaded.tokenizer, pairs, max_length=64), after,
                               rtol=1e-4)


def test_dpo_with_lora_saves_adapter(bpe_tokenizer, tiny_llama, tmp_path):
    pairs = Dataset.from_list(make_pairs(8, seed=8))
    tiny_llama.save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    base = load_model(str(tmp_path / "base"), device="cpu")
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, lora=True, lora_r=4,
                         lora_alpha=8)
    train(base, pairs, config, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    reloaded = load_model(str(tmp_path / "lora"), device="cpu")  # base + adapter, merged
    assert reloaded.model.config.vocab_size == len(bpe_tokenizer)


def test_kto_trains(bpe_tokenizer, tiny_llama, tmp_path):
    pairs = Dataset.from_list(make_pairs(8, seed=9))
    config = TrainConfig(algo="kto", learning_rate=1e-3, epochs=1, batch_size=4, max_length=64, logging_steps=1)
    result = train(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "x"), pairs, config)
    assert any("loss" in h for h in result.log_history)


def test_unknown_algo(bpe_tokenizer, tiny_llama):
    with pytest.raises(ConfigError, match="unknown algo 'ppo'"):
        train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), Dataset.from_list(make_pairs(2)),
              TrainConfig(algo="ppo"))


def test_a_copy_of_a_trained_model_is_independent(bpe_tokenizer, tiny_llama):
    """TRL patches `forward` onto the instance; a deepcopy must still compute with its own weights."""
    import copy

    pairs = Dataset.from_list(make_pairs(16, seed=10))
    config = TrainConfig(learning_rate=5e-3, epochs=1, batch_size=8, max_length=64, gradient_checkpointing=False)
    first = train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), pairs, config).model
    before = compute_logps(first, bpe_tokenizer, pairs, max_length=64)
    second = copy.deepcopy(first)
    train(LoadedModel(second, bpe_tokenizer, "t", "x"), pairs, config)
    ids = torch.tensor([bpe_tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(first(ids).logits, second(ids).logits)  # the copy's own forward, own weights
    np.testing.assert_allclose(compute_logps(first, bpe_tokenizer, pairs, max_length=64), before)
