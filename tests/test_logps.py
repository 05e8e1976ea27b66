"""The log-prob engine against TRL's own reference pass, and its resume behaviour."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from helpers import make_pairs, naive_logp, random_text
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from prefsift.engine.logps import compute_logps
from prefsift.engine.shards import LogpsRun
from prefsift.engine.tokenize import tokenize_pairs


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
    import prefsift.engine.paths as paths

    calls = []
    original = paths.forward_batch
    monkeypatch.setattr(paths, "forward_batch", lambda m, p, *a: calls.append(len(p)) or original(m, p, *a))
    resumed = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=200, flush_rows=8,
                            run=run)
    np.testing.assert_array_equal(resumed, full)  # identical, not merely close: same batches, same padding
    assert sum(calls) == 30 - kept_rows  # only the missing shards' pairs were recomputed
    # Another identity (say another max_length) never reuses these shards.
    other = LogpsRun(tmp_path, "policy", {"model": "tiny", "max_length": 64})
    assert other.shard_dir != run.shard_dir


def test_a_kill_loses_at_most_the_batches_since_the_last_flush(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch):
    """Shards flush by time as well as by rows: a run killed at 60% keeps what it finished before the kill."""
    import prefsift.engine.paths as paths
    import prefsift.engine.tokenize as tokenize

    data = Dataset.from_list(make_pairs(40, seed=6))
    kwargs = {"max_length": None, "batch_tokens": 150, "flush_rows": 10**6, "flush_seconds": 0.0}
    uninterrupted = compute_logps(tiny_llama, bpe_tokenizer, data, **kwargs)
    n_batches = len(tokenize.BatchPlan.of(tokenize.tokenize_pairs(bpe_tokenizer, data["prompt"], data["chosen"],
                                                              data["rejected"], None), 150).batches)
    assert n_batches >= 5
    run = LogpsRun(tmp_path, "policy", {"model": "tiny"})
    original, calls = paths.forward_batch, []

    def killed_at_60_percent(model, pairs, *args):
        if len(calls) == int(0.6 * n_batches):
            raise KeyboardInterrupt
        calls.append(len(pairs))
        return original(model, pairs, *args)

    monkeypatch.setattr(paths, "forward_batch", killed_at_60_percent)
    with pytest.raises(KeyboardInterrupt):
        compute_logps(tiny_llama, bpe_tokenizer, data, run=run, **kwargs)
    done_before_kill = sum(calls)
    monkeypatch.setattr(paths, "forward_batch", lambda m, p, *a: calls.append(len(p)) or original(m, p, *a))
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
    from prefsift.engine.paths import can_pack, logps_of_tokenized

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

    from prefsift.engine.paths import can_pack

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
    import prefsift.engine.paths as paths

    data = Dataset.from_list(make_pairs(6, seed=14))
    right = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    original = paths._forward_batch
    monkeypatch.setattr(paths, "_forward_batch", lambda m, p, pad: tuple(x + 1.0 for x in original(m, p, pad)))
    paths.VERDICTS.packed.clear()  # checked once a model and process: forget the check the first pass made
    with pytest.warns(UserWarning, match="packed forward disagrees"):
        fallback = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    np.testing.assert_allclose(fallback, right, rtol=1e-5)


def test_a_very_long_pair_goes_alone_through_the_causal_kernel(bpe_tokenizer, tiny_llama, monkeypatch):
    """A pair longer than LONG_PAIR_TOKENS is never packed (its mask would grow with the square of its length): it
    runs alone, unmasked, with the LM head on its completion only, and gives the same log-probs."""
    import prefsift.engine.paths as paths
    import prefsift.engine.tokenize as tokenize

    data = Dataset.from_list(make_pairs(12, seed=9))
    expected = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    monkeypatch.setattr(tokenize, "LONG_PAIR_TOKENS", 30)
    widths, long_calls = [], []
    packed, long = paths._forward_batch, paths._forward_long
    monkeypatch.setattr(paths, "_forward_batch", lambda m, pairs, pad: (widths.append(max(map(len, pairs))),
                                                                         packed(m, pairs, pad))[1])
    monkeypatch.setattr(paths, "_forward_long", lambda m, pair: (long_calls.append(len(pair)), long(m, pair))[1])
    got = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None, batch_tokens=60)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert long_calls and min(long_calls) > 30 and max(widths) <= 30  # every long pair alone, none packed


def test_a_max_length_that_drops_every_pair_is_refused(bpe_tokenizer, tiny_llama):
    from prefsift.errors import PrefsiftError

    data = Dataset.from_list(make_pairs(5, seed=2))
    with pytest.raises(PrefsiftError, match="max_length 3 drops all 5 pairs"):
        compute_logps(tiny_llama, bpe_tokenizer, data, max_length=3)


# ---- issue 10: every execution path against TRL on both data shapes, the chunked head's memory, long pairs


def transcript_pairs(n: int, seed: int) -> list[dict]:
    """Multi-turn transcripts: long shared prompts, short responses (HH-RLHF's shape)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = "".join(f"\n\nHuman: {random_text(rng, rng.randint(3, 12))}\n\nAssistant: "
                        f"{random_text(rng, rng.randint(3, 12))}" for _ in range(rng.randint(1, 4)))
        rows.append({"prompt": turns + "\n\nHuman: " + random_text(rng, 5) + "\n\nAssistant:",
                     "chosen": " " + random_text(rng, rng.randint(1, 8)),
                     "rejected": " " + random_text(rng, rng.randint(1, 8))})
    return rows


