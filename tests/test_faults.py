"""Every bad input and every fault, through the CLI: a non-zero exit, exactly one line of error, no traceback, and
the results an earlier run left behind still there, whole. A fault injected at random points of a run always
leaves either the old results or the new ones, complete."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, make_pairs, make_tiny_llama


def one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line holding every fragment; returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory) -> dict[str, bytes]:
    """Every result file of a directory by name (caches and shards aside): what must survive a failed rerun."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _save_reward_model(path, tokenizer, num_labels: int):
    """A 1-layer Llama sequence classifier with `num_labels` score outputs, saved with the tokenizer at `path`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, bpe_tokenizer):
    """A tiny SFT model, a tiny reward model (a trained-looking score head in its weights) and 30 pairs."""
    root = tmp_path_factory.mktemp("faults")
    torch.set_num_threads(1)
    model = root / "sft"
    make_tiny_llama(bpe_tokenizer).save_pretrained(model)
    bpe_tokenizer.save_pretrained(model)
    torch.manual_seed(1)
    reward = _save_reward_model(root / "rm", bpe_tokenizer, num_labels=1)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(30, seed=5)))
    return root, model, reward, data


# ------------------------------------------------------------------ bad option values: one line, before any work


@pytest.mark.parametrize(("args", "fragment"), [
    (("score", "--method", "random", "--device", "cuda0"), "--device must look like cpu, cuda"),
    (("score", "--method", "random", "--batch-tokens", "0"), "--batch-tokens must be >= 1"),
    (("score", "--method", "irm", "--beta", "nan"), "--beta must be a finite number"),
    (("score", "--method", "random", "--max-length", "abc"), "Invalid value for '--max-length'"),
    (("score", "--method", "random", "--seed", "-1"), "--seed must be >= 0"),
    (("score", "--method", "random", "--param", "x=1"), "unknown option(s) x"),
    (("eval", "--eval-prompts", "-1"), "--eval-prompts must be >= 1"),
    (("eval", "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("eval", "--batch-size", "0"), "--batch-size must be >= 1"),
    (("eval", "--max-length", "0"), "--max-length must be >= 2"),
    (("train", "--learning-rate", "nan"), "--learning-rate must be a finite number"),
    (("train", "--epochs", "0"), "--epochs must be > 0"),
    (("train", "--epochs", "-1"), "--epochs must be > 0"),
])
def test_bad_option_values(ws, tmp_path, args, fragment):
    root, model, _, data = ws
    command, *rest = args
    extra = ("--model", model) if command in ("eval", "train") or "irm" in rest else ()
    one_line_error(invoke(command, "--data", data, "--out", tmp_path / "o", *extra, *rest), fragment)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize(("yaml", "fragment"), [
    ("seed: true\n", "seed must be an integer (got True)"),
    (f"seed: {2**70}\n", "seed must be <= 4294967295"),  # torch's manual_seed overflows past 64 bits
    ("seed: -1\n", "seed must be >= 0"),
    ("max_length: .nan\n", "max_length must be an integer"),
    ("device: gpu\n", "device must look like cpu"),
    ("methd: irm\n", "unknown option 'methd'"),
])
def test_bad_config_values(ws, tmp_path, yaml, fragment):
    _, _, _, data = ws
    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    one_line_error(invoke("score", "--data", data, "--out", tmp_path / "o", "--method", "random", "--config", config),
                   fragment)


def test_usage_errors_and_a_config_that_is_not_utf8(ws, tmp_path):
    _, _, _, data = ws
    one_line_error(invoke("score", "--data", data), "Missing option '--out'", "score --help")
    one_line_error(invoke("scroe"), "No such command 'scroe'")
    config = tmp_path / "c.yaml"
    config.write_bytes(b"seed: \xff\n")
    one_line_error(invoke("score", "--data", data, "--out", tmp_path / "o", "--config", config), "not UTF-8")


def test_cuda_on_a_machine_without_one(ws, tmp_path, monkeypatch):
    _, model, _, data = ws
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(invoke("score", "--data", data, "--out", tmp_path / "o", "--method", "irm", "--model", model,
                          "--device", "cuda:1"), "torch sees no CUDA GPU", "--device cpu")


# ------------------------------------------------------------------ settings that would drop or NaN most pairs


def test_a_max_length_that_drops_most_pairs_stops_and_keeps_earlier_results(ws, tmp_path):
    root, model, _, data = ws
    out = tmp_path / "scores"
    assert invoke("score", "--data", data, "--out", out, "--method", "irm", "--model", model).exit_code == 0
    before = snapshot(out)
    one_line_error(invoke("score", "--data", data, "--out", out, "--method", "irm", "--model", model,
                          "--max-length", "2"), "every one of the 30 pairs would be dropped", "max_length 2")
    # a max_length between most prompts' lengths: more than half dropped stops unless asked for
    tokens = sorted(len(t) for t in _prompt_tokens(model, data))
    middle = tokens[len(tokens) // 4]  # about three quarters of the prompts reach it
    one_line_error(invoke("score", "--data", data, "--out", out, "--method", "irm", "--model", model,
                          "--max-length", middle), "of 30 pairs would be dropped", "--allow-dropped")
    assert snapshot(out) == before
    result = invoke("score", "--data", data, "--out", tmp_path / "allowed", "--method", "irm", "--model", model,
                    "--max-length", middle, "--allow-dropped")
    assert result.exit_code == 0, result.output
    dropped = [json.loads(line) for line in (tmp_path / "allowed" / "dropped.jsonl").read_text().splitlines()]
    n = sum(t >= middle for t in tokens)
    assert n > 15 and len(dropped) == n and f"{n} left out" in result.output
    assert {d["stage"] for d in dropped} == {"score"} and all(d["reason"] == f"prompt fills max_length {middle}"
                                                              for d in dropped)
    irm = pq.read_table(tmp_path / "allowed" / "scores.parquet").to_pydict()
    assert sum(np.isnan(irm["irm"])) == n and {d["pair_id"] for d in dropped} == {
        p for p, v in zip(irm["pair_id"], irm["irm"], strict=True) if np.isnan(v)}


def _prompt_tokens(model, data):
    from prefsift.models import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    return [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in data.read_text().splitlines()]


def test_non_finite_scores_are_reported_by_row(tmp_path):
    rows = make_pairs(6, seed=3)
    for row, chosen in zip(rows, [1.0, float("inf"), 2.0, None, 3.0, -float("inf")], strict=True):
        row["score_chosen"], row["score_rejected"] = chosen, 0.5
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes Infinity, as pandas does
    result = invoke("score", "--data", data, "--out", tmp_path / "m", "--method", "margin")
    assert result.exit_code == 0, result.output
    assert "3 left out" in result.output
    dropped = [json.loads(line) for line in (tmp_path / "m" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["row"], d["reason"]) for d in dropped] == [
        (2, "non-finite score margin=inf"), (4, "non-finite score margin=nan"), (6, "non-finite score margin=-inf")]
    margin = pq.read_table(tmp_path / "m" / "scores.parquet")["margin"].to_pylist()
    assert margin[0] == 0.5 and all(np.isnan(margin[i]) for i in (1, 3, 5))  # never ranked first, never null


# ------------------------------------------------------------------ output location, checked first


def test_output_location_is_checked_before_any_work(ws, tmp_path, monkeypatch):
    root, model, _, data = ws
    afile = tmp_path / "afile"
    afile.write_text("x")
    score = ("score", "--data", data, "--method", "random", "--out")
    one_line_error(invoke(*score, afile), "is a file: give a directory")
    one_line_error(invoke(*score, afile / "sub"), f"is under {afile}, which is a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    one_line_error(invoke(*score, mine), "not empty and holds no prefsift score results")
    assert (mine / "notes.txt").read_text() == "my notes"
    scored = tmp_path / "scored"
    assert invoke(*score, scored).exit_code == 0
    before = snapshot(scored)
    one_line_error(invoke("eval", "--data", data, "--model", model, "--out", scored), "holds the results of "
                                                                                       "`prefsift score`, not eval")
    one_line_error(invoke("train", "--data", data, "--model", model, "--out", scored), "not train")
    one_line_error(invoke("select", "--scores", scored, "--out", scored, "--fraction", 0.5), "not select")
    assert snapshot(scored) == before

    import prefsift.output

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(prefsift.output.os, "open", read_only)
    one_line_error(invoke(*score, tmp_path / "ro"), "is not writable (Permission denied)")


def test_a_lock_stops_a_second_run_and_a_dead_runs_lock_is_taken_over(ws, tmp_path):
    _, _, _, data = ws
    out = tmp_path / "locked"
    lock = tmp_path / ".locked.lock"
    import socket

    lock.write_text(f"{os.getppid()} {socket.gethostname()}")  # a live process holds it
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", out),
                   f"is being written by process {os.getppid()}")
    assert not out.exists()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    lock.write_text(f"{dead} {socket.gethostname()}")
    result = invoke("score", "--data", data, "--method", "random", "--out", out)
    assert result.exit_code == 0, result.output
    assert not lock.exists()  # released after the run


# ------------------------------------------------------------------ atomic replace, and faults at random points


def _score_files(directory) -> tuple[int, list]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return manifest["seed"], pq.read_table(directory / "scores.parquet")["random"].to_pylist()


def test_disk_full_while_writing_keeps_the_earlier_results(ws, tmp_path, monkeypatch):
    _, _, _, data = ws
    out = tmp_path / "s"
    assert invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 1).exit_code == 0
    before = snapshot(out)
    import prefsift.manifest

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prefsift.manifest, "_write_text", full)
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 2),
                   "the disk is full", "earlier results there are unchanged")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging directory, no lock left behind


FILES = {"scores.parquet", "pairs.parquet", "dropped.jsonl", "manifest.json"}


@pytest.mark.parametrize("seed", range(8))
def test_a_fault_at_a_random_point_leaves_old_or_new_results_whole(ws, tmp_path, monkeypatch, seed):
    """A write, a rename or the scorer fails at the k-th call of a run (k drawn per seed over every such call a
    clean run makes): the directory then holds exactly the old results or exactly the new ones."""
    import pathlib

    import pyarrow.parquet

    import prefsift.manifest
    import prefsift.scorers.random

    _, _, _, data = ws
    reference = {}
    for s in (1, 2):  # what old (seed 1) and new (seed 2) results look like, written undisturbed
        assert invoke("score", "--data", data, "--method", "random", "--out", tmp_path / f"ref{s}", "--seed",
                      s).exit_code == 0
        reference[s] = _score_files(tmp_path / f"ref{s}")
    out = tmp_path / "s"
    shutil.copytree(tmp_path / "ref1", out)
    points = [(pyarrow.parquet, "write_table"), (pyarrow.parquet.ParquetWriter, "write_table"),
              (prefsift.manifest, "_write_text"), (pathlib.Path, "rename"), (pathlib.Path, "mkdir"),
              (prefsift.scorers.random.RandomScorer, "score")]
    calls = {"n": 0, "fail_at": None}

    def wrap(original):
        def counted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise OSError(errno.ENOSPC, "No space left on device") if calls["n"] % 2 else RuntimeError("crash")
            return original(*args, **kwargs)
        return counted

    for owner, name in points:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    assert invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "count", "--seed",
                  2).exit_code == 0
    total = calls["n"]
    calls.update(n=0, fail_at=random.Random(seed).randint(1, total))
    result = invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 2)
    assert result.exit_code != 0
    assert {p.name for p in out.iterdir()} == FILES
    seed_found, values = _score_files(out)
    assert values == reference[seed_found][1], "a mix of old and new results"
    if seed_found == 2:  # the new results are complete: every file of the new run
        assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ref1", "ref2", "count", "s"])  # nothing stray
    calls["fail_at"] = None
    assert invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 2).exit_code == 0
    assert _score_files(out) == reference[2]


def test_a_kill_between_the_two_renames_is_recovered(ws, tmp_path):
    """A kill after the old directory was moved aside and before the new one took its place: the next run (under
    the lock) brings the old one back first; a dead run's staging directory is removed."""
    _, _, _, data = ws
    out = tmp_path / "s"
    assert invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 1).exit_code == 0
    before = snapshot(out)
    (out / "shards").mkdir()
    (out / "shards" / "kept.txt").write_text("resumable")
    out.rename(tmp_path / ".s.old-99999-abcd")
    (tmp_path / ".s.staging-99999-ef01").mkdir()
    from prefsift.output import locked

    with locked(out):
        assert snapshot(out) == before and (out / "shards" / "kept.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 2).exit_code == 0
    assert (out / "shards" / "kept.txt").read_text() == "resumable"  # caches move into the new directory


def test_a_kill_after_a_runs_renames_carries_only_its_caches(tmp_path):
    """`run` carries only the caches into its new directory: a kill after both renames, before the old directory's
    caches moved, must not let the next lock move an old seed folder in beside the new results."""
    from prefsift.output import CACHE_ENTRIES, commit, locked

    out, staging = tmp_path / "run", tmp_path / ".run.staging-1-aa"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "old.txt").write_text("the old run's second seed")
    (out / "shards").mkdir()
    (out / "shards" / "kept.txt").write_text("resumable")
    staging.mkdir()
    (staging / "results.json").write_text("new")

    import prefsift.output

    real = prefsift.output._move_missing
    prefsift.output._move_missing = lambda *a, **k: (_ for _ in ()).throw(SystemExit("killed"))
    try:
        with pytest.raises(SystemExit):
            commit(staging, out, CACHE_ENTRIES)
    finally:
        prefsift.output._move_missing = real
    with locked(out):  # the next run's lock repairs the swap
        pass
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "shards"]
    assert (out / "shards" / "kept.txt").read_text() == "resumable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------ corrupt shard, content fingerprint


