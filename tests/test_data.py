"""prefsift.data: every source format, every kind, validation, errors, pair_id, and the real HH-RLHF file."""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsift.data import (
    InvalidRow,
    LoadedPairs,
    data_hash_of,
    load_pairs,
    pair_id_of,
    split_implicit_prompt,
)
from prefsift.errors import DataError, PrefsiftError

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"prompt": "Colour of a clear sky?", "chosen": "Blue.", "rejected": "Green."},
]

HH_CHOSEN = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
    "\n\nHuman: Tell me a joke about cats"
    "\n\nAssistant: Sure, here is one: why did the cat sit on the computer?"
)
HH_REJECTED = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
    "\n\nHuman: Tell me a joke about cats\n\nAssistant: Sure, cats are terrible and so are you."
)
HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke about cats\n\nAssistant:"


def _hh_path() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
    return path if path.is_file() else Path(os.environ.get("PREFSIFT_HH_PATH", str(path)))


HH_PATH = _hh_path()


# ---------------------------------------------------------------- writers, one per source format


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json_array(path: Path, rows: list[dict[str, Any]]) -> Path:
    text = json.dumps(rows, indent=2)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_saved(path: Path, rows: list[dict[str, Any]]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def write_saved_dict(path: Path, rows: list[dict[str, Any]]) -> Path:
    decoy = [{"prompt": "other", "chosen": "a", "rejected": "b"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(decoy), "test": datasets.Dataset.from_list(rows)})
    dd.save_to_disk(str(path))
    return path


SOURCES: dict[str, tuple[str, Callable[[Path, list[dict[str, Any]]], Any], dict[str, Any]]] = {
    "jsonl": ("d.jsonl", write_jsonl, {}),
    "jsonl.gz": ("d.jsonl.gz", write_jsonl, {}),
    "json-array": ("d.json", write_json_array, {}),
    "json-array.gz": ("d.json.gz", write_json_array, {}),
    "json-lines": ("d.json", write_jsonl, {}),
    "parquet": ("d.parquet", write_parquet, {}),
    "csv": ("d.csv", write_csv, {}),
    "save_to_disk": ("saved", write_saved, {}),
    "DatasetDict": ("saved_dict", write_saved_dict, {"split": "test"}),
    "in-memory": ("", lambda _path, rows: datasets.Dataset.from_list(rows), {}),
}


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_every_format_loads_the_same_pairs(tmp_path: Path, fmt: str) -> None:
    name, write, kwargs = SOURCES[fmt]
    source = write(tmp_path / name, STANDARD)

    loaded = load_pairs(source, **kwargs)

    assert isinstance(loaded, LoadedPairs)
    assert loaded.kind == "standard" and not loaded.conversational
    assert loaded.pairs.column_names == ["pair_id", "prompt", "chosen", "rejected"]
    assert loaded.pairs.to_list() == [{"pair_id": pair_id_of(**row), **row} for row in STANDARD]
    assert loaded.raw.to_list() == [{**row, "pair_id": pair_id_of(**row)} for row in STANDARD]
    assert (loaded.n_read, loaded.invalid) == (3, [])
    assert loaded.summary() == "read 3 rows, kept 3, skipped 0"
    if isinstance(source, Path):
        assert loaded.source == str(source)


def test_pair_ids_and_hash_match_across_formats(tmp_path: Path) -> None:
    hashes = set()
    for fmt, (name, write, kwargs) in SOURCES.items():
        loaded = load_pairs(write(tmp_path / f"{fmt}-{name}", STANDARD), **kwargs)
        hashes.add(loaded.data_hash)
    assert len(hashes) == 1
    assert len(hashes.pop()) == 64


def test_dataset_dict_defaults_to_train_and_names_missing_splits(tmp_path: Path) -> None:
    path = write_saved_dict(tmp_path / "dd", STANDARD)
    assert load_pairs(path).pairs["prompt"] == ["other"]
    assert len(load_pairs(str(path), split="test").pairs) == 3
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        load_pairs(path, split="validation")


def test_saved_directory_is_left_untouched(tmp_path: Path) -> None:
    rows = [*STANDARD, {"prompt": "x", "chosen": "same", "rejected": "same"}]
    path = write_saved(tmp_path / "saved", rows)
    before = sorted(p.name for p in path.iterdir())
    loaded = load_pairs(path)
    assert len(loaded.raw) == 3
    assert sorted(p.name for p in path.iterdir()) == before


def test_csv_text_columns_stay_strings_and_scores_stay_numbers(tmp_path: Path) -> None:
    rows = [{"prompt": "007", "chosen": "42", "rejected": "41", "score_chosen": 9.5, "score_rejected": 3.0}]
    loaded = load_pairs(write_csv(tmp_path / "d.csv", rows))
    assert loaded.pairs[0]["prompt"] == "007" and loaded.pairs[0]["chosen"] == "42"
    assert loaded.raw[0]["score_chosen"] == 9.5


def test_csv_gz_with_multiline_transcripts(tmp_path: Path) -> None:
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "id": 1}] * 2000
    rows = [{**row, "chosen": f"{row['chosen']} ({i})", "id": i} for i, row in enumerate(rows)]
    plain = write_csv(tmp_path / "hh.csv", rows)
    packed = tmp_path / "hh.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    loaded = load_pairs(packed)
    assert loaded.kind == "implicit" and len(loaded.pairs) == 2000
    assert {p["prompt"] for p in loaded.pairs} == {HH_PROMPT}
    assert loaded.raw["chosen"] == [row["chosen"] for row in rows]


