"""DPO training's policy forward on the engine's packed layout (engine/training.py): the loss, every gradient and
the metrics TRL logs are those of TRL's own DPOTrainer step on the same model and batch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import make_pairs, make_tiny_llama
from trl import DPOTrainer

import prefsift.engine.training as training
from prefsift.config import EngineConfig
from prefsift.engine.logps import compute_logps
from prefsift.models import LoadedModel, lora_config
from prefsift.train import TrainConfig, make_trainer, train

# TRL's metrics the packed forward must reproduce: from the summed log-probs, and from the completion positions'
# logits (entropy, logits/*, mean_token_accuracy)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")
RTOL = 1e-5  # fp32: the two layouts reduce in another order, nothing else


def _rows(n: int = 8, seed: int = 41, conversational: bool = False) -> list[dict]:
    rows = make_pairs(n, seed=seed)
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return rows


def _trainers(tokenizer, tmp_path, rows, *, max_length: int = 64, lora: bool = False, checkpointing: bool = False,
              dtype: str = "float32", weights=None, model_fn=None, micro_batch_tokens: int | None = None):
    """prefsift's DPO trainer and TRL's own DPOTrainer on identical copies of a tiny model (a LoRA adapter made
    non-zero, the same in both), the same arguments, and one batch of prefsift's loader holding every pair."""
    model_fn = model_fn or (lambda: make_tiny_llama(tokenizer, seed=1))
    pairs = Dataset.from_list(rows)
    engine = EngineConfig(max_length=max_length, dtype=dtype)
    # a reference unlike the policy, so the pairs' losses differ (at the policy itself every loss is log 2)
    ref = compute_logps(make_tiny_llama(tokenizer, seed=2), tokenizer, pairs, max_length=max_length)
    config = TrainConfig(batch_size=len(rows), gradient_checkpointing=checkpointing, lora=lora, lora_r=4,
                         lora_alpha=8, micro_batch_tokens=micro_batch_tokens)
    data = pairs if weights is None else pairs.add_column("weight", list(weights))
    torch.manual_seed(0)
    ours, kept = make_trainer(LoadedModel(model_fn(), tokenizer, "t", "x"), data, config, engine,
                              str(tmp_path / "ours"), ref_logps=ref, quiet=True)
    torch.manual_seed(0)
    peft = lora_config(r=4, alpha=8, target_modules="all-linear") if lora else None
    theirs = DPOTrainer(model=model_fn(), args=copy.deepcopy(ours.args), processing_class=tokenizer,
                        train_dataset=pairs.select(kept.tolist()), peft_config=peft)
    if lora:
        with torch.no_grad():
            torch.manual_seed(3)
            for name, parameter in ours.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.3)
        theirs.model.load_state_dict(ours.model.state_dict())
    if checkpointing:  # as Trainer.train() turns it on
        for trainer in (ours, theirs):
            trainer.model.activation_checkpointing_enable(ours.args.activation_checkpointing_kwargs)
    batch = next(iter(ours.get_train_dataloader()))
    assert len(batch["ref_chosen_logps"]) == len(kept)
    return ours, theirs, batch


