"""Training through TRL with prefsift's reference log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama

import prefsift.train as train_module
from prefsift.config import EngineConfig
from prefsift.engine.logps import compute_logps
from prefsift.errors import ConfigError
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


# --- soft selection (weight column) and curriculum (order) --------------------------------------------------------

def _weighted_setting(bpe_tokenizer, n: int = 8):
    """Pairs, a reference unlike the policy (so per-pair losses differ) and its log-probs."""
    pairs = Dataset.from_list(make_pairs(n, seed=31))
    ref = compute_logps(make_tiny_llama(bpe_tokenizer, seed=2), bpe_tokenizer, pairs, max_length=64)
    return pairs, ref


def _loss_and_grads(bpe_tokenizer, pairs: Dataset, ref: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
    """One batch holding every pair through the trainer prefsift builds: its loss and the gradient of it."""
    from prefsift.train import make_trainer

    model = make_tiny_llama(bpe_tokenizer, seed=1)  # the same weights on every call
    config = TrainConfig(batch_size=len(pairs), gradient_checkpointing=False)
    trainer, _ = make_trainer(LoadedModel(model, bpe_tokenizer, "t", "x"), pairs, config, ENGINE, "unused",
                              ref_logps=ref, quiet=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["ref_chosen_logps"]) == len(pairs)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        # Batches of other shapes sum their rows in another order: in fp32 an element that cancels to near zero keeps
        # an absolute error of a few ε times the tensor's scale (one of 1,152 was off by 1.8e-8 against atol 1e-8 on
        # a loaded CI machine). 1e-6 of the largest element is ~8 ε; a wrong weighting moves gradients by O(1).
        scale = float(b[1][name].abs().max())
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-6 * scale)


def test_weight_one_is_trls_own_loss(bpe_tokenizer, one_thread):
    pairs, ref = _weighted_setting(bpe_tokenizer)
    trl_own = _loss_and_grads(bpe_tokenizer, pairs, ref)  # no weight column: TRL's own loss (both packed)
    weighted = _loss_and_grads(bpe_tokenizer, pairs.add_column("weight", [1.0] * len(pairs)), ref)
    _assert_same(weighted, trl_own)
    assert trl_own[0] != pytest.approx(np.log(2), abs=1e-3)  # the reference differs: a real loss, not log 2


def test_weight_zero_is_dropping_the_pair(bpe_tokenizer, one_thread):
    pairs, ref = _weighted_setting(bpe_tokenizer)
    weights = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    kept = [i for i, w in enumerate(weights) if w]
    dropped = _loss_and_grads(bpe_tokenizer, pairs.select(kept), ref[kept])
    weighted = _loss_and_grads(bpe_tokenizer, pairs.add_column("weight", weights), ref)
    _assert_same(weighted, dropped)


@pytest.mark.parametrize(("checkpointing", "lora"), [(False, False), (True, False), (False, True)])
def test_weighted_loss_is_the_weighted_mean_of_pair_losses(bpe_tokenizer, one_thread, checkpointing, lora):
    """train() with a weight column logs Σ w·ℓ / Σ w at its first step, ℓ from prefsift's own log-prob engine;
    also with activations recomputed and with a LoRA adapter (zero at the start: the same model)."""
    pairs, ref = _weighted_setting(bpe_tokenizer)
    weights = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.0, 0.0])
    policy = make_tiny_llama(bpe_tokenizer, seed=1)
    lp = compute_logps(policy, bpe_tokenizer, pairs, max_length=64)
    margin = ENGINE.beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))
    expected = np.sum(weights * np.logaddexp(0, -margin)) / weights.sum()
    config = TrainConfig(batch_size=len(pairs), learning_rate=1e-3, logging_steps=1,
                         gradient_checkpointing=checkpointing, lora=lora, lora_r=4, lora_alpha=8)
    result = train(LoadedModel(policy, bpe_tokenizer, "t", "x"), pairs.add_column("weight", weights.tolist()),
                   config, ENGINE, ref_logps=ref, quiet=True)
    first = next(h["loss"] for h in result.log_history if "loss" in h)
    assert first == pytest.approx(expected, abs=1e-4)
    assert abs(expected - np.mean(np.logaddexp(0, -margin))) > 1e-3  # the weights change the loss


@pytest.mark.parametrize(("weights", "message"), [
    ([1.0, -1.0], "finite numbers >= 0"), ([0.0, 0.0], "every pair has weight 0"),
    ([1.0, float("nan")], "finite numbers >= 0")])
def test_bad_weights_are_refused(bpe_tokenizer, tiny_llama, weights, message):
    pairs = Dataset.from_list(make_pairs(2, seed=3)).add_column("weight", weights)
    with pytest.raises(ConfigError, match=message):
        train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), pairs, TrainConfig(), ENGINE)


def test_kto_refuses_weights_and_order(bpe_tokenizer, tiny_llama):
    pairs = Dataset.from_list(make_pairs(2, seed=3)).add_column("weight", [1.0, 1.0])
    with pytest.raises(ConfigError, match="KTO takes neither"):
        train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), pairs, TrainConfig(algo="kto"), ENGINE)


def _batches_seen(bpe_tokenizer, monkeypatch, order, descending: bool = False) -> tuple[list[float], np.ndarray]:
    """The reference log-prob of each pair in the order the trainer's loss sees them (one epoch)."""
    pairs, ref = _weighted_setting(bpe_tokenizer)
    seen: list[float] = []
    original = train_module._DPOTrainerWithReferenceLogps._compute_loss

    def record(self, model, inputs, return_outputs):
        seen.extend(inputs["ref_chosen_logps"].tolist())
        return original(self, model, inputs, return_outputs)

    monkeypatch.setattr(train_module._DPOTrainerWithReferenceLogps, "_compute_loss", record)
    config = TrainConfig(batch_size=2, gradient_checkpointing=False, order="difficulty" if order is not None else None,
                         order_descending=descending)
    train(LoadedModel(make_tiny_llama(bpe_tokenizer, seed=1), bpe_tokenizer, "t", "x"), pairs, config, ENGINE,
          ref_logps=ref, quiet=True, order=order)
    return seen, ref