# ---------------------------------------------------------------- kinds


def test_implicit_multi_turn_transcript_splits_at_last_shared_assistant_turn(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    loaded = load_pairs(path)
    pair = loaded.pairs[0]
    assert loaded.kind == "implicit"
    assert pair["prompt"] == HH_PROMPT
    assert pair["chosen"] == " Sure, here is one: why did the cat sit on the computer?"
    assert pair["rejected"] == " Sure, cats are terrible and so are you."
    assert pair["prompt"] + pair["chosen"] == HH_CHOSEN
    assert pair["prompt"] + pair["rejected"] == HH_REJECTED
    assert loaded.raw.column_names == ["chosen", "rejected", "pair_id"]


def test_split_implicit_prompt_never_cuts_inside_a_response() -> None:
    # The responses share " Sure, " but the cut stays at the marker.
    assert split_implicit_prompt(HH_CHOSEN, HH_REJECTED) == (
        HH_PROMPT,
        HH_CHOSEN[len(HH_PROMPT) :],
        HH_REJECTED[len(HH_PROMPT) :],
    )
    # Transcripts that part ways at an earlier turn: the last *shared* marker wins.
    a = "\n\nHuman: q\n\nAssistant: yes\n\nHuman: more\n\nAssistant: ok"
    b = "\n\nHuman: q\n\nAssistant: no\n\nHuman: more\n\nAssistant: ok"
    prompt = "\n\nHuman: q\n\nAssistant:"
    assert split_implicit_prompt(a, b) == (prompt, a[len(prompt) :], b[len(prompt) :])
    # No shared marker, or a marker only one of them has at that point.
    assert split_implicit_prompt("Human: a\n\nAssistant: b", "Human: c\n\nAssistant: d") is None
    assert split_implicit_prompt("A: x", "A: y", assistant_marker="A:") == ("A:", " x", " y")
    assert split_implicit_prompt("<u>hi<a>yes", "<u>hi<a>no", assistant_marker="<a>") == (
        "<u>hi<a>",
        "yes",
        "no",
    )


def test_custom_assistant_marker(tmp_path: Path) -> None:
    rows = [{"chosen": "<|user|>hi<|assistant|>hello", "rejected": "<|user|>hi<|assistant|>go away"}]
    loaded = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), assistant_marker="<|assistant|>")
    assert loaded.pairs[0]["prompt"] == "<|user|>hi<|assistant|>"
    assert loaded.pairs[0]["chosen"] == "hello"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_conversational_explicit_prompt(tmp_path: Path) -> None:
    rows = [
        {"prompt": [user("Sky colour?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
        # chosen/rejected that repeat the prompt in front of the answer are cut back to the answer
        {
            "prompt": [user("2+2?")],
            "chosen": [user("2+2?"), assistant("4")],
            "rejected": [user("2+2?"), assistant("5")],
        },
    ]
    loaded = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert loaded.kind == "conversational" and loaded.conversational
    assert loaded.pairs.to_list()[0] == {
        "pair_id": pair_id_of([user("Sky colour?")], [assistant("Blue.")], [assistant("Green.")]),
        "prompt": [user("Sky colour?")],
        "chosen": [assistant("Blue.")],
        "rejected": [assistant("Green.")],
    }
    assert loaded.pairs[1]["chosen"] == [assistant("4")]
    assert loaded.pairs[1]["prompt"] == [user("2+2?")]


def test_conversational_ultrafeedback_like_keeps_scores_in_raw(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": "Name a prime.",
            "chosen": [user("Name a prime."), assistant("7")],
            "rejected": [user("Name a prime."), assistant("8")],
            "score_chosen": 9.0,
            "score_rejected": 2.5,
        },
        {  # multi-turn: the prompt is every shared leading message
            "prompt": "hi",
            "chosen": [user("hi"), assistant("hello"), user("joke?"), assistant("A good one.")],
            "rejected": [user("hi"), assistant("hello"), user("joke?"), assistant("No.")],
            "score_chosen": 7.0,
            "score_rejected": 6.0,
        },
        {  # nothing shared: the string prompt becomes the user turn
            "prompt": "Say hi",
            "chosen": [assistant("Hi!")],
            "rejected": [assistant("Bye.")],
            "score_chosen": 5.0,
            "score_rejected": 1.0,
        },
    ]
    loaded = load_pairs(write_parquet(tmp_path / "uf.parquet", rows))
    assert loaded.kind == "conversational"
    assert [p["prompt"] for p in loaded.pairs] == [
        [user("Name a prime.")],
        [user("hi"), assistant("hello"), user("joke?")],
        [user("Say hi")],
    ]
    assert [p["chosen"] for p in loaded.pairs] == [
        [assistant("7")],
        [assistant("A good one.")],
        [assistant("Hi!")],
    ]
    assert loaded.raw.column_names == [
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
        "pair_id",
    ]
    assert loaded.raw["score_chosen"] == [9.0, 7.0, 5.0]
    assert loaded.raw["score_rejected"] == [2.5, 6.0, 1.0]
    assert loaded.raw["chosen"][0] == rows[0]["chosen"]


def test_conversational_without_prompt_column(tmp_path: Path) -> None:
    rows = [{"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]}]
    loaded = load_pairs(datasets.Dataset.from_list(rows))
    assert loaded.kind == "conversational"
    assert loaded.pairs[0]["prompt"] == [user("q")]
    assert loaded.pairs[0]["rejected"] == [assistant("bad")]


def test_unpaired_labels_are_coerced_to_bool(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "x", "label": True},
        {"prompt": "b", "completion": "y", "label": 0},
        {"prompt": "c", "completion": "z", "label": "true"},
        {"prompt": "d", "completion": "w", "label": "False"},
        {"prompt": "e", "completion": "v", "label": "maybe"},
        {"prompt": "f", "completion": "u", "label": 1},
    ]
    loaded = load_pairs(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert loaded.kind == "unpaired" and not loaded.conversational
    assert loaded.pairs.column_names == ["pair_id", "prompt", "completion", "label"]
    assert loaded.pairs["label"] == [True, False, True, False, True]
    assert loaded.pairs["pair_id"][0] == pair_id_of("a", "x", True)
    assert loaded.invalid == [InvalidRow(5, "invalid label 'maybe' (expected true/false or 1/0)")]


def test_unpaired_from_csv_and_conversational_unpaired(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "completion": "x", "label": "true"},
        {"prompt": "b", "completion": "y", "label": "0"},
    ]
    assert load_pairs(write_csv(tmp_path / "kto.csv", rows)).pairs["label"] == [True, False]
    conv = [{"prompt": [user("hi")], "completion": [assistant("hello")], "label": 1}]
    loaded = load_pairs(datasets.Dataset.from_list(conv))
    assert loaded.kind == "unpaired" and loaded.conversational
    assert loaded.pairs[0]["completion"] == [assistant("hello")]


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"question": r["prompt"], "better": r["chosen"], "worse": r["rejected"]} for r in STANDARD]
    loaded = load_pairs(
        write_jsonl(tmp_path / "m.jsonl", rows),
        prompt_key="question",
        chosen_key="better",
        rejected_key="worse",
    )
    assert loaded.kind == "standard"
    assert loaded.pairs["pair_id"] == [pair_id_of(**r) for r in STANDARD]
    assert loaded.raw.column_names == ["question", "better", "worse", "pair_id"]

    kto = [{"q": "a", "answer": "x", "good": 1}]
    mapped = load_pairs(datasets.Dataset.from_list(kto), prompt_key="q", completion_key="answer", label_key="good")
    assert mapped.kind == "unpaired" and mapped.pairs["label"] == [True]


# ---------------------------------------------------------------- validation


def test_invalid_rows_are_skipped_with_their_line_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}),  # line 1: kept
        "",  # line 2: blank, skipped silently
        json.dumps({"prompt": "p2", "rejected": "b"}),  # line 3: no chosen
        json.dumps({"prompt": "p3", "chosen": "a", "rejected": "  \n"}),  # line 4: whitespace rejected
        json.dumps({"prompt": "p4", "chosen": "same", "rejected": "same"}),  # line 5
        json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b", "extra": 1}),  # line 6: duplicate of 1
        "   ",  # line 7: blank
        json.dumps({"prompt": None, "chosen": "a", "rejected": "b"}),  # line 8: null prompt
        json.dumps({"prompt": "p5", "chosen": "", "rejected": "b"}),  # line 9: empty chosen
        json.dumps({"prompt": "p6", "chosen": "c", "rejected": "d"}),  # line 10: kept
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    loaded = load_pairs(path)

    assert loaded.invalid == [
        InvalidRow(3, "missing field 'chosen'"),
        InvalidRow(4, "empty rejected response"),
        InvalidRow(5, "chosen == rejected"),
        InvalidRow(6, "duplicate of row 1"),
        InvalidRow(8, "missing field 'prompt'"),
        InvalidRow(9, "empty chosen response"),
    ]
    assert loaded.n_read == 8
    assert loaded.pairs["prompt"] == ["p1", "p6"]
    assert loaded.raw["prompt"] == ["p1", "p6"] and loaded.raw["extra"] == [None, None]
    assert loaded.raw["pair_id"] == loaded.pairs["pair_id"]
    assert loaded.summary() == (
        "read 8 rows, kept 2, skipped 6 (1 missing field 'chosen', 1 empty rejected response, "
        "1 chosen == rejected, 1 duplicate, 1 missing field 'prompt', 1 empty chosen response)"
    )


