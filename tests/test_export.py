"""`prefsift export`: each layout read back by its consumer's own reader where it installs here (TRL's DPOTrainer
dataset preparation, `datasets`), and checked against the documented schema where it does not (LLaMA-Factory,
OpenRLHF, Axolotl)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import hh_rows, score_dir
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.errors import PrefsiftError
from prefsift.export import ExportConfig, export
from prefsift.select import select_from_scores, write_subset

HH_FILE = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")


def chat_rows(n: int) -> list[dict]:
    """Conversational pairs with the prompt inside chosen / rejected (argilla-chat style), some with a system turn."""
    rows = []
    for i in range(n):
        prompt = ([{"role": "system", "content": "Be brief."}] if i % 2 else []) + [
            {"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."},
            {"role": "user", "content": "and then?"}]
        rows.append({"chosen": prompt + [{"role": "assistant", "content": f"Duck {i} says yes."}],
                     "rejected": prompt + [{"role": "assistant", "content": f"Ducks {i} say no."}]})
    return rows


@pytest.fixture
def text_subset(tmp_path):
    scores, _ = score_dir(tmp_path, hh_rows(10), np.arange(10.0))
    select_from_scores(scores, tmp_path / "sel", rule="top", column="irm", count=6)
    lines = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    return tmp_path / "sel", lines


@pytest.fixture
def chat_subset(tmp_path):
    scores, _ = score_dir(tmp_path, chat_rows(8), np.arange(8.0))
    select_from_scores(scores, tmp_path / "chat", rule="all")
    lines = [json.loads(x) for x in (tmp_path / "chat" / "selected.jsonl").read_text().splitlines()]
    return tmp_path / "chat", lines


def prepare_like_dpo_trainer(dataset, tokenizer, tmp_path):
    """TRL's own DPOTrainer._prepare_dataset (extract prompt if missing, EOS, tokenize) on `dataset`."""
    from trl import DPOConfig, DPOTrainer

    class Owner:  # the one attribute _prepare_dataset reads from the trainer
        _tokenizer = tokenizer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), dataset_num_proc=None, report_to=[], bf16=False, use_cpu=True)
    return DPOTrainer._prepare_dataset(Owner(), dataset, tokenizer, args, "train")


def test_trl_layout_through_dpo_trainer_preparation(text_subset, tmp_path, bpe_tokenizer):
    selected, lines = text_subset
    result = export(selected, str(tmp_path / "trl.jsonl"), ExportConfig(format="trl"))
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "trl.jsonl"), split="train")
    assert loaded.to_list() == lines and result.n_pairs == 6
    prepared = prepare_like_dpo_trainer(loaded, bpe_tokenizer, tmp_path)
    eos = bpe_tokenizer.eos_token
    for row, line in zip(prepared, lines, strict=True):
        assert bpe_tokenizer.decode(row["prompt_ids"]) == line["prompt"]  # the prompt ends at "Assistant:"
        assert row["prompt_ids"] + row["chosen_ids"] == bpe_tokenizer(line["prompt"] + line["chosen"] + eos)[
            "input_ids"]
        assert row["prompt_ids"] + row["rejected_ids"] == bpe_tokenizer(line["prompt"] + line["rejected"] + eos)[
            "input_ids"]


def test_trl_layout_of_messages_through_the_chat_template(chat_subset, tmp_path, bpe_tokenizer):
    from trl.data_utils import apply_chat_template, is_conversational

    selected, lines = chat_subset
    export(selected, str(tmp_path / "chat.jsonl"), ExportConfig(format="trl"))
    loaded = datasets.load_dataset("json", data_files=str(tmp_path / "chat.jsonl"), split="train")
    for example, line in zip(loaded, lines, strict=True):
        assert is_conversational(example)
        text = apply_chat_template(example, bpe_tokenizer)
        # the fixture's template, rendered by hand: <|role|>content\n per message
        assert text["prompt"] == "".join(f"<|{m['role']}|>{m['content']}\n" for m in line["prompt"]) + "<|assistant|>"
        assert text["chosen"] == line["chosen"][0]["content"] + "\n"
    prepared = prepare_like_dpo_trainer(loaded, bpe_tokenizer, tmp_path)
    assert len(prepared) == len(lines) and all(len(r["chosen_ids"]) > 0 for r in prepared)