def test_a_zero_byte_shard_is_recomputed_and_resume_gives_the_same_values(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFSIFT_CACHE", "off")  # the shards' own resume, not the cross-command cache, is under test
    _, model, _, data = ws
    out = tmp_path / "s"
    args = ("score", "--data", data, "--method", "irm", "--model", model, "--out", out)
    assert invoke(*args).exit_code == 0
    values = pq.read_table(out / "scores.parquet").to_pydict()
    shards = sorted((out / "shards").rglob("*.parquet"))
    assert shards
    shards[0].write_bytes(b"")  # a kill mid-write on a filesystem without atomic rename
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out / "scores.parquet").to_pydict() == values
    assert shards[0].stat().st_size > 0  # recomputed and rewritten


def test_weights_rewritten_under_the_same_name_size_and_time_are_not_stale(ws, tmp_path):
    _, model, _, data = ws
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    out = tmp_path / "s"
    args = ("score", "--data", data, "--method", "random,irm", "--model", copy, "--out", out)
    assert invoke(*args).exit_code == 0
    before = pq.read_table(out / "scores.parquet")["chosen_logps"].to_pylist()
    from safetensors.torch import load_file, save_file

    weights = copy / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 1.5  # same names, same size
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert invoke(*args).exit_code == 0
    after = pq.read_table(out / "scores.parquet")["chosen_logps"].to_pylist()
    assert not np.allclose(before, after)  # computed anew, not read from the old model's shards


# ------------------------------------------------------------------ models that are not what they claim


def test_a_causal_lm_as_reward_model_or_judge_is_refused(ws, tmp_path):
    _, model, _, data = ws
    one_line_error(invoke("score", "--data", data, "--method", "margin", "--reward-model", model, "--out",
                          tmp_path / "m"), "no SequenceClassification head in its weights", "score.weight")
    one_line_error(invoke("eval", "--data", data, "--model", model, "--reference", model, "--judge-model", model,
                          "--out", tmp_path / "e", "--eval-prompts", 2, "--max-new-tokens", 2),
                   "no SequenceClassification head")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_truncated_weights_and_pickled_adapters_are_one_line(ws, tmp_path):
    _, model, _, data = ws
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", broken, "--out", tmp_path / "o"),
                   f"cannot load model from '{broken}'")
    for name, content in (("bad.gguf", b"not a gguf file at all"), ("cut.gguf", b"GGUF\x03\x00\x00\x00")):
        (tmp_path / name).write_bytes(content)  # a wrong file, and a GGUF cut after its version
        one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", tmp_path / name, "--out",
                              tmp_path / "o"), f"cannot load model from '{tmp_path / name}'")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", adapter, "--out", tmp_path / "o"),
                   "no adapter_model.safetensors", "safetensors only")


def test_fp16_on_a_cpu_is_warned_about_in_one_line(ws, tmp_path):
    _, model, _, data = ws
    from prefsift.models import load_model

    with pytest.warns(UserWarning, match="float16 on a CPU"):
        load_model(str(model), device="cpu", dtype="float16")
    result = invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", tmp_path / "o",
                    "--device", "cpu", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "float16 on a CPU" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "UserWarning" not in result.output


def test_offline_is_detected_at_once(monkeypatch, tmp_path, ws):
    import socket
    import time

    import prefsift.models

    _, _, _, data = ws
    monkeypatch.setattr(prefsift.models, "_HUB_REACHABLE", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    line = one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", "prefsift-tests/no-model",
                                 "--out", tmp_path / "o"), "the hub is unreachable (offline)")
    assert time.monotonic() - start < 10 and "prefsift-tests/no-model" in line
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


# ------------------------------------------------------------------ rows that are not what they claim


def test_conversational_rows_with_wrong_roles_are_dropped_with_their_reason(tmp_path):
    def m(role, text):
        return {"role": role, "content": text}

    good = [{"prompt": [m("user", f"hi {i}")], "chosen": [m("assistant", "yes sure")],
             "rejected": [m("assistant", f"no {i}")]} for i in range(3)]
    rows = [good[0], {"prompt": [m("user", "hi")], "chosen": [m("user", "yes")], "rejected": [m("assistant", "n")]},
            good[1], {"prompt": "a string", "chosen": "x", "rejected": [1]}, good[2]]
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert "scored 3 pairs (2 left out" in " ".join(result.output.split())
    dropped = [json.loads(line) for line in (tmp_path / "s" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["row"], d["stage"]) for d in dropped] == [(2, "data"), (4, "data")]
    assert dropped[0]["reason"].startswith("chosen response is not an assistant turn")
    pairs = pq.read_table(tmp_path / "s" / "pairs.parquet")
    assert pairs["chosen"].to_pylist()[0] == [m("assistant", "yes sure")]  # messages, not JSON strings


@pytest.mark.parametrize(("content", "fragment"), [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",, }\n', "line 2, column 16: invalid JSON"),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xe9"}\n', "line 2: not UTF-8 text"),
    ("[" * 50_000 + "]" * 50_000 + "\n", "line 1: JSON nested too deeply"),
])
def test_data_errors_name_the_line(tmp_path, content, fragment):
    data = tmp_path / "d.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o"), fragment)


def test_a_typod_prompt_key_says_the_column_is_missing(ws, tmp_path):
    _, _, _, data = ws
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o", "--prompt-key",
                          "question"), "missing column 'question'", "--prompt-key")


# ------------------------------------------------------------------ the reward pass keeps its work