def _step(trainer, batch, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """One loss and its gradients, as a training step computes them (the model in training mode; under bf16 the
    model's forward autocast by accelerate as `train` prepares it), and the metrics TRL recorded for it."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # TRL's num_tokens counts across steps
    if autocast:
        model = trainer.accelerator.prepare_model(model)
    inputs = {k: v.clone() for k, v in batch.items()}
    if not isinstance(trainer, training_trainer_type()):
        inputs.pop("weight", None)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grads, metrics


def training_trainer_type():
    from prefsift.train import _DPOTrainerWithReferenceLogps

    return _DPOTrainerWithReferenceLogps


def _differences(a, b) -> dict[str, float]:
    """The largest relative differences: of the loss, of any gradient (|a - b| over the tensor's largest element)
    and of any metric."""
    grads = max(float((a[1][n] - b[1][n]).abs().max()) / max(float(b[1][n].abs().max()), 1e-30) for n in b[1])
    metrics = max((abs(a[2][k] - b[2][k]) / max(abs(b[2][k]), 1e-30) for k in METRICS if k in b[2]), default=0.0)
    return {"loss": abs(a[0] - b[0]) / abs(b[0]), "grads": grads, "metrics": metrics}


def _assert_same(a, b, rtol: float = RTOL, metrics: bool = True) -> None:
    assert a[0] == pytest.approx(b[0], rel=rtol)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in b[1]:
        # an element that cancels to near zero keeps an absolute error of a few ε times the tensor's scale
        # (tests/test_train.py's reasoning): atol is rtol/10 of the tensor's largest element
        scale = float(b[1][name].abs().max())
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=rtol / 10 * scale, msg=name)
    if metrics:
        for key in METRICS:
            assert a[2][key] == pytest.approx(b[2][key], rel=rtol, abs=rtol / 10), key


@pytest.mark.parametrize("case", ["plain", "lora", "checkpointing", "lora+checkpointing", "truncated",
                                  "conversational", "chunked head", "chunked head+checkpointing"])
def test_packed_step_is_trls_step(bpe_tokenizer, tmp_path, one_thread, monkeypatch, case):
    options = {"plain": {}, "lora": {"lora": True}, "checkpointing": {"checkpointing": True},
               "lora+checkpointing": {"lora": True, "checkpointing": True}, "truncated": {"max_length": 30},
               "conversational": {}, "chunked head": {},
               "chunked head+checkpointing": {"checkpointing": True}}[case]
    head_chunks = []
    if case.startswith("chunked head"):
        # the LM head in chunks of 7 positions, each recomputed in the backward pass (its logits are not kept):
        # the gradients and TRL's per-token metrics still come out exactly, in order
        monkeypatch.setattr(training, "HEAD_ELEMENTS", 7 * len(bpe_tokenizer))
        real = training._chunk_logps
        monkeypatch.setattr(training, "_chunk_logps", lambda *a: head_chunks.append(a[4]) or real(*a))
    rows = _rows(conversational=case == "conversational", n=12 if case == "truncated" else 8)
    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, rows, **options)
    assert ours.model.is_activation_checkpointing == case.endswith("checkpointing")
    if case == "truncated":  # some pairs dropped (prompt fills max_length), some completions cut by TRL's collator
        assert len(batch["ref_chosen_logps"]) < len(rows)
        assert int(batch["attention_mask"].sum(1).max()) == 30
    mine, trls = _step(ours, batch), _step(theirs, batch)
    assert ours._prefsift_packed is True
    _assert_same(mine, trls)
    assert mine[0] > 0.01 and abs(mine[0] - 0.6931) > 1e-3  # a real loss, not log 2
    if head_chunks:  # several chunks, each run twice: forward, then again in the backward pass
        chunks = sorted(set(head_chunks))
        assert len(chunks) > 3 and sorted(head_chunks) == sorted(chunks * 2)


def test_weighted_packed_step_is_the_weighted_step_on_trls_forward(bpe_tokenizer, tmp_path, one_thread):
    """Per-pair weights (no plain TRL counterpart): the packed forward against the same trainer on TRL's forward."""
    weights = [0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.0, 0.0]
    ours, _, batch = _trainers(bpe_tokenizer, tmp_path, _rows(), weights=weights)
    packed = _step(ours, batch)
    assert ours._prefsift_packed is True
    ours._prefsift_packed = False  # the trainer's own fallback: TRL's forward
    _assert_same(packed, _step(ours, batch))


def test_bf16_autocast_step_is_close_to_trls(bpe_tokenizer, tmp_path, one_thread):
    """Under bf16 autocast (fp32 master weights) each layout rounds its own matmuls and its attention reduces over
    another set of keys (the padded rows' against the packed row's masked ones): the values agree to bf16's
    precision, not fp32's. Bound: 2% relative on the loss, the metrics and on each gradient's largest element;
    an fp32 run of the same batch agrees to 1e-5 (above)."""
    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, _rows(), dtype="bfloat16")
    assert ours.args.bf16
    fp32_trl = _step(theirs, batch)  # before accelerate puts autocast on the model's forward, for good
    mine, trls = _step(ours, batch, autocast=True), _step(theirs, batch, autocast=True)
    assert abs(trls[0] - fp32_trl[0]) > 1e-6  # autocast did act on TRL's forward
    # and on the packed one (which goes around the model's autocast-wrapped forward): far closer to TRL's bf16 loss
    # than TRL's fp32 loss is (measured: 8.7e-8 relative against 3.7e-5; gradients 1.0% of each tensor's scale)
    assert abs(mine[0] - trls[0]) < abs(fp32_trl[0] - trls[0]) / 10
    diff = _differences(mine, trls)
    assert diff["loss"] < 0.02 and diff["grads"] < 0.02 and diff["metrics"] < 0.02, diff


def test_the_packed_forward_is_what_runs(bpe_tokenizer, tmp_path, one_thread, monkeypatch):
    calls = []
    real = training._head_logps
    monkeypatch.setattr(training, "_head_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, _, batch = _trainers(bpe_tokenizer, tmp_path, _rows())
    _step(ours, batch)
    assert len(calls) == 1
    # and through a whole train(): one packed pass a step, no warning
    calls.clear()
    config = TrainConfig(batch_size=4, epochs=1, gradient_checkpointing=False, learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = train(LoadedModel(make_tiny_llama(bpe_tokenizer, seed=1), bpe_tokenizer, "t", "x"),
                       Dataset.from_list(_rows()), config, EngineConfig(max_length=64, dtype="float32"), quiet=True)
    assert result.steps == 2 and len(calls) == 2


def test_a_wrong_mask_breaks_the_equality(bpe_tokenizer, tmp_path, one_thread, monkeypatch):
    """The equality above is not vacuous: the packed layout with a plain causal mask (the rejected tokens seeing
    the chosen ones) no longer matches TRL's step."""
    real = training.packed_batch

    def leaky(model, pairs, pad_id):
        batch = real(model, pairs, pad_id)
        mask = batch.inputs["attention_mask"]
        causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
        batch.inputs["attention_mask"] = torch.where(causal, torch.zeros_like(mask), mask)
        return batch

    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, _rows())
    trls = _step(theirs, batch)
    _assert_same(_step(ours, batch), trls)  # the real mask: equal
    monkeypatch.setattr(training, "packed_batch", leaky)
    wrong = _step(ours, batch)
    assert ours._prefsift_packed is True  # still the packed path, now with the leaky mask
    with pytest.raises(AssertionError):
        _assert_same(wrong, trls)
    with pytest.raises(AssertionError):  # the loss alone already tells
        _assert_same(wrong, trls, metrics=False)


def test_a_model_the_packed_forward_does_not_hold_for_trains_on_trls_forward(bpe_tokenizer, tmp_path, one_thread,
                                                                              monkeypatch):
    """A sliding-window config (the packed forward supplies its own mask): TRL's own forward, one warning, the
    same step."""
    calls = []
    real = training._head_logps
    monkeypatch.setattr(training, "_head_logps", lambda *a, **k: calls.append(1) or real(*a, **k))

    def windowed():
        model = make_tiny_llama(bpe_tokenizer, seed=1)
        model.config.sliding_window = 8
        return model

    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, _rows(), model_fn=windowed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = _step(ours, batch)
        _step(ours, batch)  # the verdict is kept: no second warning
    said = [w for w in caught if "runs TRL's own forward" in str(w.message)]
    assert len(said) == 1 and "does not reproduce" in str(said[0].message)
    assert ours._prefsift_packed is False and calls == []
    _assert_same(mine, _step(theirs, batch))


def test_rows_past_the_engines_long_pair_limit_train_on_trls_forward(bpe_tokenizer, tmp_path, one_thread,
                                                                     monkeypatch):
    """A packed row's block mask grows with the square of its width (up to twice TRL's row): past the engine's own
    limit (LONG_PAIR_TOKENS, lowered here to this batch's size) the step runs TRL's forward, says so, and is TRL's."""
    from prefsift.engine import tokenize

    calls = []
    real = training._head_logps
    monkeypatch.setattr(training, "_head_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, _rows())
    monkeypatch.setattr(tokenize, "LONG_PAIR_TOKENS", 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mine = _step(ours, batch)
    assert calls == [] and any("training forward on TRL's layout" in str(w.message) for w in caught)
    _assert_same(mine, _step(theirs, batch))


def _training_step(trainer, batch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """One whole training step as transformers' loop runs it (`Trainer.training_step`: forward, loss, backward), the
    gradients it left and the one entry a metric TRL recorded for it."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs = {k: v.clone() for k, v in batch.items()}
    if not isinstance(trainer, training_trainer_type()):
        inputs.pop("weight", None)
    loss = trainer.training_step(model, inputs)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert all(len(v) == 1 for v in trainer._metrics["train"].values())  # one entry a step, as TRL records
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("case", ["plain", "lora", "checkpointing", "lora+checkpointing", "truncated", "ipo",
                                  "sigmoid_norm", "hinge+sigmoid"])
def test_micro_batched_step_is_trls_step(bpe_tokenizer, tmp_path, one_thread, case):
    """A step over the token budget runs its pairs in micro-batches of unequal sizes, each forward and backward at
    once: the loss, every gradient and the metrics TRL logs are its own step's on the whole batch, for TRL's loss
    types that are a mean over pairs (ipo and sigmoid_norm read each row's completion length)."""
    options = {"lora": {"lora": True}, "checkpointing": {"checkpointing": True},
               "lora+checkpointing": {"lora": True, "checkpointing": True},
               "truncated": {"max_length": 30}}.get(case, {})
    rows = _rows(n=12 if case == "truncated" else 8)
    ours, theirs, batch = _trainers(bpe_tokenizer, tmp_path, rows, micro_batch_tokens=1, **options)
    if case in ("ipo", "sigmoid_norm", "hinge+sigmoid"):
        for trainer in (ours, theirs):
            trainer.loss_types = case.split("+")
            trainer.loss_weights = [1.0, 0.5][:len(trainer.loss_types)]
    widths = training._pair_widths(ours, batch["attention_mask"], batch["completion_mask"])
    per_part = next(k for k in (3, 2, 4) if len(widths) % k)  # so many pairs or so a micro-batch: 3, 3, 2 of 8
    ours.micro_batch_tokens = per_part * max(widths)
    parts = training.micro_batches(ours, batch)
    assert len(parts) >= 3 and sum(int(p.counts["pairs"]) for p in parts) == len(widths)
    assert len({p.counts["pairs"] for p in parts}) > 1  # unequal parts: a plain mean of their metrics would differ
    assert all(p.counts["pairs"] * max(widths) <= ours.micro_batch_tokens or p.counts["pairs"] == 1 for p in parts)
    mine, trls = _training_step(ours, batch), _training_step(theirs, batch)
    assert ours.micro_batches == len(parts)
    _assert_same(mine, trls)
    assert mine[0] > 0.01 and abs(mine[0] - 0.6931) > 1e-3


def test_micro_batched_weighted_step_is_the_whole_weighted_step(bpe_tokenizer, tmp_path, one_thread):
    """Per-pair weights normalise over the whole batch (Σ wᵢℓᵢ / Σ wᵢ), not over each micro-batch: a micro-batch
    whose weights are all 0 adds nothing, and the step equals the uncut one."""
    weights = [0.5, 2.0, 0.0, 0.0, 3.0, 0.25, 1.0, 0.0]
    ours, _, batch = _trainers(bpe_tokenizer, tmp_path, _rows(), weights=weights)
    whole = _training_step(ours, batch)
    assert ours.micro_batches == 0
    ours.micro_batch_tokens = 2 * max(training._pair_widths(ours, batch["attention_mask"], batch["completion_mask"]))
    cut = _training_step(ours, batch)
    assert ours.micro_batches >= 3
    _assert_same(cut, whole)


def test_a_batch_within_the_budget_or_a_batch_level_loss_is_not_cut(bpe_tokenizer, tmp_path, one_thread):
    ours, _, batch = _trainers(bpe_tokenizer, tmp_path, _rows(), micro_batch_tokens=10**6)
    assert len(training.micro_batches(ours, batch)) == 1
    ours.micro_batch_tokens = 1
    assert len(training.micro_batches(ours, batch)) == 8  # one pair a micro-batch at the least
    ours.loss_types = ["aot"]  # sorts the batch's log-ratios: its loss is no mean over pairs
    assert len(training.micro_batches(ours, batch)) == 1


def test_micro_batched_token_metrics_weigh_their_own_tokens(bpe_tokenizer, tmp_path, one_thread, monkeypatch):
    """The per-token metrics of a cut step average over the tokens TRL averages them over (mean_token_accuracy over
    the chosen completions' tokens, entropy over both): made to vary across micro-batches (top-1 read as "the target
    token's id is even"; a random tiny model's real top-1 is ~0 everywhere), they equal the uncut step's."""
    real = training._HeadStats.record

    def record(self, lo, logits, logps, targets):
        real(self, lo, logits, logps, targets)
        entropy, mean, _ = self.chunks[lo]
        self.chunks[lo] = (entropy, mean, targets % 2 == 0)

    monkeypatch.setattr(training._HeadStats, "record", record)
    ours, _, batch = _trainers(bpe_tokenizer, tmp_path, _rows(n=7), micro_batch_tokens=10**6)
    whole = _training_step(ours, batch)
    ours.micro_batch_tokens = 3 * max(training._pair_widths(ours, batch["attention_mask"], batch["completion_mask"]))
    parts = training.micro_batches(ours, batch)
    assert len(parts) == 3 and 0 < whole[2]["mean_token_accuracy"] < 1
    cut = _training_step(ours, batch)
    assert ours.micro_batches == 3
    _assert_same(cut, whole)