def test_datasets_directory_carries_the_weight(text_subset, tmp_path):
    selected, lines = text_subset
    weights = np.linspace(0.5, 1.5, len(lines))
    table = datasets.Dataset.from_list(lines)
    write_subset(tmp_path / "weighted", table, range(len(lines)), extra={"weight": weights})
    export(tmp_path / "weighted", str(tmp_path / "ds"), ExportConfig(format="datasets"))
    back = datasets.load_from_disk(str(tmp_path / "ds"))
    assert back.column_names == ["prompt", "chosen", "rejected", "pair_id", "weight"]
    assert back.to_list() == [{**line, "weight": w} for line, w in zip(lines, weights, strict=True)]


def test_hub_push_up_to_the_call(text_subset, monkeypatch):
    selected, lines = text_subset
    pushed = {}

    def fake_push(self, repo_id, **kwargs):
        pushed.update(repo_id=repo_id, rows=self.to_list(), **kwargs)

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push)
    result = CliRunner().invoke(app, ["export", "--selected", str(selected), "--format", "hub", "--out",
                                      "me/hh-subset", "--split", "dpo", "--no-private"])
    assert result.exit_code == 0, result.output
    assert pushed == {"repo_id": "me/hh-subset", "rows": lines, "split": "dpo", "private": False}
    assert "load_dataset('me/hh-subset', split='dpo')" in result.output
    bad = CliRunner().invoke(app, ["export", "--selected", str(selected), "--format", "hub", "--out", "noslash"])
    assert bad.exit_code == 2 and "owner/name" in bad.output


def check_llamafactory(directory: Path, name: str) -> list[dict]:
    """LLaMA-Factory's data/README.md: dataset_info.json maps the name to file_name, ranking true for a pairwise
    (preference) dataset and the columns; alpaca rows hold instruction / chosen / rejected strings, sharegpt rows a
    `conversations` list alternating user / assistant from a user turn (after an optional system message) and
    ending on one, with chosen / rejected one message each."""
    entry = json.loads((directory / "dataset_info.json").read_text())[name]
    rows = json.loads((directory / entry["file_name"]).read_text())  # a JSON array, as its examples are
    assert entry["ranking"] is True
    if entry.get("formatting") == "sharegpt":
        assert entry["columns"] == {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
        tags = entry["tags"]
        for row in rows:
            turns = row["conversations"]
            if turns[0][tags["role_tag"]] == tags["system_tag"]:
                turns = turns[1:]
            assert [m[tags["role_tag"]] for m in turns] == [
                tags["user_tag"] if i % 2 == 0 else tags["assistant_tag"] for i in range(len(turns))]
            assert len(turns) % 2 == 1
            for side in ("chosen", "rejected"):
                assert row[side][tags["role_tag"]] == tags["assistant_tag"]
                assert isinstance(row[side][tags["content_tag"]], str)
    else:
        assert "formatting" not in entry  # alpaca, the default
        assert entry["columns"] == {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}
        assert all(isinstance(row[k], str) for row in rows for k in ("instruction", "chosen", "rejected"))
    return rows


def test_llamafactory_pairwise_text_and_sharegpt(text_subset, chat_subset, tmp_path):
    out = tmp_path / "lf"
    out.mkdir()
    (out / "dataset_info.json").write_text(json.dumps({"theirs": {"file_name": "theirs.json"}}))
    selected, lines = text_subset
    export(selected, str(out), ExportConfig(format="llamafactory", name="hh_subset"))
    rows = check_llamafactory(out, "hh_subset")
    assert [(r["instruction"], r["chosen"], r["rejected"]) for r in rows] == [
        (x["prompt"], x["chosen"], x["rejected"]) for x in lines]
    chat, chat_lines = chat_subset
    export(chat, str(out), ExportConfig(format="llamafactory", name="chat_subset"))
    rows = check_llamafactory(out, "chat_subset")
    assert [r["conversations"] for r in rows] == [x["prompt"] for x in chat_lines]
    assert [r["chosen"] for r in rows] == [x["chosen"][0] for x in chat_lines]
    assert set(json.loads((out / "dataset_info.json").read_text())) == {"theirs", "hh_subset", "chat_subset"}


def test_openrlhf_keys_rebuild_the_transcript(text_subset, tmp_path):
    selected, lines = text_subset
    export(selected, str(tmp_path / "o.jsonl"), ExportConfig(format="openrlhf"))
    rows = datasets.load_dataset("json", data_files=str(tmp_path / "o.jsonl"), split="train")
    originals = {r["chosen"]: r for r in hh_rows(10)}
    for row in rows:  # OpenRLHF's preprocess_data without a chat template: data[prompt_key] + data[chosen_key]
        original = originals[row["prompt"] + row["chosen"]]
        assert row["prompt"] + row["rejected"] == original["rejected"]


def test_axolotl_user_defined_and_chat_template_layouts(text_subset, chat_subset, tmp_path):
    selected, lines = text_subset
    export(selected, str(tmp_path / "a.jsonl"), ExportConfig(format="axolotl"))
    rows = datasets.load_dataset("json", data_files=str(tmp_path / "a.jsonl"), split="train")
    for row, line in zip(rows, lines, strict=True):  # user_defined.default: "{prompt}".format(prompt=...) etc.
        assert "{prompt}".format(prompt=row["prompt"]) == line["prompt"]
        assert (row["chosen"], row["rejected"]) == (line["chosen"], line["rejected"])
    chat, chat_lines = chat_subset
    export(chat, str(tmp_path / "c.jsonl"), ExportConfig(format="axolotl"))
    rows = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    for row, line in zip(rows, chat_lines, strict=True):  # chat_template.default: messages + one message a side
        assert row["messages"] == line["prompt"]
        assert row["chosen"] == {"role": "assistant", "content": line["chosen"][0]["content"]}
        assert row["rejected"] == line["rejected"][0]


def test_export_refusals_are_one_line(text_subset, tmp_path):
    selected, _ = text_subset
    for args, message in [(["--format", "parquetish", "--out", str(tmp_path / "x.jsonl")], "format must be one of"),
                          (["--format", "trl", "--out", str(tmp_path / "x.json")], "is a .jsonl file"),
                          (["--format", "trl", "--out", str(tmp_path / "x.jsonl"), "--name", "a b"], "plain file")]:
        result = CliRunner().invoke(app, ["export", "--selected", str(selected), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", "--selected", str(tmp_path / "nope"), "--out", "x.jsonl"])
    assert result.exit_code == 2 and "no such file or directory" in result.output
    # a pair whose answer is two messages has no place in LLaMA-Factory's pairwise sharegpt layout
    two = chat_rows(2)
    two[0]["chosen"] = two[0]["chosen"] + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "x"}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in two))
    with pytest.raises(PrefsiftError, match="chosen is 3 message"):
        export(path, str(tmp_path / "lf2"), ExportConfig(format="llamafactory"))