def test_reward_scores_survive_a_failed_output_and_are_stored_per_side(ws, tmp_path, monkeypatch):
    _, _, reward, data = ws
    out = tmp_path / "m"
    import prefsift.manifest

    original = prefsift.manifest._write_text

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prefsift.manifest, "_write_text", full)
    args = ("score", "--data", data, "--method", "margin", "--reward-model", reward, "--out", out)
    one_line_error(invoke(*args), "the disk is full")
    assert list((out / "shards").rglob("*.parquet"))  # the computed rewards are kept
    monkeypatch.setattr(prefsift.manifest, "_write_text", original)
    import prefsift.engine.reward

    monkeypatch.setattr(prefsift.engine.reward, "_score_texts", lambda *a, **k: pytest.fail("reward pass recomputed"))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "scores.parquet").to_pydict()
    np.testing.assert_allclose(table["margin"], np.subtract(table["chosen_reward"], table["rejected_reward"]))


KILLER = """
import os, signal, sys
import pathlib, pyarrow.parquet, prefsift.manifest
calls, at = [0], int(sys.argv[1])

def wrap(owner, name):
    original = getattr(owner, name)
    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)  # no except, no finally: what a crash or an OOM kill leaves
        return original(*args, **kwargs)
    setattr(owner, name, counted)

for owner, name in [(pyarrow.parquet, "write_table"), (pyarrow.parquet.ParquetWriter, "write_batch"),
                    (prefsift.manifest, "_write_text"), (pathlib.Path, "rename")]:
    wrap(owner, name)
from prefsift.cli import app
app(sys.argv[2:], prog_name="prefsift")
"""


@pytest.mark.slow
@pytest.mark.parametrize("at", [1, 3, 5, 6])  # 6: between the two renames of the swap
def test_a_kill_at_a_write_leaves_old_or_new_results_after_the_next_lock(ws, tmp_path, at):
    """A real SIGKILL at the at-th write or rename (a subprocess each, ~15 s on a busy 2-core box): once the next
    run takes the lock (which repairs a half-done swap), the directory holds exactly the old or the new results."""
    import subprocess
    import sys

    from prefsift.output import locked

    _, _, _, data = ws
    reference = {}
    for s in (1, 2):
        assert invoke("score", "--data", data, "--method", "random", "--out", tmp_path / f"ref{s}", "--seed",
                      s).exit_code == 0
        reference[s] = _score_files(tmp_path / f"ref{s}")
    out = tmp_path / "s"
    shutil.copytree(tmp_path / "ref1", out)
    done = subprocess.run([sys.executable, "-c", KILLER, str(at), "score", "--data", str(data), "--method", "random",
                           "--out", str(out), "--seed", "2"], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr  # 4 writes and 2 renames a run: the kill happened
    with locked(out):  # the next run into the directory: stale lock taken over, the swap repaired
        assert {p.name for p in out.iterdir()} == FILES
        seed, values = _score_files(out)
        assert values == reference[seed][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref1", "ref2", "s"]


# ------------------------------------------------------------------ select, weigh, export: staged, locked


@pytest.fixture()
def scored(ws, tmp_path):
    _, _, _, data = ws
    out = tmp_path / "scored"
    assert invoke("score", "--data", data, "--method", "random", "--out", out, "--seed", 1).exit_code == 0
    return out


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["select", "weigh"])
def test_select_and_weigh_failing_part_way_keep_the_earlier_subset(scored, tmp_path, monkeypatch, command):
    import prefsift.manifest

    out = tmp_path / "sub"
    args = {"select": ("select", "--scores", scored, "--out", out, "--rule", "top", "--column", "random"),
            "weigh": ("weigh", "--scores", scored, "--out", out, "--column", "random", "--transform", "rank")}[command]
    first = ("--fraction", 0.5) if command == "select" else ()
    assert invoke(*args, *first).exit_code == 0
    before = snapshot(out)
    assert {"selected.jsonl", "selected.parquet", "dropped.jsonl", "manifest.json"} <= set(before)
    # the manifest is the last file written: subset and dropped.jsonl of the new run are already in staging
    monkeypatch.setattr(prefsift.manifest, "_write_text", _full)
    second = ("--fraction", 0.2) if command == "select" else ("--reverse",)
    one_line_error(invoke(*args, *second), "the disk is full", "earlier results there are unchanged")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored", "sub"]  # no staging directory, no lock
    monkeypatch.undo()
    assert invoke(*args, *second).exit_code == 0 and snapshot(out) != before


@pytest.mark.parametrize("command", ["select", "weigh", "export-trl", "export-datasets", "export-llamafactory"])
def test_a_second_writer_is_refused_by_the_lock(scored, tmp_path, command):
    import socket

    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    out = tmp_path / ("x.jsonl" if command == "export-trl" else "x")
    args = {"select": ("select", "--scores", scored, "--out", out, "--rule", "all"),
            "weigh": ("weigh", "--scores", scored, "--out", out, "--column", "random", "--transform", "rank")}.get(
        command, ("export", "--selected", selected, "--out", out, "--format", command.partition("-")[2]))
    (tmp_path / f".{out.name}.lock").write_text(f"{os.getppid()} {socket.gethostname()}")  # a live writer
    one_line_error(invoke(*args), f"is being written by process {os.getppid()}")
    assert not out.exists()
    (tmp_path / f".{out.name}.lock").unlink()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / f".{out.name}.lock").exists()