def instruction_pairs(n: int, seed: int) -> list[dict]:
    """Instructions: short prompts, long responses of very different lengths."""
    rng = random.Random(seed)
    return [{"prompt": "\n\nHuman: " + random_text(rng, rng.randint(1, 4)) + "\n\nAssistant:",
             "chosen": " " + random_text(rng, rng.randint(10, 70)),
             "rejected": " " + random_text(rng, rng.randint(10, 70))} for _ in range(n)]


SHAPES = {"transcripts": transcript_pairs, "instructions": instruction_pairs}
_TRL: dict = {}  # TRL's pass once per shape and max_length: the tiny_llama fixture is the same seeded model each time


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("path", ["packed", "cached", "flex", "jagged"])
@pytest.mark.parametrize("max_length", [None, 48])
def test_every_path_matches_trl_on_both_shapes(bpe_tokenizer, tiny_llama, tmp_path, monkeypatch, one_thread, shape,
                                               path, max_length):
    """The packed, cached-prefix and unpadded (flex block mask, jagged documents) paths, each with the LM head in
    chunks (7 positions at a time) and the cached path's queries in chunks of 16 positions, give TRL's own reference
    log-probs at 1e-4 relative; with max_length
    48 responses are cut (instructions) and long transcripts dropped, as TRL cuts and drops them."""
    import prefsift.engine.forward as forward
    import prefsift.engine.paths as paths

    rows = SHAPES[shape](16, seed=31)
    if (shape, max_length) not in _TRL:
        _TRL[shape, max_length] = trl_reference_logps(tiny_llama, bpe_tokenizer, rows, max_length or 10_000, tmp_path)
    reference = _TRL[shape, max_length]
    monkeypatch.setattr(forward, "HEAD_ELEMENTS", 7 * len(bpe_tokenizer))
    monkeypatch.setattr(forward, "QUERY_CHUNK", 16)
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], max_length)
    ours = paths.logps_of_tokenized(tiny_llama, tokenized, pad_id=bpe_tokenizer.pad_token_id, batch_tokens=300,
                                     path=path)
    assert sorted(reference) == [i for i in range(len(rows)) if not np.isnan(ours[i, 0])]  # same pairs kept
    np.testing.assert_allclose(ours[sorted(reference)], [reference[i] for i in sorted(reference)], rtol=1e-4)
    if max_length is not None and shape == "instructions":
        assert any(len(t.chosen_ids) + len(t.prompt_ids) == max_length for t in tokenized if t is not None)  # cut
    if max_length is not None and shape == "transcripts":
        assert 0 < len(reference) < len(rows)  # some prompts alone fill max_length: dropped by both


