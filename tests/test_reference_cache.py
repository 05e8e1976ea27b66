"""The log-prob cache across commands (prefsift.reference.cached_logps): one pass per (model, data, max_length,
precision), found again by content; any change misses; a damaged or foreign entry is recomputed, never trusted;
the values read back equal a fresh computation of the engine with no cache at all."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, make_pairs, saved_tiny_llama, write_jsonl

from prefsift.config import EngineConfig
from prefsift.data import load_pairs
from prefsift.engine import Engine
from prefsift.models import load_model
from prefsift.reference import CACHE_ENV, cache_dir, reference_logps


@pytest.fixture
def counted(monkeypatch):
    """Every engine log-prob pass, counted (a read from the cache runs none)."""
    calls: list[int] = []
    original = Engine.logps

    def logps(self, model, tokenizer, pairs, **kwargs):
        calls.append(len(pairs))
        return original(self, model, tokenizer, pairs, **kwargs)

    monkeypatch.setattr(Engine, "logps", logps)
    return calls


@pytest.fixture
def ws(tmp_path, bpe_tokenizer, one_thread):
    model = saved_tiny_llama(tmp_path / "sft", bpe_tokenizer)
    other = saved_tiny_llama(tmp_path / "other", bpe_tokenizer, seed=3)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24, seed=2))
    return model, other, data


def fresh(model_dir, data, max_length=1024) -> np.ndarray:
    """The engine's own pass, no cache involved: what a read-back entry must equal."""
    from prefsift.engine.logps import compute_logps  # not through Engine.logps: `counted` counts only the commands'

    loaded = load_model(str(model_dir))
    return compute_logps(loaded.model, loaded.tokenizer, load_pairs(str(data)).pairs, max_length=max_length)