def test_exports_failing_part_way_keep_the_earlier_files(scored, tmp_path, monkeypatch):
    import pathlib

    import datasets

    import prefsift.export
    import prefsift.manifest

    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    small = tmp_path / "small"
    assert invoke("select", "--scores", scored, "--out", small, "--rule", "top", "--column", "random",
                  "--count", 3).exit_code == 0
    targets = {"trl": tmp_path / "t.jsonl", "datasets": tmp_path / "ds", "llamafactory": tmp_path / "lf"}
    for fmt, target in targets.items():
        assert invoke("export", "--selected", selected, "--out", target, "--format", fmt).exit_code == 0
    before = {fmt: snapshot(t) if t.is_dir() else t.read_bytes() for fmt, t in targets.items()}
    assert len(datasets.load_from_disk(str(targets["datasets"]))) == 30  # manifest.json beside it is harmless

    rows = prefsift.export._rows

    def failing_rows(columns):  # a full disk after two rows of the JSON lines
        for i, row in enumerate(rows(columns)):
            if i == 2:
                _full()
            yield row

    monkeypatch.setattr(prefsift.export, "_rows", failing_rows)
    one_line_error(invoke("export", "--selected", small, "--out", targets["trl"], "--format", "trl"), "cannot write")
    monkeypatch.setattr(prefsift.manifest, "_write_text", _full)  # after save_to_disk wrote the new dataset
    one_line_error(invoke("export", "--selected", small, "--out", targets["datasets"], "--format", "datasets"),
                   "the disk is full", "unchanged")
    replace = pathlib.Path.replace

    def info_fails(self, target):  # the data file is replaced, then dataset_info.json cannot be
        if pathlib.Path(target).name == "dataset_info.json":
            _full()
        return replace(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", info_fails)
    one_line_error(invoke("export", "--selected", small, "--out", targets["llamafactory"], "--format",
                          "llamafactory"), "cannot write")
    monkeypatch.undo()
    assert {fmt: snapshot(t) if t.is_dir() else t.read_bytes() for fmt, t in targets.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "lf", "scored", "sel", "small", "t.jsonl"]
    for fmt, target in targets.items():  # and a rerun replaces each whole
        assert invoke("export", "--selected", small, "--out", target, "--format", fmt).exit_code == 0
    assert len(datasets.load_from_disk(str(targets["datasets"]))) == 3
    assert len(targets["trl"].read_text().splitlines()) == 3
    assert len(json.loads((targets["llamafactory"] / "prefsift_subset.json").read_text())) == 3


def test_select_on_a_column_that_is_not_a_score_is_one_line(scored, tmp_path):
    one_line_error(invoke("select", "--scores", scored, "--out", tmp_path / "s", "--rule", "top", "--column",
                          "pair_id", "--fraction", 0.5), "column 'pair_id' is not a numeric score", "random")
    table = pq.read_table(scored / "scores.parquet")  # a text column beside the scores (a hand-edited file)
    pq.write_table(table.append_column("note", table["pair_id"]), scored / "scores.parquet")
    for command in (("select", "--rule", "top", "--fraction", 0.5), ("weigh", "--transform", "rank")):
        one_line_error(invoke(*command, "--scores", scored, "--out", tmp_path / "s", "--column", "note"),
                       "column 'note' is not a numeric score")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ run and compare: results swapped in whole


def tree(directory) -> dict[str, bytes]:
    """Every file under a run directory by relative path, the resumable shards aside."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "shards" not in p.relative_to(directory).parts}


@pytest.mark.e2e
def test_a_run_failing_part_way_keeps_the_earlier_results_whole_and_its_shards(ws, tmp_path, monkeypatch):
    import socket

    import yaml

    import prefsift.pipeline.run

    _, model, _, data = ws
    out = tmp_path / "run"
    config = {"data": str(data), "model": str(model), "out": str(out), "methods": ["random"], "fractions": [0.5],
              "rule_share": False, "full": False, "start_from": "reference", "test_fraction": 0.4,
              "min_test_pairs": 0, "engine": {"max_length": 64},
              "train": {"learning_rate": 1e-3, "batch_size": 8, "gradient_checkpointing": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    before = tree(out)
    assert {"results.json", "results.md", "timings.json", "manifest.json"} <= set(before)
    assert any(name.startswith("seed-0/selected/") for name in before)
    # a second run, two seeds, fails in the second seed: the first seed's new files are already written (irm: a
    # warm-up model saved under seed-S/models)
    path.write_text(yaml.safe_dump({**config, "seeds": 2, "fractions": [0.25], "methods": ["random", "irm"],
                                    "warmup_fraction": 0.3}))
    run_seed = prefsift.pipeline.run.run_seed

    def second_seed_fails(config, *args, **kwargs):
        if config.seed == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return run_seed(config, *args, **kwargs)

    monkeypatch.setattr(prefsift.pipeline.run, "run_seed", second_seed_fails)
    one_line_error(invoke("run", "--config", path), "the disk is full", "earlier results there are unchanged")
    assert tree(out) == before  # old results, complete, no new seed-0 file and no seed-1
    assert list((out / "shards").rglob("*.parquet"))  # the reference pass is kept for the rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml"]  # no staging directory, no lock
    lock = tmp_path / ".run.lock"
    lock.write_text(f"{os.getppid()} {socket.gethostname()}")  # a second writer while this one runs
    one_line_error(invoke("run", "--config", path), f"is being written by process {os.getppid()}")
    lock.unlink()
    monkeypatch.undo()
    result = invoke("run", "--config", path)
    assert result.exit_code == 0, result.output
    after = tree(out)
    assert {r["seed"] for r in json.loads(after["results.json"])["records"]} == {0, 1}
    assert not any(b".staging-" in content for content in after.values())  # saved models named by their final path
    policy = json.loads(after["seed-1/scores/manifest.json"])["models"]["policy"]["source"]
    assert policy == str(out / "seed-1" / "models" / "warmup") and (out / "seed-1" / "models" / "warmup").is_dir()
    assert not any("selected/random-0.5/" in name for name in after)  # nothing of the old run mixed in
    assert list((out / "shards").rglob("*.parquet"))


# ------------------------------------------------------------------ train says what it left out


@pytest.mark.e2e
def test_train_lists_the_pairs_whose_prompt_fills_max_length_and_says_why(ws, tmp_path):
    from prefsift.models import load_tokenizer

    _, model, _, _ = ws
    rows = make_pairs(8, seed=11)
    tokenizer = load_tokenizer(str(model))
    max_length = max(len(tokenizer(r["prompt"])["input_ids"]) for r in rows) + 8
    rows[3]["prompt"] = " ".join([rows[3]["prompt"]] * 20)  # a prompt far beyond max_length
    assert len(tokenizer(rows[3]["prompt"])["input_ids"]) > max_length
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "p", "chosen": "same", '
                                                                   '"rejected": "same"}\n')
    out = tmp_path / "trained"
    result = invoke("train", "--data", data, "--model", model, "--out", out, "--max-length", max_length,
                    "--batch-size", 4, "--no-gradient-checkpointing")
    assert result.exit_code == 0, result.output
    said = f"trained dpo on 7 of 9 rows (1 pair whose prompt fills max_length {max_length}; 1 invalid input row " \
           f"left out → {out / 'dropped.jsonl'})"
    assert "".join(said.split()) in "".join(result.output.split())  # rich wraps the line, even inside the path
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    from prefsift.data import load_pairs

    long_id = load_pairs(str(data)).pairs[3]["pair_id"]
    assert dropped[0] == {"pair_id": long_id, "row": 4, "stage": "train",
                          "reason": f"prompt fills max_length {max_length}"}
    assert [(d["row"], d["stage"]) for d in dropped[1:]] == [(9, "data")]
    assert json.loads((out / "manifest.json").read_text())["data"]["n_pairs"] == 7


@pytest.mark.e2e
def test_compare_failing_after_its_runs_keeps_the_earlier_table_and_results(ws, tmp_path, monkeypatch):
    import prefsift.compare

    _, model, _, data = ws
    out = tmp_path / "cmp"
    args = ("compare", "--data", data, "--model", model, "--out", out, "--methods", "random,margin", "--seeds", 1,
            "--start-from", "reference", "--no-rule-share", "--no-full", "--test-fraction", 0.4, "--max-length", 64,
            "--learning-rate", 1e-3, "--batch-size", 8, "--no-gradient-checkpointing", "--min-test-pairs", 0)
    rated = tmp_path / "rated.jsonl"  # margin reads the data's own ratings: no extra model
    rated.write_text("".join(json.dumps({**json.loads(line), "score_chosen": float(i % 7), "score_rejected": 3.0})
                             + "\n" for i, line in enumerate(data.read_text().splitlines())))
    args = tuple(rated if a == data else a for a in args)
    assert invoke(*args, "--fractions", 0.5).exit_code == 0
    before = tree(out)
    assert {"compare.md", "compare.json", "results.json"} <= set(before)
    monkeypatch.setattr(prefsift.compare, "mean_seconds", _full)  # the table's turn, after every run finished
    one_line_error(invoke(*args, "--fractions", 0.25), "the disk is full", "earlier results there are unchanged")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp", "rated.jsonl"]


# ------------------------------------------------------------------ user text is printed as it is, never as markup


@pytest.mark.parametrize("name", ["missing[ray].jsonl", "a[/]b.jsonl", "x[bold]y:smile:.jsonl"])
def test_a_path_is_printed_as_it_is(tmp_path, name):
    data = tmp_path / name  # `[/]` would be a markup error (a traceback), `[ray]` a tag that vanishes
    line = one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o"))
    assert line == f"error: file not found: {data}"
    assert not (tmp_path / "o").exists()


def test_an_output_name_and_a_data_rows_role_are_printed_as_they_are(ws, tmp_path):
    _, _, _, data = ws
    taken = tmp_path / "out[/]"  # a file in the way, under a directory named `out[`
    taken.parent.mkdir()
    taken.write_text("mine")
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", taken), f"{taken} is a file")
    assert taken.read_text() == "mine"

    def m(role, text):
        return {"role": role, "content": text}

    rows = [{"prompt": [m("user", "hi")], "chosen": [m("[/]", "x")], "rejected": [m("assistant", "y")]},
            {"prompt": [m("user", "hi")], "chosen": [m("[bold]boss", "x")], "rejected": [m("assistant", "y")]},
            {"prompt": [m("user", "hi")], "chosen": [m("assistant", "x")], "rejected": [m("assistant", "y")]}]
    conv = tmp_path / "roles.jsonl"
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("score", "--data", conv, "--method", "random", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "skipped row 1: unknown role '[/]' in chosen" in said
    assert "skipped row 2: unknown role '[bold]boss' in chosen" in said


def test_an_install_hint_keeps_its_extra(ws, tmp_path, monkeypatch):
    import sys

    _, model, _, data = ws
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails: Ray is not installed
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", tmp_path / "o",
                          "--backend", "ray"), "pip install 'prefsift[ray]'")
    assert not (tmp_path / "o" / "scores.parquet").exists()


# ------------------------------------------------------------------ an export's files never collide


def test_an_export_whose_files_would_be_one_file_is_refused(scored, tmp_path):
    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    lf = tmp_path / "lf"
    lf.mkdir()
    (lf / "dataset_info.json").write_text(json.dumps({"theirs": {"file_name": "theirs.json"}}))
    (lf / "theirs.json").write_text("[]")
    before = snapshot(lf)
    export = ("export", "--selected", selected, "--out", lf, "--format", "llamafactory", "--name")
    for name in ("dataset_info", "Dataset_Info"):  # the data file is the info file (on a case-insensitive disk too)
        one_line_error(invoke(*export, name), f"--name {name} and LLaMA-Factory's dataset_info.json would be one "
                                              f"file", "choose another --name")
    assert snapshot(lf) == before
    # another dataset of dataset_info.json already reads the file this name would write
    info = json.loads((lf / "dataset_info.json").read_text())
    info["mine"] = {"file_name": "prefsift_subset.json"}
    (lf / "dataset_info.json").write_text(json.dumps(info))
    (lf / "prefsift_subset.json").write_text("mine")
    before = snapshot(lf)
    one_line_error(invoke("export", "--selected", selected, "--out", lf, "--format", "llamafactory"),
                   "dataset 'mine' already reads prefsift_subset.json", "choose another --name")
    assert snapshot(lf) == before
    # the subset a jsonl export reads is never its output
    subset = tmp_path / "subset.jsonl"
    shutil.copy(selected / "selected.jsonl", subset)
    kept = subset.read_bytes()
    for fmt in ("trl", "openrlhf", "axolotl"):
        one_line_error(invoke("export", "--selected", subset, "--out", subset, "--format", fmt),
                       "would replace the subset it is exported from")
    assert subset.read_bytes() == kept


# ------------------------------------------------------------------ a training says what it saw, or that it diverged


@pytest.mark.e2e
@pytest.mark.parametrize(("first", "learning_rate", "fragments"), [
    (("--learning-rate", 1e-4), 1e30, ("training diverged after 4 steps", "trainable weights are NaN or inf",
                                       "lower --learning-rate (it is 1e+30)")),
    ((), 1e-20, ("training moved nothing: after 4 steps", "at noise level",  # the default rate moves the model
                 "raise --learning-rate (default 1e-06 for all weights, 5e-05 with --lora)")),
], ids=["diverged", "moved-nothing"])
def test_a_diverged_or_no_op_training_is_an_error_and_keeps_the_earlier_model(ws, tmp_path, first, learning_rate,
                                                                              fragments):
    _, model, _, data = ws
    out = tmp_path / "trained"
    args = ("train", "--data", data, "--model", model, "--out", out, "--batch-size", 8, "--no-gradient-checkpointing")
    assert invoke(*args, *first).exit_code == 0
    before = snapshot(out)
    one_line_error(invoke(*args, "--learning-rate", learning_rate), *fragments)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained"]  # no staging directory, no lock


@pytest.mark.e2e
def test_a_training_that_ends_inside_its_first_epoch_says_how_many_pairs_it_saw(ws, tmp_path):
    _, model, _, data = ws
    out = tmp_path / "short"
    result = invoke("train", "--data", data, "--model", model, "--out", out, "--batch-size", 8,
                    "--no-gradient-checkpointing", "--epochs", 1e-9)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert ("trained dpo on 8 of 30 pairs (--epochs 1e-09 ends after 1 step, 0.25 of an epoch: 22 of the 30 pairs "
            "never seen)") in said
    recorded = json.loads((out / "manifest.json").read_text())["data"]
    assert (recorded["n_pairs"], recorded["rows"], recorded["rows_seen"], recorded["steps"]) == (30, 30, 8, 1)
    # an --epochs below 1 whose steps still round up to the whole epoch trains on every pair, and says so
    result = invoke("train", "--data", data, "--model", model, "--out", tmp_path / "rounded", "--batch-size", 8,
                    "--no-gradient-checkpointing", "--epochs", 0.9)
    assert result.exit_code == 0, result.output
    assert "trained dpo on 30 pairs in" in " ".join(result.output.split())


# ------------------------------------------------------------------ a model's NaN is the model's, never "too long"


def _broken_copy(model, directory, how: str, token: int | None = None):
    """A copy of `model` whose embedding row `token` is NaN (how="row") or inf ("inf"), or whose every weight is
    NaN ("all")."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, directory)
    tensors = load_file(directory / "model.safetensors")
    if how == "all":
        tensors = {k: v * float("nan") for k, v in tensors.items()}
    else:
        name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors[name][token] = float("nan") if how == "row" else float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _a_common_token(model, data) -> tuple[int, int]:
    """A token of the first pair's chosen answer, and how many pairs hold it in either completion."""
    from prefsift.models import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    token = tokenizer(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"][-2]
    holding = sum(any(token in tokenizer(r["prompt"] + r[side])["input_ids"] for side in ("chosen", "rejected"))
                  for r in rows)
    assert 0 < holding < len(rows)
    return token, holding


@pytest.mark.parametrize("how", ["row", "inf", "all"])
def test_a_models_nan_log_probs_are_its_failure_not_pairs_too_long(ws, tmp_path, how):
    _, model, _, data = ws
    token, holding = _a_common_token(model, data)
    broken = _broken_copy(model, tmp_path / "broken", how, token)
    n = 30 if how == "all" else holding
    out = tmp_path / "scores"
    assert invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", out).exit_code == 0
    before = snapshot(out)
    for role, flags in (("policy", ("--model", broken)), ("reference", ("--model", model, "--reference", broken))):
        line = one_line_error(invoke("score", "--data", data, "--method", "irm", *flags, "--out", out,
                                     "--allow-dropped"),
                              f"the {role} model {broken} ({flags[-2]}) gave NaN or inf for {n} of 30 pairs that fit "
                              f"max_length 1024", "not pairs too long")
        assert "prompt fills" not in line and "--max-length" not in line
    assert snapshot(out) == before  # no dropped.jsonl calling them too long


@pytest.mark.e2e
def test_a_nan_reference_log_prob_handed_to_train_is_the_models_failure(ws, tmp_path):
    _, model, _, data = ws
    token, holding = _a_common_token(model, data)
    broken = _broken_copy(model, tmp_path / "broken", "row", token)
    out = tmp_path / "trained"
    args = ("train", "--data", data, "--out", out, "--batch-size", 8, "--no-gradient-checkpointing")
    assert invoke(*args, "--model", model).exit_code == 0
    before = snapshot(out)
    one_line_error(invoke(*args, "--model", model, "--reference", broken), "the reference model (--reference",
                   f"gave NaN or inf for {holding} of 30 pairs that fit max_length 1024", "not pairs too long")
    one_line_error(invoke(*args, "--model", model, "--reference", broken, "--algo", "kto"),
                   f"KTO's reference model {broken} gave NaN or inf for", "rows that fit")
    one_line_error(invoke(*args, "--model", broken), f"{broken} (--model) has", "NaN or inf weights before training")
    nan = _broken_copy(model, tmp_path / "nan", "all")
    one_line_error(invoke("eval", "--data", data, "--model", nan, "--out", tmp_path / "e"),
                   f"{nan} (--model) has", "NaN or inf weights")
    assert snapshot(out) == before and not (tmp_path / "e").exists()


# ------------------------------------------------------------------ a new score leaves nothing derived from the old


def test_a_new_score_removes_what_was_derived_from_the_old_scores(ws, tmp_path):
    _, model, _, data = ws
    out = tmp_path / "scores"
    result = invoke("score", "--data", data, "--method", "if,irm", "--model", model, "--validation-data", data,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert invoke("analyze", out).exit_code == 0
    derived = {"analysis.json", "analysis.md", "influence-scatter.png"}
    assert derived <= {p.name for p in out.iterdir()}
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:20]))
    shards = sorted(p.relative_to(out) for p in (out / "shards").rglob("*.parquet"))
    result = invoke("score", "--data", fewer, "--method", "random", "--out", out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == FILES | {"shards"}  # the analysis of the old scores is gone
    assert sorted(p.relative_to(out) for p in (out / "shards").rglob("*.parquet")) == shards  # caches stay


# ------------------------------------------------------------------ every writing command refuses a user's own files


def test_export_never_replaces_a_users_own_file(scored, tmp_path):
    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "my", "chosen": "own", "rejected": "data"}\n')
    for fmt in ("trl", "openrlhf", "axolotl"):
        one_line_error(invoke("export", "--selected", selected, "--out", mine, "--format", fmt),
                       f"--out {mine} exists and is not a file prefsift export wrote")
    assert mine.read_text() == '{"prompt": "my", "chosen": "own", "rejected": "data"}\n'
    ours = tmp_path / "ours.jsonl"  # an export's own file is replaced by a rerun, until someone edits it
    assert invoke("export", "--selected", selected, "--out", ours, "--format", "trl").exit_code == 0
    assert invoke("export", "--selected", selected, "--out", ours, "--format", "openrlhf").exit_code == 0
    ours.write_text(ours.read_text().replace('"prompt": "', '"prompt": "edited ', 1).replace(", ", ",", 1))
    edited = ours.read_bytes()
    one_line_error(invoke("export", "--selected", selected, "--out", ours, "--format", "trl"),
                   "is not a file prefsift export wrote")
    assert ours.read_bytes() == edited
    # never a file inside another stage's results, which that stage swaps whole
    one_line_error(invoke("export", "--selected", selected, "--out", selected / "extra.jsonl", "--format", "trl"),
                   f"is inside {selected}, which holds the results of `prefsift select`")
    assert not (selected / "extra.jsonl").exists()