def test_cached_path_with_an_empty_prompt_and_one_token_completions(bpe_tokenizer, tiny_llama):
    """Left-padded prompts next to an empty one (its row fully masked in the prompt pass) and completions of one
    token (nothing fed after the prompt): the cached path still gives the packed path's values, never NaN."""
    from prefsift.engine.forward import _forward_batch, _forward_batch_cached
    from prefsift.engine.tokenize import TokenizedPair

    rows = make_pairs(6, seed=32)
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], None)
    tokenized += [TokenizedPair([], tokenized[0].chosen_ids, tokenized[1].rejected_ids),
                  TokenizedPair(tokenized[2].prompt_ids, tokenized[0].chosen_ids[:1], tokenized[1].rejected_ids[:1])]
    pad = bpe_tokenizer.pad_token_id
    cached = torch.stack(_forward_batch_cached(tiny_llama, tokenized, pad, chunk=5))
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, torch.stack(_forward_batch(tiny_llama, tokenized, pad)), rtol=1e-5, atol=1e-5)


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any torch op allocates inside the block, in bytes (views of existing storage excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def large_vocabulary_llama(tokenizer) -> LlamaForCausalLM:
    """Vocabulary 50,000 and hidden size 16: the LM head's logits dwarf everything else the forward allocates."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50_000, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.mark.parametrize("path", ["packed", "cached"])
def test_the_head_memory_is_bounded_and_flat_in_the_number_of_pairs(bpe_tokenizer, tmp_path, one_thread, path,
                                                                     monkeypatch):
    """With a 50k vocabulary, the largest tensor of a pass stays within the head's chunk (HEAD_ELEMENTS floats) for
    8 pairs as for 64, where the full-vocabulary logits of one batch are over 5× larger; and the values are still
    TRL's."""
    import prefsift.engine.forward as forward
    import prefsift.engine.paths as paths

    model = large_vocabulary_llama(bpe_tokenizer)
    rows = instruction_pairs(64, seed=33)
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], None)
    pad = bpe_tokenizer.pad_token_id
    monkeypatch.setattr(forward, "HEAD_ELEMENTS", 1 << 18)  # 1 MiB of fp32 logits: 5 positions at a time

    def largest(pairs: list) -> tuple[int, np.ndarray]:
        with LargestAllocation() as seen:
            values = paths.logps_of_tokenized(model, pairs, pad_id=pad, batch_tokens=1024, path=path)
        return seen.largest, values

    few, values = largest(tokenized[:8])
    many, _ = largest(tokenized)
    bound = 2 << 20  # the head's 1 MiB chunk and its log-softmax, the packed batch's mask: within 2 MiB
    assert few <= bound and many <= bound, (few, many)
    monkeypatch.setattr(forward, "HEAD_ELEMENTS", 1 << 40)  # the measurement can fail: no chunks, full logits
    unchunked_few, _ = largest(tokenized[:8])
    unchunked_many, _ = largest(tokenized)
    assert unchunked_few > 5 * bound and unchunked_many > 5 * bound, (unchunked_few, unchunked_many)
    reference = trl_reference_logps(model, bpe_tokenizer, rows[:8], 10_000, tmp_path)
    np.testing.assert_allclose(values, [reference[i] for i in range(8)], rtol=1e-4)


def test_a_long_pair_on_the_cached_path_needs_no_square_mask(bpe_tokenizer, tiny_llama, one_thread):
    """A 3,000-token pair: the packed path's mask is width² (36 MB in fp32); the cached path's largest tensor is a
    small fraction of it (queries 256 at a time), with the same log-probs."""
    from prefsift.engine.forward import _forward_batch, _forward_batch_cached
    from prefsift.engine.tokenize import TokenizedPair

    rng = random.Random(34)
    ids = [rng.randrange(2, len(bpe_tokenizer)) for _ in range(3000)]
    pair = TokenizedPair(ids[:1000], ids[1000:2000], ids[2000:])
    pad = bpe_tokenizer.pad_token_id
    with LargestAllocation() as packed_seen:
        packed = torch.stack(_forward_batch(tiny_llama, [pair], pad))
    with LargestAllocation() as cached_seen:
        cached = torch.stack(_forward_batch_cached(tiny_llama, [pair], pad, chunk=256))
    assert packed_seen.largest >= 3000 * 3000 * 4
    assert cached_seen.largest * 4 < packed_seen.largest, (cached_seen.largest, packed_seen.largest)
    torch.testing.assert_close(cached, packed, rtol=1e-4, atol=1e-3)


