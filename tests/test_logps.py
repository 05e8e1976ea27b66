"""The log-prob engine against TRL's own reference pass, and its resume behaviour."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_pairs
from datasets import Dataset
from test_scorers import naive_logp
from trl import DPOConfig, DPOTrainer

from prefsift.logps import LogpsRun, compute_logps, tokenize_pairs


def trl_reference_logps(model, tokenizer, rows: list[dict], max_length: int, tmp_path) -> dict[str, tuple]:
    """TRL 1.16's `precompute_ref_log_probs` pass, keyed by a row index column TRL carries through."""
    data = Dataset.from_list([{**r, "row": i} for i, r in enumerate(rows)])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), precompute_ref_log_probs=True, bf16=False, use_cpu=True,
                     max_length=max_length, per_device_train_batch_size=4, report_to="none",
                     remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    out = trainer.train_dataset
    return {r: (c, j) for r, c, j in zip(out["row"], out["ref_chosen_logps"], out["ref_rejected_logps"],
                                           strict=True)}


@pytest.mark.parametrize("max_length", [None, 24])
def test_matches_trl_precompute_ref_log_probs(bpe_tokenizer, tiny_llama, tmp_path, max_length):
    rows = make_pairs(24, seed=1)
    rows.append({"prompt": "\n\nHuman: " + "why " * 30 + "\n\nAssistant:", "chosen": " no", "rejected": " yes"})
    trl_max = max_length if max_length is not None else 10_000
    reference = trl_reference_logps(tiny_llama, bpe_tokenizer, rows, trl_max, tmp_path)
    ours = compute_logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows), max_length=max_length,
                         batch_tokens=300)
    for i in range(len(rows)):
        if i not in reference:  # TRL dropped it: its prompt alone fills max_length
            assert np.isnan(ours[i]).all()
            continue
        np.testing.assert_allclose(ours[i], reference[i], rtol=1e-4)
    if max_length is not None:
        assert len(reference) < len(rows)  # the long-prompt row was dropped by both
    assert len(reference) == int((~np.isnan(ours[:, 0])).sum())


def test_conversational_matches_trl(bpe_tokenizer, tiny_llama, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in make_pairs(10, seed=2)]
    reference = trl_reference_logps(tiny_llama, bpe_tokenizer, rows, 10_000, tmp_path)
    ours = compute_logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows), max_length=None)
    for i in range(len(rows)):
        np.testing.assert_allclose(ours[i], reference[i], rtol=1e-4)


def test_tokens_merged_across_the_boundary_match_trl(bpe_tokenizer, tiny_llama, tmp_path):
    """A prompt ending inside a word: its last token merges with the completion's first ("Ġc" + "a" | "t" →
    "Ġcat"), so the completion starts where the tokenized prompt and prompt + completion stop matching."""
    rows = [{"prompt": "\n\nHuman: tell me about the ca", "chosen": "t sat on the mat", "rejected": "t ran far"},
            {"prompt": "\n\nHuman: is the do", "chosen": "g big", "rejected": "g small"},
            {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " no"}]
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], None)
    alone = [bpe_tokenizer(r["prompt"])["input_ids"] for r in rows]
    assert len(tokenized[0].prompt_ids) < len(alone[0]) and len(tokenized[1].prompt_ids) < len(alone[1])  # merged
    assert tokenized[2].prompt_ids == alone[2]  # no merge at a word boundary
    reference = trl_reference_logps(tiny_llama, bpe_tokenizer, rows, 10_000, tmp_path)
    ours = compute_logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows), max_length=None)
    for i in range(len(rows)):
        np.testing.assert_allclose(ours[i], reference[i], rtol=1e-4)


def test_batching_does_not_change_values(bpe_tokenizer, tiny_llama):
    data = Dataset.from_list(make_pairs(20, seed=3))
    one_at_a_time = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=1)
    batched = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=4096)
    np.testing.assert_allclose(one_at_a_time, batched, rtol=1e-5)