def test_a_llamafactory_export_replaces_only_its_own_dataset(scored, tmp_path):
    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    lf = tmp_path / "lf"
    lf.mkdir()
    (lf / "prefsift_subset.json").write_text("my own file")  # not in dataset_info.json
    export = ("export", "--selected", selected, "--out", lf, "--format", "llamafactory")
    one_line_error(invoke(*export), "prefsift_subset.json exists and no prefsift export wrote it")
    (lf / "dataset_info.json").write_text(json.dumps({"prefsift_subset": {"file_name": "prefsift_subset.json"}}))
    before = snapshot(lf)
    one_line_error(invoke(*export), "already has a dataset 'prefsift_subset' that no prefsift export wrote")
    assert snapshot(lf) == before
    assert invoke(*export, "--name", "other").exit_code == 0  # beside the user's datasets
    assert invoke(*export, "--name", "other").exit_code == 0  # and again: its own dataset
    assert (lf / "prefsift_subset.json").read_text() == "my own file"
    one_line_error(invoke("export", "--selected", selected, "--out", scored, "--format", "llamafactory"),
                   "holds the results of `prefsift score`")


def test_analyze_and_report_refuse_a_users_directory(ws, tmp_path):
    _, model, _, data = ws
    scores = tmp_path / "scores"
    assert invoke("score", "--data", data, "--method", "if,irm", "--model", model, "--validation-data", data,
                  "--out", scores).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "analysis.md").write_text("my notes")
    one_line_error(invoke("analyze", scores, "--out", mine), "not empty and holds no prefsift analyze results")
    one_line_error(invoke("report", scores, "--out", mine), "not empty and holds no prefsift report results")
    assert snapshot(mine) == {"analysis.md": b"my notes"}
    away = tmp_path / "analysis"
    for _ in range(2):  # a new directory, then its own again
        result = invoke("analyze", scores, "--out", away)
        assert result.exit_code == 0, result.output
    assert {p.name for p in away.iterdir()} == {"analysis.json", "analysis.md", "influence-scatter.png",
                                               "manifest.json"}
    one_line_error(invoke("analyze", scores, "--out", scores / "scores.parquet"), "is a file")
    # beside the scores only in a directory prefsift wrote
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(scores / "scores.parquet", copy / "scores.parquet")
    one_line_error(invoke("analyze", copy), "holds no prefsift score manifest", "give --out")
    (copy / "results.json").write_text("{}")
    one_line_error(invoke("report", copy), "holds no prefsift manifest", "give --out")
    assert sorted(p.name for p in copy.iterdir()) == ["results.json", "scores.parquet"]


# ------------------------------------------------------------------ a score file's null or inf is one line, everywhere


def _edit_scores(directory, column, row, value):
    import pyarrow as pa

    table = pq.read_table(directory / "scores.parquet").to_pydict()
    table[column][row] = value
    pq.write_table(pa.table(table), directory / "scores.parquet")
    return table["pair_id"][row]


@pytest.mark.parametrize(("value", "kind"), [(float("inf"), "+inf"), (-float("inf"), "-inf"), (None, "null"),
                                             (float("nan"), "NaN")])