def test_curriculum_order_reaches_the_trainer(bpe_tokenizer, monkeypatch, one_thread):
    difficulty = np.array([0.7, 0.1, np.nan, 0.4, 0.9, 0.2, 0.4, 0.3])
    seen, ref = _batches_seen(bpe_tokenizer, monkeypatch, difficulty)
    # easiest first, the tie (rows 3 and 6) in the data's order, the pair without a score last
    np.testing.assert_allclose(seen, ref[[1, 5, 7, 3, 6, 0, 4, 2], 0], rtol=1e-6)
    seen, ref = _batches_seen(bpe_tokenizer, monkeypatch, difficulty, descending=True)
    np.testing.assert_allclose(seen, ref[[4, 0, 3, 6, 7, 5, 1, 2], 0], rtol=1e-6)


def test_without_an_order_training_shuffles(bpe_tokenizer, monkeypatch, one_thread):
    seen, ref = _batches_seen(bpe_tokenizer, monkeypatch, None)
    assert sorted(seen) == pytest.approx(sorted(ref[:, 0].tolist()), rel=1e-6)  # every pair once
    assert seen != pytest.approx(ref[:, 0].tolist(), rel=1e-6)  # not in the data's order


def test_order_needs_its_column_name_and_values(bpe_tokenizer, tiny_llama):
    pairs = Dataset.from_list(make_pairs(2, seed=3))
    with pytest.raises(ConfigError, match="needs both the score column's name"):
        train(LoadedModel(tiny_llama, bpe_tokenizer, "t", "x"), pairs, TrainConfig(order="loss"), ENGINE)


def test_run_refuses_a_curriculum_it_cannot_feed():
    from prefsift.config import RunConfig

    with pytest.raises(ConfigError, match="train.order .* is an option of `prefsift train --order`"):
        RunConfig(data="pairs.jsonl", model="sft", train=TrainConfig(order="selective"))


@pytest.mark.parametrize(("shape", "max_length", "lora"), [
    ("text", 64, False), ("text", 24, False), ("conversational", 96, False), ("text", 64, True)])
