"""Training through TRL with prefsift's reference log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_pairs, make_tiny_llama
from datasets import Dataset

import prefsift.train as train_module
from prefsift.config import EngineConfig
from prefsift.errors import ConfigError
from prefsift.logps import compute_logps
from prefsift.models import LoadedModel, load_model
from prefsift.train import TrainConfig, train

ENGINE = EngineConfig(max_length=64, dtype="float32")


def test_dpo_uses_our_reference_logps_and_learns(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch):
    pairs = Dataset.from_list(make_pairs(32, seed=7))
    ref = compute_logps(tiny_llama, bpe_tokenizer, pairs, max_length=64)
    # TRL's own reference pass must not run: our log-probs are handed over as they are.
    monkeypatch.setattr(train_module.DPOTrainer, "_precompute_ref_logps",
                        lambda *a, **k: pytest.fail("TRL recomputed the reference log-probs"))
    config = TrainConfig(learning_rate=5e-3, epochs=3, batch_size=8, logging_steps=1)
    result = train(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "x"), pairs, config, ENGINE, tmp_path / "out",
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
    config = TrainConfig(learning_rate=1e-3, epochs=1, batch_size=4, lora=True, lora_r=4, lora_alpha=8)
    train(base, pairs, config, ENGINE, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    reloaded = load_model(str(tmp_path / "lora"), device="cpu")  # base + adapter, merged
    assert reloaded.model.config.vocab_size == len(bpe_tokenizer)


def test_kto_trains(bpe_tokenizer, tiny_llama, tmp_path):
    pairs = Dataset.from_list(make_pairs(8, seed=9))
    config = TrainConfig(algo="kto", learning_rate=1e-3, epochs=1, batch_size=4, logging_steps=1)
    result = train(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "x"), pairs, config, ENGINE)
    assert any("loss" in h for h in result.log_history)


@pytest.mark.parametrize(("values", "message"), [
    ({"algo": "ppo"}, "algo must be one of dpo, kto"), ({"epochs": 0}, "epochs must be > 0"),
    ({"epochs": -1.0}, "epochs must be > 0"), ({"learning_rate": float("nan")}, "must be a finite number"),
    ({"batch_size": 0}, "batch_size must be >= 1"), ({"seed": True}, "seed must be an integer"),
    ({"lora": "yes"}, "lora must be true or false")])
def test_bad_train_options_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_bf16_training_keeps_fp32_master_weights(bpe_tokenizer):
    """Adam's small steps vanish when added to bf16 weights: a model loaded in bf16 must train like fp32 does."""
    pairs = Dataset.from_list(make_pairs(32, seed=13))
    config = TrainConfig(learning_rate=1e-6, epochs=2, batch_size=4, gradient_checkpointing=False)

    def share_changed(load_dtype: torch.dtype, engine_dtype: str) -> float:
        model = make_tiny_llama(bpe_tokenizer, seed=4).to(load_dtype)
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        trained = train(LoadedModel(model, bpe_tokenizer, "t", "x"), pairs, config,
                        EngineConfig(max_length=64, dtype=engine_dtype)).model
        assert all(p.dtype == torch.float32 for p in trained.parameters())
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in trained.named_parameters())
        return changed / sum(p.numel() for p in before.values())

    fp32 = share_changed(torch.float32, "float32")
    bf16 = share_changed(torch.bfloat16, "bfloat16")  # bf16 weights in, bf16 autocast
    assert fp32 > 0.5
    assert bf16 > 0.8 * fp32


def test_a_copy_of_a_trained_model_is_independent(bpe_tokenizer, tiny_llama):
    """TRL patches `forward` onto the instance; a deepcopy must still compute with its own weights."""
    import copy

    pairs = Dataset.from_list(make_pairs(16, seed=10))
    config = TrainConfig(learning_rate=5e-3, epochs=1, batch_size=8, gradient_checkpointing=False)
    first = train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), pairs, config, ENGINE).model
    before = compute_logps(first, bpe_tokenizer, pairs, max_length=64)
    second = copy.deepcopy(first)
    train(LoadedModel(second, bpe_tokenizer, "t", "x"), pairs, config, ENGINE)
    ids = torch.tensor([bpe_tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(first(ids).logits, second(ids).logits)  # the copy's own forward, own weights
    np.testing.assert_allclose(compute_logps(first, bpe_tokenizer, pairs, max_length=64), before)