def test_a_non_finite_or_null_score_in_a_score_file_is_one_line_at_every_stage(ws, tmp_path, value, kind):
    _, model, _, data = ws
    scores = tmp_path / "scores"
    assert invoke("score", "--data", data, "--method", "if,irm,random", "--model", model, "--validation-data", data,
                  "--out", scores).exit_code == 0
    for column in ("irm", "influence", "ref_chosen_logps"):
        pair = _edit_scores(scores, column, 4, value)
    before = snapshot(scores)
    said = f"column '{{}}' holds {kind} for 1 of its 30 pairs"
    example = f"(e.g. pair {pair})"
    for args, column in [(("select", "--scores", scores, "--method", "irm", "--fraction", 0.5, "--out",
                           tmp_path / "o"), "irm"),
                         (("select", "--scores", scores, "--rule", "all", "--column", "irm", "--out", tmp_path / "o"),
                          "irm"),
                         (("weigh", "--scores", scores, "--column", "irm", "--transform", "rank", "--out",
                           tmp_path / "o"), "irm"),
                         (("analyze", scores), "influence"),
                         (("analyze", scores, "--out", tmp_path / "o"), "influence")]:
        one_line_error(invoke(*args), said.format(column), example, "score again")
    assert snapshot(scores) == before and not (tmp_path / "o").exists()
    # the column another stage reads: a curriculum's order, the reference log-probs train reuses
    train = ("train", "--data", data, "--model", model, "--out", tmp_path / "t", "--scores", scores)
    one_line_error(invoke(*train, "--order", "irm"), said.format("irm"), example)
    one_line_error(invoke(*train), said.format("ref_chosen_logps"), example)
    assert not (tmp_path / "t").exists()
    # the other columns are untouched: a rule that reads none of the edited ones runs
    result = invoke("select", "--scores", scores, "--method", "random", "--fraction", 0.5, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output


def test_a_nan_the_score_file_records_as_left_out_stays_a_pair_not_considered(tmp_path):
    rows = make_pairs(6, seed=3)
    for row, chosen in zip(rows, [1.0, float("inf"), 2.0, 4.0, 3.0, 5.0], strict=True):
        row["score_chosen"], row["score_rejected"] = chosen, 0.5
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert invoke("score", "--data", data, "--out", tmp_path / "m", "--method", "margin").exit_code == 0
    result = invoke("select", "--scores", tmp_path / "m", "--rule", "all", "--column", "margin", "--out",
                    tmp_path / "s")
    assert result.exit_code == 0, result.output  # its dropped.jsonl lists the pair: NaN, not considered
    assert "kept 5 of 6 pairs" in result.output and "1 not considered" in result.output


# ------------------------------------------------------------------ a symbolic link is never swapped nor followed


def test_a_symlinked_out_is_refused_and_recovery_never_follows_a_link(ws, tmp_path):
    _, _, _, data = ws
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    link = tmp_path / "out"
    link.symlink_to(mine)
    score = ("score", "--data", data, "--method", "random", "--out")
    one_line_error(invoke(*score, link), f"--out {link} is a symbolic link (to {mine})")
    selected = tmp_path / "sel"
    assert invoke(*score, tmp_path / "scores").exit_code == 0
    assert invoke("select", "--scores", tmp_path / "scores", "--rule", "all", "--out", selected).exit_code == 0
    one_line_error(invoke("select", "--scores", tmp_path / "scores", "--rule", "all", "--out", link),
                   "is a symbolic link")
    jsonl = tmp_path / "x.jsonl"
    jsonl.symlink_to(mine / "notes.txt")
    one_line_error(invoke("export", "--selected", selected, "--out", jsonl, "--format", "trl"), "is a symbolic link")
    assert link.is_symlink() and jsonl.is_symlink() and snapshot(mine) == {"notes.txt": b"my notes"}

    # a stale `.old-*` link beside an output (what an earlier version left when it renamed a linked --out aside):
    # the next run's recovery neither follows it nor moves anything out of the directory it points to
    out = tmp_path / "s"
    assert invoke(*score, out).exit_code == 0
    stale = tmp_path / ".s.old-99999-abcd"
    stale.symlink_to(mine)
    assert invoke(*score, out, "--seed", 2).exit_code == 0
    assert snapshot(mine) == {"notes.txt": b"my notes"} and stale.is_symlink()
    assert {p.name for p in out.iterdir()} == FILES
    # with the output gone, the link goes back under its name (the user's link, as it was), and is refused
    shutil.rmtree(out)
    one_line_error(invoke(*score, out), f"--out {out} is a symbolic link (to {mine})")
    assert out.is_symlink() and not stale.exists() and snapshot(mine) == {"notes.txt": b"my notes"}


# ---------------------------------------------------------- a training that moved nothing; an adapter's lost base


@pytest.mark.e2e
def test_an_adapter_whose_base_model_is_gone_is_one_line(ws, tmp_path):
    _, model, _, data = ws
    base = tmp_path / "sft"
    shutil.copytree(model, base)
    adapter = tmp_path / "adapter"
    assert invoke("train", "--data", data, "--model", base, "--out", adapter, "--lora", "--lora-r", 4,
                  "--batch-size", 8, "--no-gradient-checkpointing").exit_code == 0
    shutil.rmtree(base)
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", adapter, "--out", tmp_path / "o"),
                   f"the LoRA adapter {adapter} sits on {base}", "which is not there")


# ------------------------------------------------------------------ the log-prob cache: never trusted when damaged


def test_a_damaged_or_unwritable_log_prob_cache_is_one_warning_and_the_same_scores(ws, tmp_path, monkeypatch):
    _, model, _, data = ws
    cache = tmp_path / "cache"
    monkeypatch.setenv("PREFSIFT_CACHE", str(cache))
    args = ("score", "--data", data, "--method", "irm", "--model", model)
    assert invoke(*args, "--out", tmp_path / "a").exit_code == 0
    (entry,) = cache.rglob("*.parquet")
    entry.write_bytes(entry.read_bytes()[:100])  # a kill on a filesystem without atomic rename, a bad disk
    result = invoke(*args, "--out", tmp_path / "b")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "ignoring the unreadable log-prob cache entry" in warned[0], result.output
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("mine\n")
    monkeypatch.setenv("PREFSIFT_CACHE", str(blocked))
    result = invoke(*args, "--out", tmp_path / "c")
    assert result.exit_code == 0 and "could not write the log-prob cache" in result.output, result.output
    assert blocked.read_text() == "mine\n"
    scores = [pq.read_table(tmp_path / d / "scores.parquet").to_pydict() for d in "abc"]
    assert scores[0] == scores[1] == scores[2]


# ------------------------------------------------------------------ user text in the lines of a run that succeeds