@pytest.mark.skipif(not HH_FILE.is_file(), reason="the shared HH-RLHF file is not on this machine")
def test_hh_export_has_no_prompt_cut_inside_a_response(tmp_path):
    """The whole HH-RLHF harmless-base test file, scored (random), selected (all), exported for TRL: after TRL's own
    prompt extraction every prompt ends at an assistant turn and prompt + chosen is the transcript; the input's own
    columns, through the same extraction, are cut inside a response."""
    from trl.data_utils import maybe_extract_prompt

    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2312
    usable = [r for r in rows if r["chosen"] != r["rejected"]]
    scores, data = score_dir(tmp_path, usable, np.random.default_rng(0).normal(size=2308))
    select_from_scores(scores, tmp_path / "sel", rule="all")
    export(tmp_path / "sel", str(tmp_path / "trl.jsonl"), ExportConfig(format="trl"))
    exported = datasets.load_dataset("json", data_files=str(tmp_path / "trl.jsonl"), split="train")
    assert len(exported) == len(data.pairs) == 2308
    transcripts = {r["chosen"]: r["rejected"] for r in rows}
    cut = 0
    for example in exported:
        example = maybe_extract_prompt(example)
        cut += not example["prompt"].endswith("\n\nAssistant:")
        assert transcripts[example["prompt"] + example["chosen"]] == example["prompt"] + example["rejected"]
    assert cut == 0
    select_from_scores(scores, tmp_path / "orig", rule="all", output_columns="original")
    original = datasets.load_dataset("json", data_files=str(tmp_path / "orig" / "selected.jsonl"), split="train")
    cut_original = sum(not maybe_extract_prompt(dict(e))["prompt"].endswith("\n\nAssistant:") for e in original)
    assert cut_original > 100  # what prefsift's split avoids (the README's count comes from bench, not from here)