def test_the_cheaper_path_is_taken_and_a_cached_path_that_disagrees_falls_back(bpe_tokenizer, tiny_llama,
                                                                                 monkeypatch):
    """Long responses after a short prompt cost less on the cached-prefix path (the packed row attends densely over
    both completions), a pair's short and long responses less on the packed path; a cached path that disagrees
    with the model's own forward warns once and the packed path gives the values."""
    import prefsift.engine.paths as paths
    import prefsift.engine.tokenize as tokenize

    def tokenized(rows):
        return [t for t in tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                          [r["rejected"] for r in rows], None) if t is not None]

    long_responses = tokenized([{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " " + "the cat sat " * 60,
                                 "rejected": " " + "a dog ran " * 60}] * 4)
    costs = paths._costs(tiny_llama, long_responses)
    assert costs["cached"] < costs["packed"]
    # a long prompt, one short and one long response: the cached path pads every completion to the longest
    uneven = [tokenize.TokenizedPair([5] * 60, [6] * 2, [7] * 40), tokenize.TokenizedPair([5] * 60, [6] * 40, [7] * 2)]
    costs = paths._costs(tiny_llama, uneven)
    assert costs["packed"] < costs["cached"]

    data = Dataset.from_list(instruction_pairs(6, seed=36))
    right = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    taken = []
    original = paths._forward_batch_cached
    monkeypatch.setattr(paths, "_forward_batch_cached",
                        lambda m, p, pad: taken.append(len(p)) or tuple(x + 1.0 for x in original(m, p, pad)))
    paths.VERDICTS.cached.clear()
    with pytest.warns(UserWarning, match="cached-prefix forward disagrees"):
        fallback = compute_logps(tiny_llama, bpe_tokenizer, data, max_length=None)
    assert taken  # the check ran it
    np.testing.assert_allclose(fallback, right, rtol=1e-5)


def test_tokenized_pairs_are_held_compactly(bpe_tokenizer):
    from prefsift.engine.tokenize import BatchPlan, CompactPairs

    rows = make_pairs(40, seed=6)
    pairs = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                           [r["rejected"] for r in rows], 20)
    assert any(p is None for p in pairs) and any(p is not None for p in pairs)
    compact = CompactPairs([pairs[:15], pairs[15:]])  # in parts, as compute_logps tokenizes
    assert list(compact) == pairs  # the same pairs back, dropped ones None
    assert compact.ids.dtype == np.int32 and compact.ids.nbytes == 4 * sum(len(p) for p in pairs if p is not None)
    assert BatchPlan.of(compact, 64) == BatchPlan.of(pairs, 64)  # the same batches: resume stays exact


# ---- issue 21: the unpadded layout (one flat sequence a batch), chosen through the engine's settings