def test_invalid_implicit_and_conversational_rows(tmp_path: Path) -> None:
    implicit = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
        {"chosen": HH_PROMPT + " ", "rejected": HH_REJECTED},
    ]
    loaded = load_pairs(write_json_array(tmp_path / "i.json", implicit))
    assert loaded.invalid == [
        InvalidRow(2, "no shared assistant turn"),
        InvalidRow(3, "empty chosen response"),
    ]

    conv = [
        {"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]},
        {"chosen": [user("q"), assistant("  ")], "rejected": [user("q"), assistant("bad")]},
        {"chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("x")]},
        {"chosen": [user("q"), assistant("x")], "rejected": [user("other"), assistant("y")]},
    ]
    loaded = load_pairs(write_jsonl(tmp_path / "c.jsonl", conv))
    assert loaded.invalid == [
        InvalidRow(2, "empty chosen response"),
        InvalidRow(3, "chosen == rejected"),
        InvalidRow(4, "no shared prompt messages"),
    ]


def test_conversational_roles_must_alternate_and_answer_as_the_assistant(tmp_path: Path) -> None:
    good = {"prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}
    rows = [
        good,
        {"prompt": [user("q")], "chosen": [user("yes")], "rejected": [assistant("no")]},  # a user turn as "response"
        {"prompt": [{"role": "wizard", "content": "q"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user("q"), user("again")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
        {"prompt": [user("q")], "chosen": [assistant("a"), user("more?")], "rejected": [assistant("c")]},
        {"prompt": [{"role": "system", "content": "be kind"}, user("q2")], "chosen": [assistant("a")],
         "rejected": [assistant("b")]},
    ]
    loaded = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert [(r.row, r.reason.split(" (")[0]) for r in loaded.invalid] == [
        (2, "chosen response is not an assistant turn"),
        (3, "unknown role 'wizard' in prompt"),
        (4, "roles do not alternate: two user turns in a row"),
        (5, "prompt ends with an assistant turn: roles do not alternate"),
        (6, "chosen response is not an assistant turn"),
    ]
    assert loaded.rows == [1, 7]  # each kept pair's input line


def test_one_bad_row_does_not_turn_good_rows_into_json(tmp_path: Path) -> None:
    good = [{"prompt": [user(f"q{i}")], "chosen": [assistant("a")], "rejected": [assistant(f"b{i}")]} for i in range(3)]
    rows = [good[0], {"prompt": "a string", "chosen": "x", "rejected": [1]}, good[1], good[2]]
    loaded = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows))
    assert [r.row for r in loaded.invalid] == [2]
    raw = loaded.raw.with_format("arrow")[:]
    for name in ("prompt", "chosen", "rejected"):  # the input's message lists, not JSON strings
        assert pa.types.is_list(raw.schema.field(name).type), raw.schema
    assert loaded.raw[0]["chosen"] == [assistant("a")]


def test_a_dataset_dict_without_split_says_which_it_took(tmp_path: Path) -> None:
    path = write_saved_dict(tmp_path / "dd", STANDARD)
    assert "split 'train' of train, test; --split picks another" in load_pairs(path).summary()
    assert "split" not in load_pairs(path, split="test").summary()


def test_on_invalid_fail_raises_at_the_first_bad_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in STANDARD] * 2
    rows[1] = {"prompt": "p", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_pairs(path, on_invalid="fail")
    assert str(info.value) == f"{path} line 2: chosen == rejected"
    with pytest.raises(DataError, match=r"line 4: duplicate of row 1$"):
        load_pairs(write_jsonl(tmp_path / "e.jsonl", STANDARD * 2), on_invalid="fail")
    with pytest.raises(DataError, match=r"^dataset row 2: chosen == rejected$"):
        load_pairs(datasets.Dataset.from_list(rows), on_invalid="fail")


def test_no_valid_rows_is_an_error(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "", "rejected": "y"}]
    with pytest.raises(DataError, match=r"no valid rows \(read 2: 1 chosen == rejected, 1 empty chosen response\)"):
        load_pairs(write_jsonl(tmp_path / "d.jsonl", rows))


# ---------------------------------------------------------------- errors a user can cause


def one_line_error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_pairs(*args, **kwargs)
    assert isinstance(info.value, PrefsiftError)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert one_line_error(missing) == f"file not found: {missing}"
    assert one_line_error(str(tmp_path / "dir" / "data")) == f"file not found: {tmp_path / 'dir' / 'data'}"
    assert one_line_error("nope.parquet") == "file not found: nope.parquet"


def test_broken_json_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    message = one_line_error(path)
    assert message == f"{path} line 3, column 27: invalid JSON (Expecting value)"  # line and column, once each
    path.write_text(json.dumps(STANDARD[0]) + "\n[1, 2]\n")
    assert one_line_error(path) == f"{path} line 2: expected a JSON object, got an array"
    gz = tmp_path / "d.json.gz"
    with gzip.open(gz, "wt") as f:
        f.write('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    assert one_line_error(gz) == f"{gz} line 3, column 14: invalid JSON (Expecting value)"


def test_invalid_utf8_and_deep_nesting_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(STANDARD[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    assert one_line_error(path) == f"{path} line 2: not UTF-8 text (byte 0xe9 at column 16)"
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"\xef\xbb\xbf" + json.dumps(STANDARD[0]).encode() + b"\n\xff\n")  # a BOM is fine, 0xff is not
    assert one_line_error(gz) == f"{gz} line 2: not UTF-8 text (byte 0xff at column 1)"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert one_line_error(path) == f"{path} line 2: JSON nested too deeply"


def test_a_typod_prompt_key_says_the_column_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in STANDARD))
    with pytest.raises(DataError, match=r"missing column 'question' \(columns: .*prompt.*\); map yours with "
                                        r"--prompt-key"):
        load_pairs(path, prompt_key="question")


def test_missing_column_lists_the_existing_ones(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    assert one_line_error(path) == (
        "missing column 'chosen' (columns: question, good, bad); "
        "map yours with --chosen-key/--rejected-key/--prompt-key"
    )
    assert one_line_error(path, chosen_key="good").startswith(
        "missing column 'rejected' (columns: question, good, bad)"
    )
    kto = datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])
    assert one_line_error(kto).startswith("missing column 'label' (columns: prompt, completion)")


def test_empty_file(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.json", "e.csv"):
        path = tmp_path / name
        path.write_text("" if name != "e.jsonl" else "\n  \n")
        if name == "e.csv":
            path.write_text("prompt,chosen,rejected\n")
        assert one_line_error(path) == f"{path}: no rows"
    gz = tmp_path / "e.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("")
    assert one_line_error(gz) == f"{gz}: no rows"
    assert one_line_error(write_json_array(tmp_path / "a.json", [])) == f"{tmp_path / 'a.json'}: no rows"


def test_unknown_extension_says_what_is_supported(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello")
    message = one_line_error(path)
    assert message.startswith(f"{path}: unsupported file type .txt; supported: .jsonl, .json, .parquet, .csv")
    not_saved = tmp_path / "plain_dir"
    not_saved.mkdir()
    assert "not one written by datasets' save_to_disk" in one_line_error(not_saved)


def test_corrupt_gzip_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert one_line_error(path).startswith(f"{path}: cannot decompress (")


def test_hub_name_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variable at import time: set what they read.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    message = one_line_error("prefsift-tests/no-such-dataset:test")
    assert message.startswith("cannot load hub dataset 'prefsift-tests/no-such-dataset' (the hub is unreachable: "
                              "offline, and it is not in the local cache): ")
    assert len(message) < 300


# ---------------------------------------------------------------- pair_id and data_hash


def test_pair_id_is_a_stable_content_hash() -> None:
    base = pair_id_of("p", "c", "r")
    assert base == pair_id_of("p", "c", "r") and len(base) == 16 and int(base, 16) >= 0
    assert len({base, pair_id_of("p2", "c", "r"), pair_id_of("p", "c2", "r"), pair_id_of("p", "r", "c")}) == 4
    msgs = pair_id_of([user("p")], [assistant("c")], [assistant("r")])
    assert msgs == pair_id_of([{"content": "p", "role": "user"}], [assistant("c")], [assistant("r")])
    assert msgs != base
    assert pair_id_of("p", "c", True) != pair_id_of("p", "c", False)


def test_pair_id_survives_a_round_trip_through_raw(tmp_path: Path) -> None:
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED, "note": "x"}]
    first = load_pairs(write_jsonl(tmp_path / "a.jsonl", rows))
    # selected.jsonl carries the input's columns plus pair_id; reloading it gives the same ids.
    again = load_pairs(write_jsonl(tmp_path / "b.jsonl", first.raw.to_list()))
    assert again.pairs["pair_id"] == first.pairs["pair_id"]
    assert again.raw.column_names == ["chosen", "rejected", "note", "pair_id"]
    assert again.data_hash == first.data_hash
    # The same content in the standard form has the same id.
    standard = [{"prompt": HH_PROMPT, "chosen": first.pairs[0]["chosen"], "rejected": first.pairs[0]["rejected"]}]
    assert load_pairs(datasets.Dataset.from_list(standard)).pairs["pair_id"] == first.pairs["pair_id"]


def test_data_hash_depends_on_order(tmp_path: Path) -> None:
    forward = load_pairs(datasets.Dataset.from_list(STANDARD))
    backward = load_pairs(datasets.Dataset.from_list(STANDARD[::-1]))
    assert forward.data_hash == data_hash_of(forward.pairs["pair_id"])
    assert forward.data_hash != backward.data_hash
    assert sorted(forward.pairs["pair_id"]) == sorted(backward.pairs["pair_id"])


# ---------------------------------------------------------------- the real HH-RLHF file


@pytest.mark.skipif(not HH_PATH.is_file(), reason=f"HH-RLHF test file not found at {HH_PATH}")
def test_real_hh_rlhf_harmless_base() -> None:
    from trl.data_utils import extract_prompt

    loaded = load_pairs(HH_PATH)

    assert loaded.kind == "implicit"
    assert loaded.n_read == 2312
    # Four transcripts end in an empty ("\n\nAssistant: ") chosen answer: the one rule that drops HH rows.
    assert loaded.invalid == [InvalidRow(n, "empty chosen response") for n in (87, 517, 926, 1104)]
    assert len(loaded.pairs) == 2308
    assert loaded.summary() == "read 2312 rows, kept 2308, skipped 4 (4 empty chosen response)"
    pairs, raw = loaded.pairs.to_dict(), loaded.raw.to_dict()
    assert raw["pair_id"] == pairs["pair_id"]
    for prompt, chosen, rejected, raw_chosen, raw_rejected in zip(
        pairs["prompt"], pairs["chosen"], pairs["rejected"], raw["chosen"], raw["rejected"], strict=True
    ):
        assert prompt.endswith("\n\nAssistant:")
        assert prompt + chosen == raw_chosen
        assert prompt + rejected == raw_rejected

    # Every one of the 2,312 rows (the 4 dropped ones too) splits exactly; TRL's character cut often does not.
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    inside_response = 0
    for row in rows:
        ours = split_implicit_prompt(row["chosen"], row["rejected"])
        assert ours is not None and ours[0] + ours[1] == row["chosen"] and ours[0] + ours[2] == row["rejected"]
        trl_prompt = extract_prompt(row)["prompt"]
        inside_response += len(trl_prompt) > len(ours[0])
    assert inside_response == 445


# ---------------------------------------------------------------- streaming: the same pairs, flat memory


def _same(a, b) -> None:
    assert (a.kind, a.n_read, a.invalid, a.data_hash, a.rows) == (b.kind, b.n_read, b.invalid, b.data_hash, b.rows)
    assert a.pairs.features == b.pairs.features and a.pairs.to_list() == b.pairs.to_list()
    assert a.raw.to_list() == b.raw.to_list()


@pytest.mark.parametrize("rows", [
    STANDARD + [{"prompt": "x", "chosen": "y", "rejected": "y"}, STANDARD[0]],  # invalid and duplicate rows
    [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "c"}],
    [{"prompt": [user(f"q{i}")], "chosen": [assistant("a")], "rejected": [assistant(f"b{i}")]} for i in range(5)],
    # a column absent (null) in the first chunks and a string later: one schema for the whole file
    [{**r, "source": None} for r in STANDARD] + [{"prompt": "p", "chosen": "c", "rejected": "r", "source": "web"}],
    # a column whose type changes between chunks: the whole-file reader's Json column takes it
    [{**STANDARD[0], "score": 1}, {**STANDARD[1], "score": "high"}, {**STANDARD[2], "score": [1, 2]}],
])
def test_streamed_reading_gives_the_whole_file_readers_pairs(tmp_path: Path, monkeypatch, rows) -> None:
    import prefsift.data.load as load

    path = write_jsonl(tmp_path / "d.jsonl.gz", rows)
    monkeypatch.setattr(load, "CHUNK_ROWS", 2)  # several chunks even for a few rows
    streamed = load_pairs(path)
    monkeypatch.setattr(load, "streamable", lambda source: None)
    _same(streamed, load_pairs(path))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "saved"])
