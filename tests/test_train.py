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
    ({"lora": "yes"}, "lora must be true or false"), ({"micro_batch_tokens": 0}, "micro_batch_tokens must be >= 1")])
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


# ------------------------------------------------------------------ LoRA chains, learning rates, no-op trainings


def _lora_delta(adapter_dir, module: str, config: dict) -> torch.Tensor:
    """scale · B @ A of one module of a saved adapter, read straight from its safetensors (peft's merge, by hand)."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = next(v for k, v in weights.items() if module in k and "lora_A" in k)
    b = next(v for k, v in weights.items() if module in k and "lora_B" in k)
    return (config["lora_alpha"] / config["r"]) * (b.double() @ a.double())


@pytest.mark.e2e
def test_a_lora_chain_through_the_walkthrough_keeps_every_step(bpe_tokenizer, tmp_path, monkeypatch, one_thread):
    """The README walkthrough's trainings with --lora: warm-up from ./sft, the validation and aligned models from
    warmup/. Each later adapter sits on the warm-up, so the loaded model is SFT + warm-up + its own adapter (computed
    here from the files by hand), not SFT + its own adapter."""
    import json
    import shutil

    from helpers import invoke, saved_tiny_llama, write_jsonl
    from safetensors.torch import load_file, save_file

    saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    write_jsonl(tmp_path / "train.jsonl", make_pairs(24, seed=61))
    write_jsonl(tmp_path / "validation.jsonl", make_pairs(16, seed=62))
    monkeypatch.chdir(tmp_path)
    common = ("--lora", "--lora-r", 4, "--lora-alpha", 8, "--batch-size", 8, "--max-length", 64,
              "--no-gradient-checkpointing")
    for command in (("--data", "train.jsonl", "--model", "./sft", "--out", "warmup/"),
                    ("--data", "validation.jsonl", "--model", "warmup/", "--reference", "./sft", "--out",
                     "validation/"),
                    ("--data", "train.jsonl", "--model", "warmup/", "--reference", "./sft", "--out", "aligned/")):
        result = invoke("train", *command, *common)
        assert result.exit_code == 0, result.output
    recorded = {d: json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in
                ("warmup", "validation", "aligned")}
    # absolute: a relative base is read from whatever directory a later command runs in
    assert [recorded[d]["base_model_name_or_path"] for d in recorded] == [
        str((tmp_path / "sft").resolve()), str((tmp_path / "warmup").resolve()), str((tmp_path / "warmup").resolve())]
    elsewhere = tmp_path / "elsewhere"  # another ./sft and warmup/ beside a later command: never read
    shutil.copytree(tmp_path / "sft", elsewhere / "sft")
    other = load_file(str(elsewhere / "sft" / "model.safetensors"))
    save_file({k: v + 1.0 for k, v in other.items()}, str(elsewhere / "sft" / "model.safetensors"))
    monkeypatch.chdir(elsewhere)
    from_elsewhere = load_model(str(tmp_path / "aligned")).model.state_dict()
    monkeypatch.chdir(tmp_path)
    from_here = load_model(str(tmp_path / "aligned")).model.state_dict()
    assert all(torch.equal(from_here[k], from_elsewhere[k]) for k in from_here)
    # the LoRA default learning rate, recorded with the run
    assert json.loads((tmp_path / "aligned" / "manifest.json").read_text())["config"]["learning_rate"] == 5e-5
    sft = load_file(str(tmp_path / "sft" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    warmup = _lora_delta(tmp_path / "warmup", "layers.0.self_attn.q_proj", recorded["warmup"])
    for directory in ("validation", "aligned"):
        own = _lora_delta(tmp_path / directory, "layers.0.self_attn.q_proj", recorded[directory])
        loaded = load_model(directory, device="cpu", dtype="float32").model.state_dict()[name].double()
        chained, alone = sft[name].double() + warmup + own, sft[name].double() + own
        assert float(warmup.abs().max()) > 2e-5 and float(own.abs().max()) > 2e-5  # both adapters learned
        torch.testing.assert_close(loaded, chained, rtol=0, atol=1e-6)
        assert float((loaded - alone).abs().max()) > 20 * 1e-6  # the warm-up is in it
    # a chain's fingerprint follows its base's content: the same adapter on another warm-up is another model
    assert load_model("aligned/", device="cpu").fingerprint != load_model("warmup/", device="cpu").fingerprint


def test_lora_on_a_model_no_directory_holds_saves_the_whole_model(bpe_tokenizer, tmp_path, one_thread):
    """A model trained in memory (or built from a config) has no directory an adapter could name as its base: a LoRA
    training of it saves the merged model, which reloads as the model trained."""
    pairs = Dataset.from_list(make_pairs(8, seed=63))
    loaded = LoadedModel(make_tiny_llama(bpe_tokenizer, seed=3), bpe_tokenizer, "t", "x")
    first = train(loaded, pairs, TrainConfig(batch_size=8, lora=True, lora_r=4, lora_alpha=8), ENGINE)
    assert first.model.__dict__.get("name_or_path") == ""  # trained in memory: on no directory any more
    second = train(loaded, pairs, TrainConfig(batch_size=8, lora=True, lora_r=4, lora_alpha=8, seed=1), ENGINE,
                   tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    reloaded = load_model(str(tmp_path / "out"), device="cpu", dtype="float32").model.state_dict()
    for name, value in second.model.state_dict().items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)


def test_an_adapter_whose_base_is_gone_is_one_line(bpe_tokenizer, tmp_path, one_thread):
    from helpers import saved_tiny_llama

    from prefsift.errors import ModelError

    saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    base = load_model(str(tmp_path / "sft"), device="cpu")
    train(base, Dataset.from_list(make_pairs(8, seed=64)), TrainConfig(batch_size=8, lora=True, lora_r=4),
          ENGINE, tmp_path / "adapter")
    (tmp_path / "sft").rename(tmp_path / "moved")
    with pytest.raises(ModelError, match=r"sits on .*sft .*which is not there"):
        load_model(str(tmp_path / "adapter"), device="cpu")


def test_learning_rate_defaults_depend_on_lora():
    import dataclasses

    from prefsift.config import FULL_LEARNING_RATE, LORA_LEARNING_RATE

    assert TrainConfig().effective_learning_rate == FULL_LEARNING_RATE == 1e-6
    assert TrainConfig(lora=True).effective_learning_rate == LORA_LEARNING_RATE == 5e-5
    assert TrainConfig(lora=True, learning_rate=1e-6).effective_learning_rate == 1e-6  # given: kept
    # a copy that switches LoRA on (the pipeline's LoRA validation model, the API's lora=True over a config) takes
    # the adapter's default: a default resolved at construction kept the full one (1e-6) and the adapter barely moved
    assert dataclasses.replace(TrainConfig(), lora=True).effective_learning_rate == LORA_LEARNING_RATE
    assert dataclasses.replace(TrainConfig(lora=True), lora=False).effective_learning_rate == FULL_LEARNING_RATE


def test_a_training_that_moves_nothing_is_an_error(bpe_tokenizer, tmp_path, one_thread):
    """At a learning rate whose steps are below float rounding the weights do not change: an error, nothing saved.
    The same training at an ordinary rate passes (the check is not always on)."""
    pairs = Dataset.from_list(make_pairs(16, seed=65))

    def run(rate: float, out=None):
        model = make_tiny_llama(bpe_tokenizer, seed=5)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(LoadedModel(model, bpe_tokenizer, "t", "x"), pairs, TrainConfig(batch_size=8, learning_rate=rate),
              ENGINE, out)
        return max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())

    with pytest.raises(ConfigError, match=r"training moved nothing: after 2 steps at --learning-rate 1e-20 the "
                                          r"trainable weights changed by 0\.0e\+00 of their size"):
        run(1e-20, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing saved
    assert run(1e-6) > 1e-7


def test_the_weight_sample_stays_inside_large_tensors():
    from prefsift.train import sample_index

    for numel in (1, 2, 255, 256, 257, 28311552, 2**31 + 7):  # 28311552: SmolLM2-135M's embedding matrix
        index = sample_index(numel, 256)
        assert len(index) == min(numel, 256) and int(index[0]) == 0 and int(index[-1]) == numel - 1
        assert bool((index[1:] > index[:-1]).all())


def test_a_training_with_no_step_is_an_error(bpe_tokenizer, monkeypatch, one_thread):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: None)  # as if the loop ended before its first step
    with pytest.raises(ConfigError, match="training took no optimizer step"):
        train(LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "t", "x"),
              Dataset.from_list(make_pairs(8, seed=66)), TrainConfig(batch_size=8), ENGINE)


# ------------------------------------------------------------------ what a training prints


def test_trls_per_row_prefix_warning_is_one_line_with_a_count(bpe_tokenizer, caplog, one_thread):
    """Prompts ending inside a word tokenize differently alone and joined to their completion: TRL logs a warning
    for each (its text quotes the row); prefsift says it once, with the count, and TRL's lines stay off."""
    import logging
    import random

    from helpers import random_text

    rng = random.Random(67)
    rows = []
    for k in range(12):
        words = random_text(rng, 6).split()
        cut = k < 9  # nine prompts end inside their last word
        rows.append({"prompt": " ".join(words)[:-2] if cut else " ".join(words),
                     "chosen": " ".join(words)[-2:] + " yes" if cut else " yes",
                     "rejected": " ".join(words)[-2:] + " no" if cut else " no"})
    with caplog.at_level(logging.WARNING), warnings_recorded() as caught:
        train(LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "t", "x"), Dataset.from_list(rows),
              TrainConfig(batch_size=4, learning_rate=1e-3), ENGINE, quiet=True)
    assert not [r for r in caplog.records if "not a prefix" in r.getMessage()]
    said = [str(w.message) for w in caught if "not a prefix" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("9 of 12 training rows: the tokenized prompt is not a prefix")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # the libraries' deprecations: off


def warnings_recorded():
    import warnings

    class Recorder(warnings.catch_warnings):
        def __enter__(self):
            caught = super().__enter__()
            warnings.simplefilter("always")
            return caught

    return Recorder(record=True)


def test_the_training_bar_counts_pairs_with_their_rate_and_the_time_left(bpe_tokenizer, capsys, monkeypatch,
                                                                         one_thread):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    train(LoadedModel(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "t", "x"),
          Dataset.from_list(make_pairs(20, seed=68)),
          TrainConfig(batch_size=8, epochs=2, learning_rate=1e-3, logging_steps=2), ENGINE)
    captured = capsys.readouterr()
    err = captured.err
    final = err.replace("\r", "\n").strip().splitlines()
    bar = [line for line in final if line.startswith("training:")]
    # 2 epochs of 20 pairs in steps of 8 (8, 8, 4 an epoch): 40 pairs; elapsed<left and pairs/s
    assert bar and "40/40" in bar[-1] and "pair/s" in bar[-1] and "<00:00" in bar[-1], bar[-1:]
    assert not [line for line in final if "it/s" in line]  # transformers' step bar is gone
    out = captured.out + err
    assert "step 2/6: loss" in out and "reward margin" in out and "reward accuracy" in out
    assert "Tokenizing train dataset" not in out  # TRL's preprocessing passes: no bar each


def test_a_training_that_barely_moved_the_preferences_warns(bpe_tokenizer, one_thread):
    """The mean implicit reward margin TRL logs at the end says whether a training moved the model's preferences:
    one warning under BARELY_MOVED (a learning rate far too small for the run), none for a training that learned.
    The margin it reads is checked against one computed from the trained model's own log-probs."""
    import copy
    import warnings

    pairs = Dataset.from_list(make_pairs(16, seed=4))
    base = make_tiny_llama(bpe_tokenizer, seed=2)
    ref = compute_logps(base, bpe_tokenizer, pairs, max_length=64)

    def run(learning_rate: float) -> tuple[list[str], object]:
        config = TrainConfig(learning_rate=learning_rate, epochs=2, batch_size=16, logging_steps=1,
                             gradient_checkpointing=False, lora=True, lora_r=4, lora_alpha=8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(LoadedModel(copy.deepcopy(base), bpe_tokenizer, "tiny", "x"), pairs, config, ENGINE,
                           ref_logps=ref, quiet=True)
        return [str(w.message) for w in caught if "barely moved" in str(w.message)], result

    said, result = run(1e-5)  # an adapter at a full fine-tune's rate
    assert len(said) == 1 and "--learning-rate 1e-05" in said[0] and "5e-05 with --lora" in said[0]
    logged = [h["rewards/margins"] for h in result.log_history if "rewards/margins" in h]
    assert abs(logged[-1]) < train_module.BARELY_MOVED
    said, result = run(5e-2)
    assert said == []
    after = compute_logps(result.model, bpe_tokenizer, pairs, max_length=64)
    margin = ENGINE.beta * np.mean((after[:, 0] - ref[:, 0]) - (after[:, 1] - ref[:, 1]))
    assert margin > train_module.BARELY_MOVED  # the model's own margins agree that it learned


def test_a_token_budget_trains_the_same_model_in_micro_batches(bpe_tokenizer, one_thread):
    """`micro_batch_tokens` bounds what one forward and backward holds, not what a step learns: a whole training
    (three steps of 8 pairs, gradient accumulation 2, TRL's scheduler and Adam) ends at the same weights and logs the
    same losses and metrics with every batch cut into micro-batches as with none."""
    pairs = Dataset.from_list(make_pairs(24, seed=5))
    ref = compute_logps(make_tiny_llama(bpe_tokenizer, seed=9), bpe_tokenizer, pairs, max_length=64)
    results = {}
    for budget in (None, 64):
        config = TrainConfig(learning_rate=5e-3, epochs=1, batch_size=4, gradient_accumulation_steps=2,
                             logging_steps=1, gradient_checkpointing=False, micro_batch_tokens=budget)
        model = make_tiny_llama(bpe_tokenizer, seed=1)
        results[budget] = train(LoadedModel(model, bpe_tokenizer, "tiny", "x"), pairs, config, ENGINE,
                                ref_logps=ref, quiet=True)
    whole, cut = results[None], results[64]
    assert whole.micro_batches == 0 and cut.micro_batches > 2 * cut.steps  # every step was cut, into 3 or more
    logs = [{k: v for k, v in h.items() if k not in ("train_runtime", "train_samples_per_second",
                                                     "train_steps_per_second")} for h in whole.log_history]
    cut_logs = [{k: v for k, v in h.items() if k not in ("train_runtime", "train_samples_per_second",
                                                         "train_steps_per_second")} for h in cut.log_history]
    assert [h.keys() for h in cut_logs] == [h.keys() for h in logs] and len(logs) >= 3
    for a, b in zip(cut_logs, logs, strict=True):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert abs(logs[0]["loss"] - np.log(2)) > 1e-3  # a reference unlike the policy: real losses
    # Adam divides by √v: an element whose gradient is ~0 moves by the rounding of its gradient, so the models are
    # compared on how far each tensor moved, to 1e-3 of its largest move
    start = dict(make_tiny_llama(bpe_tokenizer, seed=1).named_parameters())
    for (name, a), (_, b) in zip(cut.model.named_parameters(), whole.model.named_parameters(), strict=True):
        moved = float((b - start[name]).abs().max())
        assert moved > 1e-4, name
        assert float((a - b).abs().max()) <= 1e-3 * moved, name


def test_the_default_token_budget_follows_the_models_size_on_a_cpu_only(bpe_tokenizer, tiny_llama):
    from types import SimpleNamespace

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    smollm2 = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30, hidden_size=576))
    big = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=24, hidden_size=2048))  # a 1.7B shape
    assert train_module.micro_batch_tokens(TrainConfig(), smollm2, cpu) == 512
    assert train_module.micro_batch_tokens(TrainConfig(), big, cpu) == 512 * 30 * 576 // (24 * 2048)
    assert train_module.micro_batch_tokens(TrainConfig(), tiny_llama, cpu) > 10_000  # a tiny model is never cut
    assert train_module.micro_batch_tokens(TrainConfig(), smollm2, gpu) is None
    assert train_module.micro_batch_tokens(TrainConfig(micro_batch_tokens=64), smollm2, gpu) == 64