@pytest.mark.parametrize("layout", ["flex", "jagged"])
def test_the_engine_takes_the_unpadded_layout_it_is_given(bpe_tokenizer, tiny_llama, one_thread, monkeypatch, layout):
    """EngineConfig.layout sends every batch through the flat forward once its check passes on the model (the verdict
    is recorded), and the values are the textbook log-probs of each side."""
    import prefsift.engine.paths as paths
    from prefsift.config import EngineConfig
    from prefsift.engine import Engine

    flat_batches = []
    real = paths._forward_batch_flat
    monkeypatch.setattr(paths, "_forward_batch_flat",
                        lambda model, pairs, kernel, *a: flat_batches.append(kernel) or real(model, pairs, kernel, *a))
    rows = instruction_pairs(10, seed=41)
    engine = Engine(EngineConfig(max_length=None, batch_tokens=200, layout=layout))
    got = engine.logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows))
    assert engine.paths_of(tiny_llama)[layout] is True
    assert flat_batches.count(layout) >= 3  # the check pair, then every batch of the plan
    expected = [[naive_logp(tiny_llama, bpe_tokenizer, r["prompt"], r[side]) for side in ("chosen", "rejected")]
                for r in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_a_flat_forward_that_disagrees_keeps_the_padded_layout(bpe_tokenizer, tiny_llama, one_thread, monkeypatch):
    """An attention the flat layout gets wrong (here: its outputs scaled) fails the check with one warning; the pass
    runs padded and its values stay right."""
    import prefsift.engine.forward as forward
    import prefsift.engine.paths as paths

    real = forward._flat_attention
    monkeypatch.setattr(forward, "_flat_attention", lambda *a, **k: (real(*a, **k)[0] * 1.5, None))
    flat_batches = []
    monkeypatch.setattr(paths, "_forward_batch_flat",
                        lambda *a: flat_batches.append(a) or forward._forward_batch_flat(*a))
    rows = make_pairs(6, seed=42)
    with pytest.warns(UserWarning, match="unpadded flex forward disagrees"):
        got = compute_logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows), max_length=None, layout="flex")
    assert len(flat_batches) == 1  # the check only
    expected = compute_logps(tiny_llama, bpe_tokenizer, Dataset.from_list(rows), max_length=None)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_the_flat_length_padding_of_compiled_flex_changes_no_value(bpe_tokenizer, tiny_llama, one_thread):
    """Compiled flex pads a batch's flat length up to a bucket (a bounded number of compilations): the padding is a
    document of its own that no pair sees, so each pair's log-probs are those of the unpadded batch; the buckets
    are multiples of a sixteenth of the budget, at least 128 tokens."""
    from prefsift.engine.forward import flat_batch, flat_bucket, flat_logps

    assert [flat_bucket(n, 8192) for n in (1, 512, 513, 8000)] == [512, 512, 1024, 8192]
    assert flat_bucket(5, 100) == 128
    assert len({flat_bucket(n, 8192) for n in range(1, 8193)}) == 16
    rows = instruction_pairs(4, seed=43)
    tokenized = tokenize_pairs(bpe_tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows], None)
    with torch.inference_mode():
        tight = flat_logps(tiny_llama, flat_batch(tiny_llama, tokenized, "flex"))
        padded = flat_logps(tiny_llama, flat_batch(tiny_llama, tokenized, "flex", pad_to=flat_bucket(
            sum(len(t) for t in tokenized), 8192)))
    torch.testing.assert_close(padded, tight, rtol=1e-5, atol=1e-5)


def test_the_unpadded_layout_is_refused_on_a_ray_pool():
    from prefsift.config import EngineConfig
    from prefsift.engine import Engine
    from prefsift.errors import ConfigError

    with pytest.raises(ConfigError, match="layout jagged runs in this process only"):
        Engine(EngineConfig(backend="ray", layout="jagged"))


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_table_on_a_cpu(tmp_path):
    """bench/gpu.py, the one command of issue 21, end to end at a tiny shape on a CPU (~2 minutes on a busy box): the
    log-prob table with both floors and the unpadded layouts (their values against TRL's), the influence table with
    the chosen step, the training table (logged losses equal to TRL's), the JSON written with its provenance."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(root / "bench" / "gpu.py"), "--shapes", "tiny", "--device", "cpu", "--dtype",
                    "float32", "--n-pairs", "12", "--max-length", "128", "--influence-pairs", "8", "--n-val", "4",
                    "--train-pairs", "8", "--repeats", "1", "--json", str(out)], check=True, cwd=root,
                   capture_output=True)
    record = json.loads(out.read_text())
    assert record["commit"] and [r["data"] for r in record["logps"]] == ["transcripts", "instructions"]
    for row in record["logps"]:
        assert {"floor (padded)", "floor (unpadded)", "prefsift", "unpadded flex", "unpadded jagged",
                "TRL"} <= set(row["seconds"])
        assert set(row["unpadded_max_relative_difference_to_trl"]) == {"flex", "jagged"}
        assert max(row["unpadded_max_relative_difference_to_trl"].values()) < 1e-4
    (influence,) = record["influence"]
    assert influence["chosen_step"] in [float(k) for k in influence["chosen_step_errors"]]
    assert influence["accuracy"]["one-sided (chosen step)"][0] >= 0.95
    (training,) = record["training"]
    assert training["max_loss_difference"] is not None and training["max_loss_difference"] < 1e-4