def test_tokenization_drops_long_prompts_and_truncates(bpe_tokenizer):
    pairs = tokenize_pairs(bpe_tokenizer, ["a b c d e f g", "a"], [" x y z", " x y z"], [" q", " q"], 5)
    assert pairs[0] is None
    assert len(pairs[1].prompt_ids) + len(pairs[1].chosen_ids) <= 5
    assert pairs[1].chosen_ids[-1] != bpe_tokenizer.eos_token_id  # EOS was cut with the tail, as TRL cuts it


def test_resume_skips_finished_shards(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch):
    data = Dataset.from_list(make_pairs(30, seed=4))
    run = LogpsRun(tmp_path, "policy", {"model": "tiny", "max_length": None})
    full = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=200, flush_rows=8, run=run)
    shards = sorted(run.shard_dir.glob("*.parquet"))
    assert len(shards) >= 3
    kept_rows = sum(len(pq.read_table(p)) for p in shards[:2])
    # Simulate a run killed after two shards: delete the rest, then count the forward passes of the rerun.
    for path in shards[2:]:
        path.unlink()
    import prefsift.logps as engine

    calls = []
    original = engine._forward_batch
    monkeypatch.setattr(engine, "_forward_batch", lambda m, p, pad: calls.append(len(p)) or original(m, p, pad))
    resumed = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=200, flush_rows=8,
                            run=run)
    np.testing.assert_array_equal(resumed, full)  # identical, not merely close: same batches, same padding
    assert sum(calls) == 30 - kept_rows  # only the missing shards' pairs were recomputed
    # Another identity (say another max_length) never reuses these shards.
    other = LogpsRun(tmp_path, "policy", {"model": "tiny", "max_length": 64})
    assert other.shard_dir != run.shard_dir


def test_a_kill_loses_at_most_the_batches_since_the_last_flush(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch):
    """Shards flush by time as well as by rows: a run killed at 60% keeps what it finished before the kill."""
    import prefsift.logps as engine

    data = Dataset.from_list(make_pairs(40, seed=6))
    kwargs = {"max_length": None, "batch_tokens": 150, "flush_rows": 10**6, "flush_seconds": 0.0}
    uninterrupted = compute_logps(tiny_llama, bpe_tokenizer, data, **kwargs)
    n_batches = len(engine.BatchPlan.of(engine.tokenize_pairs(bpe_tokenizer, data["prompt"], data["chosen"],
                                                              data["rejected"], None), 150).batches)
    assert n_batches >= 5
    run = LogpsRun(tmp_path, "policy", {"model": "tiny"})
    original, calls = engine._forward_batch, []

    def killed_at_60_percent(model, pairs, pad):
        if len(calls) == int(0.6 * n_batches):
            raise KeyboardInterrupt
        calls.append(len(pairs))
        return original(model, pairs, pad)

    monkeypatch.setattr(engine, "_forward_batch", killed_at_60_percent)
    with pytest.raises(KeyboardInterrupt):
        compute_logps(tiny_llama, bpe_tokenizer, data, run=run, **kwargs)
    done_before_kill = sum(calls)
    monkeypatch.setattr(engine, "_forward_batch", lambda m, p, pad: calls.append(len(p)) or original(m, p, pad))
    resumed = compute_logps(tiny_llama, bpe_tokenizer, data, run=run, **kwargs)
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert sum(calls) - done_before_kill == 40 - done_before_kill  # the resume computed only the rest
    # A corrupt (0-byte) shard is recomputed, not trusted and not blocking.
    victim = sorted(run.shard_dir.glob("*.parquet"))[0]
    victim.write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable shard"):
        again = compute_logps(tiny_llama, bpe_tokenizer, data, run=run, **kwargs)
    np.testing.assert_array_equal(again, uninterrupted)


