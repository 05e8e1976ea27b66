"""`prefsift export`: a selected subset in the layout another trainer reads, with the command that consumes it.

Every layout starts from prefsift's split (explicit prompt / chosen / rejected, `load_pairs` on the subset), so no
consumer has to guess where a prompt ends: TRL's `extract_prompt` cuts HH-RLHF transcripts at the longest common
*character* prefix, inside the answer, whenever the two answers start alike.

    datasets      a `save_to_disk` directory (prompt, chosen, rejected, pair_id [, weight])
    hub           the same dataset pushed to the Hugging Face hub (`--out` is the repo id)
    trl           JSON lines in TRL's explicit-prompt preference layout
    llamafactory  a data file + its `dataset_info.json` entry (pairwise: `"ranking": true`; alpaca for text,
                  sharegpt for messages)
    openrlhf      JSON lines with prompt / chosen / rejected keys (`--prompt_key prompt --chosen_key chosen
                  --rejected_key rejected`)
    axolotl       JSON lines for `type: user_defined.default` (text) or `type: chat_template.default` (messages)
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets

from prefsift.config import ExportConfig
from prefsift.data import LoadedPairs, load_pairs
from prefsift.errors import ConfigError, DataError, PrefsiftError
from prefsift.manifest import write_manifest
from prefsift.output import check_output, check_output_file, locked, require_file, stage_of, staged, temp_sibling
from prefsift.select import write_jsonl

# LLaMA-Factory's sharegpt reader with OpenAI-style messages: these tags map our role/content keys to its roles
LLAMAFACTORY_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"}


@dataclasses.dataclass
class Exported:
    paths: list[Path]  # files written (none for a hub push)
    n_pairs: int
    conversational: bool
    usage: str  # how the consuming tool reads it
    n_invalid: int = 0


def selected_file(selected: str | Path) -> Path:
    """The file `read_selected` reads: a `prefsift select` directory's selected.parquet (or .jsonl), or `selected`."""
    path = Path(selected)
    if path.is_dir():
        for name in ("selected.parquet", "selected.jsonl"):
            require_file(path / name, "the subset file")
            if (path / name).is_file():
                return path / name
        raise PrefsiftError(f"{selected} holds no selected.parquet or selected.jsonl: run `prefsift select` "
                            "into it, or pass the subset file")
    require_file(path, "--selected")
    if not path.is_file():
        raise PrefsiftError(f"--selected {selected}: no such file or directory")
    return path


def read_selected(selected: str | Path) -> tuple[LoadedPairs, list | None]:
    """A `prefsift select` output directory (its selected.parquet) or any pairs file, through prefsift's own
    normalization; with the subset's `weight` column when it has one."""
    data = load_pairs(str(selected_file(selected)))
    if data.kind == "unpaired":
        raise DataError(f"{selected}: unpaired (KTO) rows; export writes preference pairs")
    weight = data.raw["weight"] if "weight" in data.raw.column_names else None
    return data, weight


def _table(data: LoadedPairs, weight: list | None) -> dict[str, list]:
    columns = {name: list(data.pairs[name]) for name in ("prompt", "chosen", "rejected", "pair_id")}
    if weight is not None:
        columns["weight"] = [None if w is None else float(w) for w in weight]
    return columns


def _rows(columns: dict[str, list]) -> list[dict]:
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _one_answer(messages: list[dict], side: str, pair_id: str, tool: str) -> dict:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise PrefsiftError(f"pair {pair_id}: {side} is {len(messages)} message(s) ({messages[0]['role']} first); "
                            f"{tool}'s pairwise format takes one assistant message")
    return messages[0]


def _alternating_prompt(prompt: list[dict], pair_id: str) -> None:
    """LLaMA-Factory's sharegpt reader drops (with a log line only) a prompt that does not alternate user /
    assistant from a user turn, after an optional system message, and end on a user turn: refuse it here."""
    turns = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m["role"] for m in turns] != expected or len(turns) % 2 == 0:
        raise PrefsiftError(f"pair {pair_id}: prompt roles {[m['role'] for m in prompt]} do not alternate user / "
                            "assistant ending on user, as LLaMA-Factory's sharegpt format needs")