def test_arrow_tables_are_normalized_chunk_by_chunk_with_the_same_pairs(tmp_path: Path, monkeypatch, fmt) -> None:
    import prefsift.data.load as load

    rows = STANDARD + [{"prompt": "x", "chosen": "y", "rejected": "y"}, STANDARD[1]]
    if fmt == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path = {"parquet": write_parquet, "csv": write_csv}[fmt](tmp_path / f"d.{fmt}", rows)
    monkeypatch.setattr(load, "CHUNK_ROWS", 2)
    chunked = load_pairs(path)
    assert chunked.pairs.cache_files  # mapped from the Arrow file the chunks were written to
    monkeypatch.setattr(load, "table_chunks", lambda raw, size: iter([raw]))  # one chunk: the whole table
    _same(chunked, load_pairs(path))


def test_a_streamed_file_is_memory_mapped_not_held(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    loaded = load_pairs(path)
    assert loaded.pairs.cache_files and loaded.raw.cache_files  # Arrow files on disk, mapped
    assert loaded.raw.to_list()[0] == {**STANDARD[0], "pair_id": loaded.pairs[0]["pair_id"]}


@pytest.mark.parametrize(("name", "indent"), [("a.json", 2), ("m.json", None), ("a.json.gz", 1)])
def test_a_json_array_is_streamed_and_reads_as_the_whole_file_does(tmp_path: Path, monkeypatch, name, indent) -> None:
    """A .json array goes through the chunked, memory-mapped path of JSON lines (never `_read_json`, which holds the
    whole text), record by record with `raw_decode` over a small buffer; what it reads equals the whole-file read,
    whatever the block size cuts through (strings holding `]`, `,` and quotes, multi-byte characters, numbers)."""
    import io

    import prefsift.data.load
    import prefsift.data.read as read

    rows = [{"prompt": f"q{i} é ] , \" [ ☃", "chosen": f"yes {i}\n" * (i % 4 + 1), "rejected": f"no {i}",
             "score": i * 1.25, "meta": {"tags": ["a", str(i)], "none": None}} for i in range(40)]
    rows[7]["chosen"] = rows[7]["rejected"]  # an invalid row, reported with its record number
    text = json.dumps(rows, indent=indent, ensure_ascii=False)
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    whole = read._read_json(io.StringIO(text), str(path))  # the whole-file reader, on the same text
    for block in (3, 17, 1 << 20):
        chunks = list(read.iter_jsonl_chunks(path, str(path), size=6, block=block))
        assert [r for c in chunks for r in c.rows] == whole.rows == list(range(1, 41))
        assert {c.row_word for c in chunks} == {whole.row_word} == {"row"}
        assert [r for c in chunks for r in c.table.to_list()] == whole.table.to_list()
    streamed = []
    monkeypatch.setattr(read, "_read_json", lambda *a: pytest.fail("the whole-file reader was used"))
    monkeypatch.setattr(prefsift.data.load, "CHUNK_ROWS", 8)
    original = prefsift.data.load._load_chunks
    monkeypatch.setattr(prefsift.data.load, "_load_chunks",
                        lambda chunks, *a, **k: original((streamed.append(c) or c for c in chunks), *a, **k))
    loaded = load_pairs(path)
    assert len(streamed) == 5  # 40 records, 8 a chunk
    expected = load_pairs(datasets.Dataset.from_list(rows))
    assert loaded.pairs.to_list() == expected.pairs.to_list() and len(loaded.pairs) == 39
    assert [(r.row, r.reason) for r in loaded.invalid] == [(8, expected.invalid[0].reason)]


# ---------------------------------------------------------------- --chat-template: plain text as chat messages


def _chat_rows() -> list[dict[str, Any]]:
    """Plain rows and an HH transcript (its prompt given, its answers with HH's leading space)."""
    return [*STANDARD, {"prompt": HH_PROMPT, "chosen": HH_CHOSEN[len(HH_PROMPT):],
                        "rejected": HH_REJECTED[len(HH_PROMPT):]}]


def test_chat_template_wraps_plain_prompts_and_completions_as_messages(tmp_path: Path) -> None:
    plain = load_pairs(write_jsonl(tmp_path / "a.jsonl", _chat_rows()))
    chat = load_pairs(write_jsonl(tmp_path / "b.jsonl", _chat_rows()), chat_template=True)
    assert chat.kind == "conversational" and chat.conversational and not plain.conversational
    assert chat.pairs["pair_id"] == plain.pairs["pair_id"]  # the same pairs, formatted for the model
    assert chat.pairs[0] == {"pair_id": plain.pairs[0]["pair_id"],
                             "prompt": [{"role": "user", "content": "What is 2+2?"}],
                             "chosen": [{"role": "assistant", "content": "4"}],
                             "rejected": [{"role": "assistant", "content": "5"}]}
    hh = chat.pairs[3]  # the transcript's own turns, the answers without their leading space
    assert hh["prompt"] == [{"role": "user", "content": "Hi there"},
                            {"role": "assistant", "content": "Hello! How can I help?"},
                            {"role": "user", "content": "Tell me a joke about cats"}]
    assert hh["chosen"] == [{"role": "assistant", "content": "Sure, here is one: why did the cat sit on the computer?"}]
    assert hh["rejected"] == [{"role": "assistant", "content": "Sure, cats are terrible and so are you."}]
    messages = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}]
    already = load_pairs(datasets.Dataset.from_list(messages))
    assert load_pairs(datasets.Dataset.from_list(messages), chat_template=True).pairs.to_list() == \
        already.pairs.to_list()  # messages already: nothing to wrap
    kto = load_pairs(datasets.Dataset.from_list([{"prompt": "q", "completion": " a", "label": True}]),
                     chat_template=True)
    assert kto.kind == "unpaired" and kto.pairs[0]["completion"] == [{"role": "assistant", "content": "a"}]