def test_a_model_whose_packed_forward_fails_falls_back(bpe_tokenizer):
    """ALiBi models (Bloom) build their bias from a 2-D mask: the packed path raises, and the engine falls back to
    the model's own forward with one warning, giving the textbook values."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, n_layer=2, n_head=4,
                                         pad_token_id=bpe_tokenizer.pad_token_id)).eval()
    rows = make_pairs(6, seed=14)
    with pytest.warns(UserWarning, match="packed forward"):
        got = compute_logps(model, bpe_tokenizer, Dataset.from_list(rows), max_length=None)
    expected = [[naive_logp(model, bpe_tokenizer, r["prompt"], r[side]) for side in ("chosen", "rejected")]
                for r in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_model_scores(bpe_tokenizer, tiny_llama):
    from prefsift.models import add_lora

    data = Dataset.from_list(make_pairs(5, seed=5))
    before = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    peft_model = add_lora(tiny_llama, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    after = compute_logps(peft_model, bpe_tokenizer, data, max_length=None)
    assert not np.allclose(before, after)  # the adapter is applied on the fast path
    with peft_model.disable_adapter():
        np.testing.assert_allclose(compute_logps(peft_model, bpe_tokenizer, data, max_length=None), before,
                                   rtol=1e-5)


def test_unpacked_path_agrees_with_packed(bpe_tokenizer, tiny_llama):
    from prefsift.logps import can_pack, logps_of_tokenized

    rows = make_pairs(12, seed=6)
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], None)
    assert can_pack(tiny_llama)
    packed = logps_of_tokenized(tiny_llama, tokenized, pad_id=bpe_tokenizer.pad_token_id, packed=True)
    unpacked = logps_of_tokenized(tiny_llama, tokenized, pad_id=bpe_tokenizer.pad_token_id, packed=False)
    np.testing.assert_allclose(packed, unpacked, rtol=1e-5)


def test_sliding_window_model_takes_the_unpacked_path_and_matches_trl(bpe_tokenizer, tmp_path):
    """A block mask of our own would override the model's sliding window: such models must not be packed."""
    from transformers import MistralConfig, MistralForCausalLM

    from prefsift.logps import can_pack

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                           eos_token_id=bpe_tokenizer.eos_token_id, pad_token_id=bpe_tokenizer.pad_token_id)
    model = MistralForCausalLM(config).eval()
    assert not can_pack(model)
    rows = make_pairs(8, seed=13)
    reference = trl_reference_logps(model, bpe_tokenizer, rows, 10_000, tmp_path)
    ours = compute_logps(model, bpe_tokenizer, Dataset.from_list(rows), max_length=None)
    np.testing.assert_allclose(ours, np.array([reference[i] for i in range(len(rows))]), rtol=1e-4)


def test_a_packed_path_that_disagrees_falls_back(bpe_tokenizer, tiny_llama, monkeypatch):
    import prefsift.logps as engine

    data = Dataset.from_list(make_pairs(6, seed=14))
    right = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    original = engine._forward_batch
    monkeypatch.setattr(engine, "_forward_batch", lambda m, p, pad: tuple(x + 1.0 for x in original(m, p, pad)))
    engine._PACKED_OK.clear()  # checked once a model and process: forget the check the first pass made
    with pytest.warns(UserWarning, match="packed forward disagrees"):
        fallback = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    np.testing.assert_allclose(fallback, right, rtol=1e-5)


def test_a_very_long_pair_goes_alone_through_the_causal_kernel(bpe_tokenizer, tiny_llama, monkeypatch):
    """A pair longer than LONG_PAIR_TOKENS is never packed (its mask would grow with the square of its length): it
    runs alone, unmasked, with the LM head on its completion only, and gives the same log-probs."""
    import prefsift.logps as engine

    data = Dataset.from_list(make_pairs(12, seed=9))
    expected = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    monkeypatch.setattr(engine, "LONG_PAIR_TOKENS", 30)
    widths, long_calls = [], []
    packed, long = engine._forward_batch, engine._forward_long
    monkeypatch.setattr(engine, "_forward_batch", lambda m, pairs, pad: (widths.append(max(map(len, pairs))),
                                                                         packed(m, pairs, pad))[1])
    monkeypatch.setattr(engine, "_forward_long", lambda m, pair: (long_calls.append(len(pair)), long(m, pair))[1])
    got = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=60)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert long_calls and min(long_calls) > 30 and max(widths) <= 30  # every long pair alone, none packed


def test_a_max_length_that_drops_every_pair_is_refused(bpe_tokenizer, tiny_llama):
    from prefsift.errors import PrefsiftError

    data = Dataset.from_list(make_pairs(5, seed=2))
    with pytest.raises(PrefsiftError, match="max_length 3 drops all 5 pairs"):
        compute_logps(tiny_llama, bpe_tokenizer, data, max_length=3)