def test_paths_with_brackets_are_printed_as_they_are_in_every_summary_line(ws, tmp_path):
    """Not only errors: the summary lines of score, select and export name the user's paths, printed as written
    (`[/]` is no markup error, `[ray]` no vanishing tag), and the files go where those paths say."""
    _, _, _, data = ws
    where = tmp_path / "runs[ray]"
    named = where / "d[/]pairs.jsonl"  # `[/]` across a directory and its file
    scores, subset, exported = where / "s[/]", where / "sel[bold]", where / "out[/].jsonl"
    for directory in (named.parent, scores.parent, exported.parent):
        directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(data, named)
    said = []
    for args in (("score", "--data", named, "--method", "random", "--out", scores),
                 ("select", "--scores", scores, "--out", subset, "--fraction", 0.5),
                 ("export", "--selected", subset, "--out", exported, "--format", "trl")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        said.append("".join(result.output.split()))  # lines wrapped at the terminal's width, joined back
    assert f"→{scores / 'scores.parquet'}" in said[0]
    assert f"→{subset / 'selected.jsonl'}" in said[1] and f"→{exported}" in said[2]
    assert len(exported.read_text().splitlines()) == 15


# ------------------------------------------------------------------ a tokenizer or model that does not fit itself


def _model_copy(model, directory, *, config=None, tokenizer_config=None):
    """A copy of the tiny model with keys of its config.json / tokenizer_config.json replaced."""
    shutil.copytree(model, directory)
    for name, changes in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if changes:
            values = json.loads((directory / name).read_text())
            (directory / name).write_text(json.dumps({**values, **changes}))
    return directory


@pytest.mark.parametrize(("how", "fragments"), [
    ("pad id past the vocabulary", ("config.json's pad_token_id 5000 is outside its vocabulary",)),
    ("eos id past the vocabulary", ("config.json's eos_token_id 4000 is outside its vocabulary",)),
    ("tokens added, embedding not resized", ("its tokenizer has", "the vocabulary does not match")),
    ("another model's smaller embedding", ("but the model embeds 100", "the vocabulary does not match")),
    ("no eos token", ("its tokenizer has no eos token",)),
])
def test_a_tokenizer_or_config_that_does_not_fit_its_model_is_one_line(ws, tmp_path, bpe_tokenizer, how, fragments):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, model, _, data = ws
    broken = tmp_path / "broken"
    if how == "pad id past the vocabulary":
        _model_copy(model, broken, config={"pad_token_id": 5000})
    elif how == "eos id past the vocabulary":
        _model_copy(model, broken, config={"eos_token_id": 4000})
    elif how == "tokens added, embedding not resized":
        _model_copy(model, broken)
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.add_special_tokens({"pad_token": "<|new-pad|>"})  # its id is past the model's embedding
        tokenizer.save_pretrained(broken)
    elif how == "another model's smaller embedding":
        config = make_tiny_llama(bpe_tokenizer).config
        config.vocab_size, config.pad_token_id, config.eos_token_id = 100, 1, 0
        LlamaForCausalLM(config).save_pretrained(broken)
        bpe_tokenizer.save_pretrained(broken)
    else:
        _model_copy(model, broken, tokenizer_config={"eos_token": None, "pad_token": None})
    for command in (("score", "--method", "irm"), ("train",)):
        out = tmp_path / command[0]
        one_line_error(invoke(*command, "--data", data, "--model", broken, "--out", out), f"'{broken}'", *fragments)
        assert not out.exists()


def test_a_two_label_reward_model_says_it_must_have_one_score_output(ws, tmp_path, bpe_tokenizer):
    _, _, _, data = ws
    two = _save_reward_model(tmp_path / "rm2", bpe_tokenizer, num_labels=2)
    line = one_line_error(invoke("score", "--data", data, "--method", "margin", "--reward-model", two, "--out",
                                 tmp_path / "o"), f"'{two}' has 2 score outputs", "must have one score output")
    assert "report" not in line and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ a path that is not a regular file


def test_a_path_that_is_not_a_regular_file_is_one_line_and_never_blocks(ws, scored, tmp_path):
    """A directory, a FIFO (opening it would wait for a writer forever) or a device where a file is read."""
    _, model, _, data = ws
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    score = ("score", "--method", "random", "--out", tmp_path / "o")
    one_line_error(invoke(*score, "--data", fifo), f"--data {fifo} is a FIFO (named pipe), not a regular file")
    one_line_error(invoke(*score, "--data", "/dev/zero"), "--data /dev/zero is a device, not a regular file")
    for config in (folder, fifo):
        one_line_error(invoke(*score, "--data", data, "--config", config), f"--config {config} is a", "not a regular")
    for name, kind in (("model.safetensors", "a directory"), ("model.safetensors", "a FIFO"),
                       ("config.json", "a directory"), ("tokenizer.json", "a FIFO")):
        broken = tmp_path / f"m-{name}-{kind[2:5]}"
        shutil.copytree(model, broken)
        (broken / name).unlink()
        (broken / name).mkdir() if kind == "a directory" else os.mkfifo(broken / name)
        one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", broken, "--out", tmp_path / "o"),
                       f"{broken / name} is {kind}", "not a regular file")
    (tmp_path / "w.gguf").symlink_to(fifo)  # a link to a FIFO is a FIFO
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", tmp_path / "w.gguf", "--out",
                          tmp_path / "o"), "w.gguf is a FIFO (named pipe), not a regular file")
    damaged = tmp_path / "damaged"
    shutil.copytree(scored, damaged)
    (damaged / "scores.parquet").unlink()
    (damaged / "scores.parquet").mkdir()
    one_line_error(invoke("select", "--scores", damaged, "--out", tmp_path / "s", "--rule", "all"),
                   f"{damaged / 'scores.parquet'} is a directory, not a regular file")
    one_line_error(invoke("select", "--scores", scored / "scores.parquet", "--out", tmp_path / "s", "--rule", "all"),
                   "scores.parquet is a file, not a prefsift output directory")
    (damaged / "scores.parquet").rmdir()
    shutil.copy(scored / "scores.parquet", damaged / "scores.parquet")
    os.mkfifo(damaged / "manifest.json.fifo")
    (damaged / "manifest.json").unlink()
    (damaged / "manifest.json").symlink_to(damaged / "manifest.json.fifo")
    one_line_error(invoke("select", "--scores", damaged, "--out", tmp_path / "s", "--rule", "all"),
                   "manifest.json is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------ a Ray cluster that is not there


def test_an_unreachable_ray_cluster_is_one_line_at_once(ws, tmp_path):
    import socket
    import time

    _, model, _, data = ws
    with socket.socket() as s:  # a port nothing listens on: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    for address, fragment in ((f"127.0.0.1:{port}", "no Ray cluster answers there"),
                              (f"ray://127.0.0.1:{port}", "no Ray cluster answers there"),
                              ("head-without-port", "expected host:port")):
        one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", tmp_path / "o",
                              "--backend", "ray", "--ray-address", address), f"--ray-address {address}", fragment)
    assert time.monotonic() - start < 15 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ a full disk names the path being written


def test_a_full_disk_on_select_export_or_train_names_the_path_and_no_shards(ws, scored, tmp_path, monkeypatch):
    import pathlib

    import prefsift.manifest

    _, model, _, data = ws
    selected = tmp_path / "sel"
    assert invoke("select", "--scores", scored, "--out", selected, "--rule", "all").exit_code == 0
    opened = pathlib.Path.open

    def no_space_to_write(self, mode="r", *args, **kwargs):  # every file opened for writing: the disk is full
        if any(c in mode for c in "wax"):
            _full()
        return opened(self, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "open", no_space_to_write)
        for fmt, out in (("trl", tmp_path / "t.jsonl"), ("openrlhf", tmp_path / "o.jsonl"),
                         ("axolotl", tmp_path / "a.jsonl"), ("llamafactory", tmp_path / "lf")):
            line = one_line_error(invoke("export", "--selected", selected, "--out", out, "--format", fmt),
                                  f"cannot write {out}: the disk is full")
            assert "shard" not in line and not out.exists()
        line = one_line_error(invoke("select", "--scores", scored, "--out", tmp_path / "s", "--rule", "all"),
                              f"cannot write {tmp_path / 's'}: the disk is full")
        assert "shard" not in line
    with monkeypatch.context() as patch:
        patch.setattr(prefsift.manifest, "_write_text", _full)
        line = one_line_error(invoke("export", "--selected", selected, "--out", tmp_path / "ds", "--format",
                                     "datasets"), f"cannot write {tmp_path / 'ds'}: the disk is full")
        assert "shard" not in line
        line = one_line_error(invoke("train", "--data", data, "--model", model, "--out", tmp_path / "t"),
                              f"cannot write {tmp_path / 't'}: the disk is full")
        assert "shard" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored", "sel"]  # nothing half-written, no lock


# ------------------------------------------------------------------ numbers too large to parse


@pytest.mark.parametrize(("where", "value", "fragment"), [
    ("flag", "1e400", "Invalid value for '--max-length'"),
    ("flag", "9" * 5000, "Invalid value for '--max-length'"),
    ("beta", "9" * 5000, "--beta must be a finite number"),
    ("yaml", "9" * 5000, "4300 digits"),
    ("yaml", "1e400", "max_length must be an integer"),
])
def test_a_number_too_large_to_parse_is_one_line(ws, tmp_path, where, value, fragment):
    _, _, _, data = ws
    args = ["score", "--data", data, "--method", "random", "--out", tmp_path / "o"]
    if where == "yaml":
        (tmp_path / "c.yaml").write_text(f"max_length: {value}\n")
        args += ["--config", tmp_path / "c.yaml"]
    else:
        args += ["--max-length" if where == "flag" else "--beta", value]
    line = one_line_error(invoke(*args), fragment)
    assert len(line) < 300 and not (tmp_path / "o").exists()
    if where == "yaml":
        assert str(tmp_path / "c.yaml") in line


# ------------------------------------------------------------------ inputs built to exhaust memory or time (issue 22)


def _good_rows(n: int) -> list[str]:
    return [json.dumps(r) + "\n" for r in make_pairs(n, seed=7)]


def test_a_line_over_the_limit_is_refused_by_its_number_without_being_held_whole(tmp_path, monkeypatch):
    """A gzip of a few KB can hold one enormous line: it is refused by its line number once it passes the limit,
    read in blocks, never as one string (the limit lowered here; 64 MiB by default)."""
    import gzip
    import tracemalloc

    from prefsift.data import read

    monkeypatch.setattr(read, "MAX_LINE_BYTES", 4096)
    monkeypatch.setattr(read, "_BLOCK", 1024)
    data = tmp_path / "long.jsonl.gz"
    with gzip.open(data, "wb", compresslevel=1) as f:
        f.write("".join(_good_rows(3)).encode())
        f.write(b'{"prompt": "' + b"a" * (24 << 20) + b'", "chosen": "b", "rejected": "c"}\n')
    tracemalloc.start()
    try:
        result = invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line_error(result, f"{data} line 4: longer than 4096 bytes (the limit of a line)")
    assert peak < 12 << 20, peak  # the 24 MiB line was never held whole
    array = tmp_path / "long.json"  # a JSON array's record, the same limit
    array.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "' + "a" * 10_000 + '"}]')
    one_line_error(invoke("score", "--data", array, "--method", "random", "--out", tmp_path / "o"),
                   "record 2 (line 2): longer than 4096 bytes")
    normal = tmp_path / "ok.jsonl"  # rows under the limit read as before
    normal.write_text("".join(_good_rows(5)))
    assert invoke("score", "--data", normal, "--method", "random", "--out", tmp_path / "ok").exit_code == 0


def test_a_gzip_of_blank_lines_is_skipped_in_seconds_and_line_numbers_stay_right(tmp_path):
    import gzip
    import time

    blanks = 100 << 20  # 100 Mi blank lines: a Python step per line took minutes at this scale
    data = tmp_path / "blank.jsonl.gz"
    with gzip.open(data, "wb", compresslevel=1) as f:
        f.write("".join(_good_rows(2)).encode())
        for _ in range(blanks >> 20):
            f.write(b"\n" * (1 << 19) + b" \t\r\n" * (1 << 17))
        f.write(b'{"prompt": "p", "chosen": "same", "rejected": "same"}\n  \n')
        f.write("".join(_good_rows(4)[2:]).encode())
    start = time.perf_counter()
    result = invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 20
    assert "scored 4 pairs (1 left out" in " ".join(result.output.split())
    dropped = [json.loads(line) for line in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert [d["row"] for d in dropped] == [2 + (blanks >> 20) * ((1 << 19) + (1 << 17)) + 1]


def test_a_yaml_alias_bomb_is_refused_and_error_lines_stay_short(ws, tmp_path):
    _, _, _, data = ws
    bomb = tmp_path / "bomb.yaml"
    nested = "".join(f"{x}: &{x} [{','.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi", strict=True))
    bomb.write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + nested)
    line = one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o", "--config",
                                 bomb), f"{bomb}: invalid YAML", "alias (*a) at line 2", "not allowed")
    assert len(line) < 300
    huge = tmp_path / "list.yaml"  # a value a million characters long, shown cut
    huge.write_text("model: [" + ",".join(['"lol"'] * 200_000) + "]\n")
    line = one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o", "--config",
                                 huge), "model must be a string (got ['lol', 'lol'", "...)")
    assert len(line) < 300
    digits = tmp_path / "digits.yaml"
    digits.write_text("seed: " + "9" * 100_000 + "\n")
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o", "--config", digits),
                   f"{digits}: a number too large to read")
    line = one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o", "--seed",
                                 "9" * 100_000))
    assert len(line) < 300
    beyond = tmp_path / "beyond.yaml"  # an integer no float holds, where a float is asked
    beyond.write_text(f"beta: {10 ** 400}\n")
    assert len(one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o",
                                     "--config", beyond), "beta must be a finite number")) < 300