def test_chat_template_tokenizes_as_the_tokenizers_own_template(tmp_path: Path, bpe_tokenizer) -> None:
    """The ids a pass reads are those of TRL's `maybe_apply_chat_template` on the wrapped rows, tokenized by the
    tokenizer itself, and of `tokenizer.apply_chat_template` on messages built by hand."""
    from trl.data_utils import maybe_apply_chat_template

    from prefsift.engine.tokenize import tokenize_pairs

    chat = load_pairs(write_jsonl(tmp_path / "b.jsonl", _chat_rows()), chat_template=True).pairs
    tokenized = tokenize_pairs(bpe_tokenizer, chat["prompt"], chat["chosen"], chat["rejected"], max_length=None)
    for row, pair, source in zip(chat, tokenized, _chat_rows(), strict=True):
        texts = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, bpe_tokenizer)
        ids = bpe_tokenizer(texts["prompt"], add_special_tokens=False)["input_ids"]
        assert pair.prompt_ids == ids
        for side in ("chosen", "rejected"):
            full = bpe_tokenizer(texts["prompt"] + texts[side], add_special_tokens=False)["input_ids"]
            assert pair.prompt_ids + getattr(pair, f"{side}_ids") == full
        prompt = source["prompt"]
        if prompt != HH_PROMPT:  # the plain rows: one user turn, the answer the assistant's, built by hand
            by_hand = [{"role": "user", "content": prompt}]
            assert pair.prompt_ids == list(bpe_tokenizer.apply_chat_template(
                by_hand, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
            full = list(bpe_tokenizer.apply_chat_template(
                by_hand + [{"role": "assistant", "content": source["chosen"]}], tokenize=True,
                return_dict=True)["input_ids"])
            assert pair.prompt_ids + pair.chosen_ids == full


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path: Path, bpe_tokenizer) -> None:
    import copy

    from prefsift.data import check_chat_template

    chat = load_pairs(write_jsonl(tmp_path / "b.jsonl", STANDARD), chat_template=True).pairs
    plain = load_pairs(write_jsonl(tmp_path / "a.jsonl", STANDARD)).pairs
    check_chat_template(bpe_tokenizer, chat, "the model m (--model)")
    bare = copy.deepcopy(bpe_tokenizer)
    bare.chat_template = None
    check_chat_template(bare, plain, "the model m (--model)")  # plain text needs none
    with pytest.raises(DataError, match=r"the model m \(--model\) has no chat template.*--chat-template"):
        check_chat_template(bare, chat, "the model m (--model)")


def _plain_text_model_and_rows(tmp_path, tokenizer, seed: int):
    """A saved tiny model and six plain-text pairs: plain text, not HH transcripts (a transcript becomes its own
    turns under --chat-template)."""
    from tests.helpers import make_pairs, make_tiny_llama

    model = tmp_path / "sft"
    make_tiny_llama(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    rows = [{"prompt": r["prompt"].replace("\n\nHuman: ", "").replace("\n\nAssistant:", ""),
             "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()} for r in make_pairs(6, seed=seed)]
    return model, rows


def test_chat_template_flag_reaches_the_commands(tmp_path, bpe_tokenizer):
    """`prefsift score --chat-template` on plain pairs scores what the same pairs written by hand as user / assistant
    messages score, and not what the plain text scores (the option was once accepted and never passed on)."""
    import pyarrow.parquet as pq

    from tests.helpers import invoke, write_jsonl

    model, rows = _plain_text_model_and_rows(tmp_path, bpe_tokenizer, seed=3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    wrapped = write_jsonl(tmp_path / "messages.jsonl", [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])

    def logps(data, *flags):
        out = tmp_path / f"s-{data.stem}-{len(flags)}"
        result = invoke("score", "--data", data, "--method", "irm", "--model", model, "--out", out, *flags)
        assert result.exit_code == 0, result.output
        return pq.read_table(out / "scores.parquet")["chosen_logps"].to_pylist()

    templated = logps(plain, "--chat-template")
    assert templated == pytest.approx(logps(wrapped), rel=1e-6)
    assert templated != pytest.approx(logps(plain), rel=1e-3)


def test_a_chat_template_rerun_into_a_plain_runs_directory_does_not_resume_its_shards(tmp_path, bpe_tokenizer,
                                                                                      monkeypatch):
    """--chat-template keeps the pair_ids and changes the text: a score into a directory that holds a plain run's
    shards computes its own pass (it resumed the plain one's batches once), equal to a fresh templated score."""
    import pyarrow.parquet as pq

    from tests.helpers import invoke, write_jsonl

    model, rows = _plain_text_model_and_rows(tmp_path, bpe_tokenizer, seed=5)
    data = write_jsonl(tmp_path / "plain.jsonl", rows)
    monkeypatch.setenv("PREFSIFT_CACHE", "off")  # the shards, not the cross-command cache, are under test
    base = ("score", "--data", data, "--method", "irm", "--model", model)
    assert invoke(*base, "--out", tmp_path / "s").exit_code == 0
    assert invoke(*base, "--out", tmp_path / "s", "--chat-template").exit_code == 0
    assert invoke(*base, "--out", tmp_path / "fresh", "--chat-template").exit_code == 0
    again = pq.read_table(tmp_path / "s" / "scores.parquet")["chosen_logps"].to_pylist()
    assert again == pytest.approx(pq.read_table(tmp_path / "fresh" / "scores.parquet")["chosen_logps"].to_pylist())