def test_the_default_cache_is_under_the_users_cache_and_can_be_moved_or_disabled(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "prefsift"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "prefsift"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    for off in ("off", "0", "false", "OFF"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_dir() is None


@pytest.mark.e2e
def test_train_score_and_eval_share_one_reference_pass(ws, tmp_path, counted):
    model, _, data = ws
    trained = tmp_path / "trained"
    result = invoke("train", "--data", data, "--model", model, "--out", trained, "--batch-size", 8,
                    "--no-gradient-checkpointing")
    assert result.exit_code == 0, result.output
    assert counted == [24]  # the reference pass, which the policy (its own reference) shares
    result = invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", tmp_path / "scores")
    assert result.exit_code == 0, result.output
    assert counted == [24]  # policy and reference are the SFT model: read back, no pass
    result = invoke("eval", "--data", data, "--model", trained, "--reference", model, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert counted == [24, 24]  # the trained policy's pass only; the reference's is read back
    scores = pq.read_table(tmp_path / "scores" / "scores.parquet").to_pydict()
    expected = fresh(model, data)
    np.testing.assert_array_equal(np.stack([scores["ref_chosen_logps"], scores["ref_rejected_logps"]], axis=1),
                                  expected)
    np.testing.assert_array_equal(np.stack([scores["chosen_logps"], scores["rejected_logps"]], axis=1), expected)


def test_another_model_data_or_max_length_misses_and_the_same_hits(ws, tmp_path, counted):
    model, other, data = ws
    engine = EngineConfig()
    sft = load_model(str(model))
    pairs = load_pairs(str(data)).pairs
    first = reference_logps(sft, pairs, engine)
    again = reference_logps(load_model(str(model)), load_pairs(str(data)).pairs, engine)  # a new process's objects
    assert len(counted) == 1
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh(model, data))

    reference_logps(load_model(str(other)), pairs, engine)  # another model
    rows = make_pairs(24, seed=2)
    rows[5]["chosen"] += " more"
    changed = load_pairs(str(write_jsonl(tmp_path / "changed.jsonl", rows))).pairs
    reference_logps(sft, changed, engine)  # one pair's text changed
    short = reference_logps(sft, pairs, EngineConfig(max_length=24))  # another max_length
    assert len(counted) == 4
    np.testing.assert_array_equal(short, fresh(model, data, max_length=24))
    reference_logps(sft, pairs, EngineConfig(max_length=24))
    assert len(counted) == 4


def test_a_model_changed_in_memory_after_loading_misses(ws, counted):
    model, _, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    before = reference_logps(sft, pairs, EngineConfig())
    with torch.no_grad():  # as a training in place would: the files' fingerprint stays, the weights do not
        next(sft.model.parameters()).mul_(1.5)
    after = reference_logps(sft, pairs, EngineConfig())
    assert len(counted) == 2 and not np.allclose(before, after)


def test_a_model_without_a_content_fingerprint_is_never_cached(ws, tmp_path, counted):
    model, _, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    sft.source, sft.fingerprint = f"{model}#warmup", "recipe-hash"  # as run's copies trained in memory are named
    reference_logps(sft, pairs, EngineConfig())
    reference_logps(sft, pairs, EngineConfig())
    assert len(counted) == 2 and not list(cache_dir().rglob("*.parquet"))


def _entry():
    (path,) = cache_dir().rglob("*.parquet")
    return path


@pytest.mark.parametrize("damage", ["garbage", "truncated", "values", "foreign"])
def test_a_damaged_or_foreign_entry_is_recomputed_with_a_warning(ws, tmp_path, counted, damage):
    model, other, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    expected = reference_logps(sft, pairs, EngineConfig())
    path = _entry()
    if damage == "garbage":
        path.write_bytes(b"not a parquet file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "values":  # the same metadata, one value changed: the checksum no longer holds
        table = pq.read_table(path)
        chosen = table["chosen_logps"].to_numpy().copy()
        chosen[3] += 1.0
        pq.write_table(table.set_column(0, "chosen_logps", pa.array(chosen)), path)
    else:  # another model's entry put in this one's place
        saved = path.read_bytes()
        path.unlink()
        reference_logps(load_model(str(other)), pairs, EngineConfig())
        (foreign,) = cache_dir().rglob("*.parquet")
        foreign.rename(path)
        assert path.read_bytes() != saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = reference_logps(load_model(str(model)), pairs, EngineConfig())
    assert any("ignoring" in str(w.message) and str(path) in str(w.message) for w in caught), [
        str(w.message) for w in caught]
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(reference_logps(sft, pairs, EngineConfig()), expected)  # rewritten whole
    assert len(counted) == (3 if damage == "foreign" else 2)  # the foreign entry's own pass, then this one's again


def test_a_disabled_or_unwritable_cache_computes_every_time(ws, tmp_path, monkeypatch, counted):
    model, _, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    monkeypatch.setenv(CACHE_ENV, "off")
    reference_logps(sft, pairs, EngineConfig())
    reference_logps(sft, pairs, EngineConfig())
    assert len(counted) == 2
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocked))  # not a directory: the pass goes on, with one warning
    with pytest.warns(UserWarning, match="could not write the log-prob cache"):
        values = reference_logps(sft, pairs, EngineConfig())
    np.testing.assert_array_equal(values, fresh(model, data))
    assert blocked.read_text() == ""


def test_entries_record_what_they_were_made_from(ws, counted):
    model, _, data = ws
    reference_logps(load_model(str(model)), load_pairs(str(data)).pairs, EngineConfig(max_length=64))
    record = json.loads(pq.read_schema(_entry()).metadata[b"prefsift.logps"])
    identity = record["identity"]
    assert identity["max_length"] == 64 and identity["n_pairs"] == 24 and identity["dtype"] == "torch.float32"
    assert identity["model"] == load_model(str(model)).fingerprint


def test_chat_messages_and_a_model_without_a_chat_template_is_one_line_before_any_pass(ws, counted):
    from prefsift.errors import DataError

    model, _, data = ws
    sft = load_model(str(model))
    sft.tokenizer.chat_template = None
    with pytest.raises(DataError, match=f"the model {model} has no chat template"):
        reference_logps(sft, load_pairs(str(data), chat_template=True).pairs, EngineConfig())
    assert counted == []


def test_a_cached_pass_is_charged_what_it_cost_when_computed(ws):
    """A compute column charges a pass what it costs, not how warm the cache was: a hit reports the seconds the
    pass took when it was computed, and says it was read."""
    import time

    from prefsift.reference import cached_logps

    model, _, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    values = np.arange(2.0 * len(pairs)).reshape(-1, 2) * -1.0

    def slow():
        time.sleep(0.4)
        return values

    def never():
        raise AssertionError("a cached pass was recomputed")

    first: dict = {}
    np.testing.assert_array_equal(cached_logps(sft, pairs, EngineConfig(), slow, cost=first), values)
    hit: dict = {}
    np.testing.assert_array_equal(cached_logps(sft, pairs, EngineConfig(), never, cost=hit), values)
    assert first["cached"] is False and first["seconds"] >= 0.4
    assert hit["cached"] is True and hit["seconds"] == pytest.approx(first["seconds"])
    assert hit["cpu_seconds"] == pytest.approx(first["cpu_seconds"])


def test_a_run_charges_a_cached_reference_pass_what_it_cost_and_times_what_it_took(ws):
    """Resources keeps both: `charged` (what the pass costs, from the entry on a hit: the compute column's) and
    `seconds` (what this process spent on it: the score summary's times that add up)."""
    from prefsift.resources import Resources

    model, _, data = ws
    first = Resources(load_pairs(str(data)), EngineConfig(), {"policy": str(model)})
    first.logps("policy")
    again = Resources(load_pairs(str(data)), EngineConfig(), {"policy": str(model)})
    again.logps("policy")
    assert again.charged["policy"] == first.charged["policy"]  # the computed pass's cost, read back
    assert again.seconds["policy"] < first.charged["policy"][0]  # a read, timed as what it took


def test_the_layout_and_the_engines_code_are_part_of_a_pass_identity(ws, monkeypatch):
    """Another layout computes the pass another way (its own rounding): it misses; so does another engine's code
    under the same version number (a fix between two commits must not be served the old numbers)."""
    import prefsift.reference as reference

    model, _, data = ws
    sft, pairs = load_model(str(model)), load_pairs(str(data)).pairs
    padded = reference.pass_identity(sft, pairs, EngineConfig())
    assert padded != reference.pass_identity(sft, pairs, EngineConfig(layout="jagged"))
    monkeypatch.setattr(reference, "engine_code_digest", lambda: "another engine")
    assert padded != reference.pass_identity(sft, pairs, EngineConfig())