@pytest.mark.parametrize(("param", "fragment"), [
    ("rows=100000000000", "rows must be <= 4096 (got 100000000000)"),
    ("hashes_per_row=1000", "hashes_per_row must be <= 64"),
    ("rows=4096", "rows x hashes_per_row must be <= 16384 (got 4096 x 8)"),
])
def test_densitys_sketch_size_is_bounded(ws, tmp_path, param, fragment):
    _, _, _, data = ws
    extra = ("--param", "hashes_per_row=8") if param == "rows=4096" else ()
    one_line_error(invoke("score", "--data", data, "--method", "density", "--out", tmp_path / "o", "--param", param,
                          *extra), "method 'density'", fragment)


@pytest.mark.parametrize(("row", "fragment"), [
    ('"x": ' + "9" * 100_000, "line 3: an integer of more than"),
    ('"x": 1180591620717411303424', "line 3: column 'x' holds a value no table can store (an integer beyond 64"),
    ('"x": "\\ud800"', "line 3: column 'x' holds a value no table can store (a lone surrogate"),
    ('"x": [1, "\\udfff"]', "line 3: column 'x' holds a value no table can store (a lone surrogate"),
])
def test_a_value_no_table_can_hold_names_its_line_even_in_an_unused_column(tmp_path, row, fragment):
    rows = _good_rows(4)
    rows.insert(2, '{"prompt": "a", "chosen": "b", "rejected": "c", ' + row + "}\n")
    for name in ("d.jsonl", "d.json"):
        data = tmp_path / name
        data.write_text("".join(rows) if name == "d.jsonl" else "[" + ",".join(rows) + "]")
        expect = fragment if name == "d.jsonl" else fragment.replace("line 3", "")
        one_line_error(invoke("score", "--data", data, "--method", "random", "--out", tmp_path / "o"), expect)


def test_a_sentence_transformer_with_truncated_weights_or_another_vocabulary_is_one_line(ws, tmp_path):
    from helpers import WORDS
    from transformers import BertConfig, BertModel, BertTokenizerFast

    _, _, _, data = ws
    st = tmp_path / "st"  # a tiny sentence-transformer directory: BERT, its vocabulary, modules.json
    st.mkdir()
    (st / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(st / "vocab.txt"))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(st)
    tokenizer.save_pretrained(st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    score = ("score", "--data", data, "--method", "isa", "--embedder", st)
    assert invoke(*score, "--out", tmp_path / "ok").exit_code == 0
    bigger = BertTokenizerFast(vocab_file=str(st / "vocab.txt"))
    bigger.add_tokens([f"extra{i}" for i in range(50)])  # a vocabulary past the model's embedding
    bigger.save_pretrained(st)
    one_line_error(invoke(*score, "--out", tmp_path / "o"), f"'{st}'", "the vocabulary does not match")
    tokenizer.save_pretrained(st)
    weights = st / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(invoke(*score, "--out", tmp_path / "o"), f"cannot load sentence-transformer from '{st}'")
    assert not (tmp_path / "o").exists()


def test_a_prompt_far_over_max_length_is_dropped_by_its_characters_without_being_tokenized(ws, tmp_path, monkeypatch):
    """A prompt of a million characters is judged too long from its length (no token covers more characters than
    the vocabulary's longest entry): the tokenizer never sees it, and the other pairs score exactly as without it."""
    from transformers import PreTrainedTokenizerBase

    _, model, _, data = ws
    longest = []
    call = PreTrainedTokenizerBase.__call__

    def recording(self, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        longest.append(max((len(t) for t in texts if isinstance(t, str)), default=0))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", recording)
    rows = data.read_text().splitlines(keepends=True)
    huge = tmp_path / "huge.jsonl"
    huge.write_text("".join(rows[:3]) + json.dumps({"prompt": "word " * 200_000, "chosen": " yes", "rejected": " no"})
                    + "\n" + json.dumps({"prompt": "Q", "chosen": " a" * 200_000, "rejected": " b" * 200_000})
                    + "\n" + "".join(rows[3:]))
    result = invoke("score", "--data", huge, "--out", tmp_path / "h", "--method", "irm", "--model", model,
                    "--max-length", 64)
    assert result.exit_code == 0, result.output
    assert longest and max(longest) < 200_000, max(longest)  # neither the prompt nor a completion went in whole
    dropped = [json.loads(line) for line in (tmp_path / "h" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["row"], d["reason"]) for d in dropped if d["row"] == 4] == [(4, "prompt fills max_length 64")]
    assert invoke("score", "--data", data, "--out", tmp_path / "n", "--method", "irm", "--model", model,
                  "--max-length", 64).exit_code == 0
    with_huge = pq.read_table(tmp_path / "h" / "scores.parquet").to_pydict()
    plain = pq.read_table(tmp_path / "n" / "scores.parquet").to_pydict()
    by_id = dict(zip(with_huge["pair_id"], with_huge["irm"], strict=True))
    assert all(by_id[p] == v or (np.isnan(v) and np.isnan(by_id[p]))
               for p, v in zip(plain["pair_id"], plain["irm"], strict=True))


def test_a_compare_config_with_an_empty_or_scalar_section_is_one_line(ws, tmp_path):
    """`engine:` with nothing under it is YAML's null (a TypeError traceback once); a section that is not a mapping
    is one line naming it."""
    _, model, _, data = ws
    config = tmp_path / "c.yaml"
    config.write_text("engine:\ntrain: 3\n")
    one_line_error(invoke("compare", "--data", data, "--model", model, "--out", tmp_path / "o", "--config", config),
                   "train must be a mapping of train settings (got int)")


def test_a_config_whose_vocabulary_is_not_the_weights_and_a_fifo_score_file_are_one_line(ws, scored, tmp_path):
    """A config.json whose vocab_size disagrees with the weights' embedding (transformers would point at a report
    prefsift mutes), and a scores.parquet that is a FIFO read by weigh, train --scores and select (never blocks)."""
    _, model, _, data = ws
    for vocab in (300, 1000):
        broken = _model_copy(model, tmp_path / f"m{vocab}", config={"vocab_size": vocab})
        line = one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", broken, "--out",
                                     tmp_path / "o"), f"'{broken}'", "by its config.json", "do not match")
        assert "report" not in line
    damaged = tmp_path / "damaged"
    shutil.copytree(scored, damaged)
    (damaged / "scores.parquet").unlink()
    os.mkfifo(damaged / "scores.parquet")
    fragment = f"{damaged / 'scores.parquet'} is a FIFO (named pipe), not a regular file"
    for args in (("weigh", "--column", "random", "--transform", "rank"), ("select", "--rule", "all")):
        one_line_error(invoke(*args, "--scores", damaged, "--out", tmp_path / "w"), fragment)
    one_line_error(invoke("train", "--data", data, "--model", model, "--scores", damaged, "--out", tmp_path / "w"),
                   fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_an_error_line_quoting_a_huge_value_stays_one_readable_line(tmp_path):
    """Whatever an error quotes (a method name, a value, a line of data), the line printed is one line of bounded
    length that says how much it left out (a YAML error once printed 8 MB)."""
    from helpers import write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(4))
    result = invoke("score", "--data", data, "--method", "x" * 5000, "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: unknown method 'xxx") and "more characters)" in result.output
    assert len(result.output) < 1100


def test_a_huge_text_reaches_no_reward_model_or_embedder_tokenizer_whole(bpe_tokenizer):
    """Reward models and embedders cut long inputs from the left (the response at the end survives): a text far over
    max_length is cut to its last characters before tokenizing (a 100 MB prompt once took 13.7 GB), and the scores
    equal those of the tokenizer's own left truncation of the whole text."""
    from helpers import tiny_reward_model

    from prefsift.engine.embeddings import CausalEmbedder
    from prefsift.engine.reward import _score_texts
    from prefsift.engine.tokenize import char_cap

    words = make_pairs(1, seed=9)[0]["chosen"]
    texts = [words, ("lorem ipsum " * 40000) + words]
    cap = char_cap(bpe_tokenizer, 32, texts)
    assert cap is not None and cap < len(texts[1])
    seen: list[int] = []
    original = type(bpe_tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return original(self, text, *args, **kwargs)

    reward = tiny_reward_model(bpe_tokenizer).eval()
    bpe_tokenizer.truncation_side = "left"
    whole = bpe_tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    bpe_tokenizer.truncation_side = "right"
    with torch.inference_mode():
        expected = reward(**whole).logits[:, 0].float().numpy()
    type(bpe_tokenizer).__call__ = spy
    try:
        got = _score_texts(reward, bpe_tokenizer, texts, 32)
        embedder = CausalEmbedder(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, "m", "f", max_length=32)
        embedder.embed(texts)
    finally:
        type(bpe_tokenizer).__call__ = original
    assert max(seen) <= cap
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