def test_kto_reference_pass_matches_trls_own(bpe_tokenizer, tiny_llama, tmp_path, shape, max_length, lora):
    """prefsift's engine computes KTO's reference log-probs (each row's completion and the KL term's mismatched one)
    from TRL's own tokens: the values are those TRL's own reference pass gives, on plain text and chat rows, with
    rows truncated and dropped at a short max_length, and with a LoRA adapter (switched off for the reference)."""
    rows = make_pairs(11, seed=21)
    rows[3]["prompt"] = "\n\nHuman: " + "long " * 12 + "\n\nAssistant:"  # fills max_length 24: TRL drops it
    unpaired = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    if shape == "conversational":
        unpaired = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
                    for r in unpaired]
    loaded = LoadedModel(tiny_llama, bpe_tokenizer, "tiny", "")
    config = TrainConfig(algo="kto", batch_size=4, gradient_checkpointing=False, lora=lora, lora_r=4, lora_alpha=8)
    trainer, _ = train_module.make_trainer(loaded, Dataset.from_list(unpaired), config,
                                           EngineConfig(max_length=max_length), str(tmp_path))
    if lora:  # a trained-looking adapter: the reference must still be the base model
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
    prepared = trainer.train_dataset.remove_columns(["ref_logps", "ref_KL_logps"])
    ours = trainer._precompute_ref_logps(prepared, "train", 4)
    theirs = train_module.KTOTrainer._precompute_ref_logps(trainer, prepared, "again", 4)
    assert len(ours) == len(theirs) and (len(ours) < len(unpaired)) == (max_length == 24)
    for column in ("ref_logps", "ref_KL_logps"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-4, atol=1e-4)
    # the KL completions are other rows' completions, so the two columns differ
    assert not np.allclose(ours["ref_logps"], ours["ref_KL_logps"])
    if max_length == 24:  # some completions were cut by max_length, and the values still match
        assert any(len(p) + len(c) > 24 for p, c in zip(prepared["prompt_ids"], prepared["completion_ids"],
                                                        strict=True))


def test_kto_reference_model_other_than_the_policy(bpe_tokenizer, tiny_llama, tmp_path):
    """KTO continuing from one model against another (the TIF pipeline's warm-up policy and SFT reference): the
    reference log-probs are the reference model's, as TRL computes them with that `ref_model`; the policy's differ."""
    rows = make_pairs(6, seed=23)
    unpaired = Dataset.from_list([{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                                  for r in rows for side in ("chosen", "rejected")])
    other = LoadedModel(make_tiny_llama(bpe_tokenizer, seed=5), bpe_tokenizer, "other", "")
    config = TrainConfig(algo="kto", batch_size=4, gradient_checkpointing=False)
    trainer, _ = train_module.make_trainer(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", ""), unpaired, config,
                                           EngineConfig(max_length=64), str(tmp_path), reference=other)
    # TRL's own trainer, given the same reference model, computes its reference pass with it
    theirs = train_module.KTOTrainer(model=make_tiny_llama(bpe_tokenizer, seed=6), ref_model=other.model,
                                     args=trainer.args, train_dataset=unpaired,
                                     processing_class=bpe_tokenizer).train_dataset
    trainer._reference = None
    policy = trainer._precompute_ref_logps(trainer.train_dataset.remove_columns(["ref_logps", "ref_KL_logps"]),
                                           "policy", 4)
    for column in ("ref_logps", "ref_KL_logps"):
        np.testing.assert_allclose(trainer.train_dataset[column], theirs[column], rtol=1e-4, atol=1e-4)
        # two random tiny models give near-uniform log-probs: they still differ by far more than the tolerance
        assert np.abs(np.asarray(trainer.train_dataset[column]) - np.asarray(policy[column])).max() > 0.05
    with pytest.raises(ConfigError, match="KTO computes its reference log-probs itself"):
        train_module.make_trainer(LoadedModel(tiny_llama, bpe_tokenizer, "tiny", ""), unpaired, config,
                                  EngineConfig(max_length=64), str(tmp_path), ref_logps=np.zeros((6, 2)))