def replace_together(contents: dict[Path, str]) -> list[Path]:
    """Write several files so that they change together: every new file is written beside its target first, then
    each replaces its target; a failure before the last replace puts the earlier files back, so a reader sees the
    old set or the new one (LLaMA-Factory's data file and the dataset_info.json entry that describes it)."""
    staged_files, backups, done = {}, {}, []
    try:
        for path, text in contents.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged_files[path] = temp_sibling(path)
            staged_files[path].write_text(text, encoding="utf-8")
        for path, tmp in staged_files.items():
            if path.exists():
                backups[path] = temp_sibling(path)
                try:
                    os.link(path, backups[path])  # a hard link: the old file stays where it is until replaced
                except OSError:  # a filesystem without hard links: a copy does the same
                    shutil.copy2(path, backups[path])
            tmp.replace(path)
            done.append(path)
    except BaseException:
        for path in done:  # undo in any order: each target gets its old file back, or goes if it had none
            if path in backups:
                backups.pop(path).replace(path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for leftover in [*staged_files.values(), *backups.values()]:
            leftover.unlink(missing_ok=True)
    return list(contents)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1) + "\n"


# The key orders of the JSON lines `trl`, `openrlhf` and `axolotl` write (`_rows`, `export_axolotl`)
JSONL_LAYOUTS = {("prompt", "chosen", "rejected", "pair_id"), ("prompt", "chosen", "rejected", "pair_id", "weight"),
                 ("messages", "chosen", "rejected", "pair_id")}


def written_by_export(path: Path) -> bool:
    """Whether `path` is, byte for byte, JSON lines as an export writes them (`write_jsonl`: one object a line in one
    of JSONL_LAYOUTS' key orders, serialized as json.dumps does): a rerun may replace such a file; a user's own
    file, or one edited by hand since, is refused. An empty file holds nothing to lose."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return False
                row = json.loads(line)
                if not isinstance(row, dict) or tuple(row) not in JSONL_LAYOUTS or \
                        json.dumps(row, ensure_ascii=False, allow_nan=False) != line[:-1]:
                    return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def _llamafactory_entries(name: str) -> list[dict]:
    """The two dataset_info.json entries an export writes for `name`: alpaca (text) and sharegpt (messages)."""
    return [{"file_name": f"{name}.json", "ranking": True,
             "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
            {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True,
             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
             "tags": dict(LLAMAFACTORY_TAGS)}]


def _jsonl_path(out: Path, fmt: str) -> Path:
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out of --format {fmt} is a .jsonl file (got {out})")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; --format {fmt} writes a .jsonl file")
    return out


def output_files(fmt: str, target: Path, name: str) -> dict[str, Path]:
    """What a local export writes, by what each path is: the files (a directory for `datasets`) it creates or
    replaces."""
    if fmt == "datasets":
        return {"the dataset directory": target}
    if fmt == "llamafactory":
        return {f"the data file of --name {name}": target / f"{name}.json",
                "LLaMA-Factory's dataset_info.json": target / "dataset_info.json"}
    return {f"the {fmt} file": target}


def _same_place(a: Path, b: Path) -> bool:
    """Whether two paths are one file: the same directory (links resolved) and the same name up to case (a
    case-insensitive filesystem, macOS's and Windows' default, makes `Dataset_Info.json` the info file), or, both
    existing, one inode (a hard link)."""
    def key(p: Path) -> tuple[str, str]:
        p = Path(os.path.abspath(p))
        return str(p.parent.resolve()), p.name.casefold()

    if key(a) == key(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_collisions(outputs: dict[str, Path], selected: Path) -> None:
    """One line, before anything is written, when two of an export's outputs are one file (the second write would
    replace the first: `--name dataset_info` made the data file the info file), or an output is the subset being
    read, or holds it (a directory replaced whole)."""
    items = list(outputs.items())
    for i, (what, path) in enumerate(items):
        for other, other_path in items[i + 1:]:
            if _same_place(path, other_path):
                raise ConfigError(f"{what} and {other} would be one file, {path}: choose another "
                                  f"{'--name' if '--name' in what + other else '--out'}")
    source = Path(os.path.abspath(selected))
    for what, path in items:
        if _same_place(path, source) or Path(os.path.abspath(path)).resolve() in source.resolve().parents:
            raise ConfigError(f"--out {path}: {what} would replace the subset it is exported from ({selected}); "
                              f"export to another place")


def export_datasets(columns: dict[str, list], out: Path, record: dict) -> list[Path]:
    """A save_to_disk directory, written into a staging directory swapped in whole (prefsift.output), with a
    manifest.json beside the dataset files so a rerun may replace it (load_from_disk reads only its own files)."""
    with staged(out, "export") as tmp:
        datasets.Dataset.from_dict(columns).save_to_disk(str(tmp))
        write_manifest(tmp, "export", record)
    return [out]


def export_hub(columns: dict[str, list], repo_id: str, config: ExportConfig) -> None:
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ConfigError(f"--out of --format hub is a dataset repo id, owner/name (got {repo_id!r})")
    try:
        datasets.Dataset.from_dict(columns).push_to_hub(repo_id, split=config.split, private=config.private)
    except (OSError, ValueError) as error:  # offline, no token, no permission: the hub's own message, one line
        raise PrefsiftError(f"push to {repo_id} failed: {str(error).splitlines()[0]}") from None


def export_llamafactory(columns: dict[str, list], conversational: bool, out: Path, name: str) -> list[Path]:
    """DIR/<name>.json + DIR/dataset_info.json (an existing one keeps its other entries)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out of --format llamafactory is a directory (LLaMA-Factory's dataset_dir); {out} is "
                          "a file")
    rows = []
    for prompt, chosen, rejected, pair_id in zip(columns["prompt"], columns["chosen"], columns["rejected"],
                                                 columns["pair_id"], strict=True):
        if conversational:
            _alternating_prompt(prompt, pair_id)
            rows.append({"conversations": prompt, "chosen": _one_answer(chosen, "chosen", pair_id, "LLaMA-Factory"),
                         "rejected": _one_answer(rejected, "rejected", pair_id, "LLaMA-Factory"),
                         "pair_id": pair_id})
        else:
            rows.append({"instruction": prompt, "chosen": chosen, "rejected": rejected, "pair_id": pair_id})
    entry = _llamafactory_entries(name)[1 if conversational else 0]
    info_path = out / "dataset_info.json"
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PrefsiftError(f"{info_path} is not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(info, dict):
            raise PrefsiftError(f"{info_path} is not a mapping of dataset names")
    for other, value in info.items():  # another dataset's data file would be replaced by this one's
        if other != name and isinstance(value, dict) and isinstance(value.get("file_name"), str) and \
                _same_place(out / value["file_name"], out / entry["file_name"]):
            raise ConfigError(f"{info_path}: dataset '{other}' already reads {value['file_name']}; choose another "
                              f"--name than {name!r}")
    # LLaMA-Factory's dataset_dir holds other datasets: only a dataset an export wrote under this name is replaced
    ours = info.get(name) in _llamafactory_entries(name)
    if name in info and not ours:
        raise ConfigError(f"{info_path} already has a dataset '{name}' that no prefsift export wrote: choose another "
                          f"--name")
    if (out / entry["file_name"]).exists() and not ours:
        raise ConfigError(f"{out / entry['file_name']} exists and no prefsift export wrote it (dataset_info.json has "
                          f"no prefsift dataset '{name}'): choose another --name")
    info[name] = entry
    return replace_together({out / f"{name}.json": _json_text(rows), info_path: _json_text(info)})


def export_axolotl(columns: dict[str, list], conversational: bool, out: Path) -> list[Path]:
    if not conversational:  # user_defined.default: prompt_format "{prompt}" keeps the text as it is
        rows = [{"prompt": p, "chosen": c, "rejected": r, "pair_id": i} for p, c, r, i in
                zip(columns["prompt"], columns["chosen"], columns["rejected"], columns["pair_id"], strict=True)]
    else:  # chat_template.default: the prompt messages, one chosen and one rejected message
        rows = [{"messages": p, "chosen": _one_answer(c, "chosen", i, "Axolotl"),
                 "rejected": _one_answer(r, "rejected", i, "Axolotl"), "pair_id": i} for p, c, r, i in
                zip(columns["prompt"], columns["chosen"], columns["rejected"], columns["pair_id"], strict=True)]
    return [write_jsonl(_jsonl_path(out, "axolotl"), rows)]


def usage(fmt: str, out: str, conversational: bool, config: ExportConfig) -> str:
    """How the consuming tool reads what was written (the README gives the same, with context)."""
    if fmt == "datasets":
        return f"datasets.load_from_disk({out!r}) → TRL's DPOTrainer(train_dataset=...)"
    if fmt == "hub":
        return f"datasets.load_dataset({out!r}, split={config.split!r})"
    if fmt == "trl":
        return f"DPOTrainer(train_dataset=datasets.load_dataset('json', data_files={out!r}, split='train'), ...)"
    if fmt == "llamafactory":
        return f"llamafactory-cli train with `stage: dpo`, `dataset_dir: {out}`, `dataset: {config.name}`"
    if fmt == "openrlhf":
        return (f"deepspeed --module openrlhf.cli.train_dpo --dataset {out} --prompt_key prompt --chosen_key chosen "
                "--rejected_key rejected" + (" --apply_chat_template" if conversational else ""))
    kind = ("type: chat_template.default, field_messages: messages, field_chosen: chosen, field_rejected: rejected"
            if conversational else "type: {field_prompt: prompt, field_chosen: chosen, field_rejected: rejected}")
    return f"axolotl yaml: rl: dpo, datasets: [{{path: {out}, ds_type: json, split: train, {kind}}}]"


def export(selected: str | Path, out: str, config: ExportConfig | None = None) -> Exported:
    """Write the subset at `selected` to `out` in `config.format`'s layout."""
    config = config or ExportConfig()
    target = Path(out)
    fmt = config.format
    if fmt != "hub":  # every file it would write is distinct, and none is the subset it reads: before any work
        check_collisions(output_files(fmt, target, config.name), selected_file(selected))
    if fmt in ("trl", "openrlhf", "axolotl"):  # never a user's own file, nor a file inside another stage's results
        check_output_file(_jsonl_path(target, fmt), "export", written_by_export)
    elif fmt == "llamafactory" and stage_of(target) is not None:  # a dataset_dir is the user's and holds other
        # datasets; a stage's results directory is swapped whole
        raise ConfigError(f"--out {target} holds the results of `prefsift {stage_of(target)}`: give LLaMA-Factory's "
                          f"dataset_dir")
    data, weight = read_selected(selected)
    columns = _table(data, weight)
    conversational = data.conversational
    if fmt == "hub":
        export_hub(columns, out, config)
        paths = []
    else:
        if fmt == "datasets":
            check_output(target, "export")  # a file, another stage's results, a foreign directory: one line
        elif fmt != "llamafactory":
            _jsonl_path(target, fmt)
        existed = target.exists()
        try:
            paths = _write_local(fmt, columns, conversational, target, config, selected, len(data.pairs))
        except OSError as error:  # a full disk, a read-only place: the path being written, the earlier files kept
            if error.errno not in _WRITE_ERRORS:
                raise
            if not existed and target.is_dir() and not any(target.iterdir()):
                target.rmdir()  # the dataset_dir this export made, left empty: as it was before
            reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
            raise PrefsiftError(f"cannot write {target}: {reason}; what an earlier export wrote there is "
                                f"unchanged") from None
    return Exported(paths, len(data.pairs), conversational, usage(fmt, out, conversational, config),
                    len(data.invalid))


_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_local(fmt: str, columns: dict, conversational: bool, target: Path, config: ExportConfig,
                 selected, n_pairs: int) -> list[Path]:
    """A local export's files, under a lock beside the target: a second export into it is refused while this one
    writes; each format's files are replaced whole (staged directory, atomic file, or files replaced together)."""
    with locked(target):
        if fmt == "datasets":
            paths = export_datasets(columns, target, {"selected": str(selected), "format": fmt,
                                                      "n_pairs": n_pairs})
        elif fmt in ("trl", "openrlhf"):  # both read prompt / chosen / rejected, text or messages, as they are
            paths = [write_jsonl(_jsonl_path(target, fmt), _rows(columns))]
        elif fmt == "llamafactory":
            paths = export_llamafactory(columns, conversational, target, config.name)
        elif fmt == "axolotl":
            paths = export_axolotl(columns, conversational, target)
        else:  # the config's choices check makes this unreachable
            raise ConfigError(f"unknown format {fmt!r}")
    return paths
