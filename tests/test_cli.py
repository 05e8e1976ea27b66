"""The command line: the score → select → train → eval flow on files, and one clear line for each bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import invoke, make_pairs, make_tiny_llama, naive


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "sft"
    make_tiny_llama(bpe_tokenizer).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    rows = make_pairs(40, seed=21)
    rows.append({"prompt": "q", "chosen": " same", "rejected": " same"})  # invalid: chosen == rejected
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model_dir, data


@pytest.mark.e2e
def test_score_select_train_eval(workspace, monkeypatch):
    root, model, data = workspace
    rows = [json.loads(line) for line in data.read_text().splitlines()][:40]
    # A policy to score: one DPO epoch from the SFT model (what `run` calls the warm-up).
    warm = root / "warm"
    result = invoke("train", "--data", data, "--model", model, "--out", warm, "--max-length", 64,
                    "--learning-rate", 5e-3, "--batch-size", 4, "--no-gradient-checkpointing")
    assert result.exit_code == 0, result.output
    assert "trained dpo on 40 of 41 rows (1 invalid input row left out" in " ".join(result.output.split())

    scores = root / "scores"
    result = invoke("score", "--data", data, "--method", "irm", "--model", warm, "--reference", model, "--out",
                    scores, "--max-length", 64, "--param", "band_low=0.25", "--param", "band_high=0.75")
    assert result.exit_code == 0, result.output
    table = pq.read_table(scores / "scores.parquet").to_pydict()
    assert len(table["pair_id"]) == 40  # the invalid row was skipped and reported
    assert set(table) >= {"pair_id", "irm", "chosen_logps", "rejected_logps", "ref_chosen_logps",
                          "ref_rejected_logps"}
    manifest = json.loads((scores / "manifest.json").read_text())
    assert manifest["engine"]["max_length"] == 64 and manifest["data"]["hash"] and manifest["versions"]["trl"]
    assert manifest["versions"]["torch_threads"] == torch.get_num_threads()  # the count this run used
    assert manifest["methods"]["irm"]["params"] == {"band_low": 0.25, "band_high": 0.75}
    assert manifest["models"]["reference"]["tokenizer"] and manifest["models"]["policy"]["fingerprint"]
    assert "Creating parquet" not in result.output  # datasets' own bars stay quiet

    # The method's own rule with the parameters it was scored with: the 25th-75th percentile band of irm.
    selected = root / "selected"
    result = invoke("select", "--scores", scores, "--out", selected)
    assert result.exit_code == 0, result.output
    irm = np.asarray(table["irm"])
    ranks = np.empty(40)
    ranks[np.argsort(irm, kind="stable")] = np.arange(40) / 39
    expected = {table["pair_id"][i] for i in np.flatnonzero((ranks >= 0.25) & (ranks <= 0.75))}
    lines = [json.loads(line) for line in (selected / "selected.jsonl").read_text().splitlines()]
    assert {line["pair_id"] for line in lines} == expected
    assert set(lines[0]) == {"prompt", "chosen", "rejected", "pair_id"}  # the input's own columns
    assert pq.read_table(selected / "selected.parquet").num_rows == len(expected)

    # Continue from the warm-up policy against the SFT reference, whose log-probs come from the scores.
    import prefsift.engine

    monkeypatch.setattr(prefsift.engine, "compute_logps", lambda *a, **k: pytest.fail("reference pass recomputed"))
    trained = root / "trained"
    result = invoke("train", "--data", selected / "selected.jsonl", "--model", warm, "--reference", model,
                    "--out", trained, "--scores", scores, "--learning-rate", 1e-3, "--batch-size", 4,
                    "--no-gradient-checkpointing")
    assert result.exit_code == 0, result.output
    assert (trained / "model.safetensors").is_file()
    monkeypatch.undo()

    evaluated = root / "eval"
    result = invoke("eval", "--model", trained, "--reference", model, "--data", data, "--out", evaluated,
                    "--max-length", 64, "--beta", 0.3)
    assert result.exit_code == 0, result.output
    # preference accuracy from textbook log-probs of both models
    from prefsift.models import load_model

    policy, reference = load_model(str(trained), device="cpu"), load_model(str(model), device="cpu")
    lp = {k: naive(m.model, m.tokenizer, rows) for k, m in (("policy", policy), ("reference", reference))}
    margin = 0.3 * ((lp["policy"][:, 0] - lp["reference"][:, 0]) - (lp["policy"][:, 1] - lp["reference"][:, 1]))
    accuracy = json.loads((evaluated / "eval.json").read_text())["pref_accuracy"]
    assert accuracy == pytest.approx(np.mean(margin > 0), abs=1e-9)


def test_same_seed_same_subset(workspace):
    root, model, data = workspace
    outs = []
    for k in range(2):
        scores = root / f"random{k}"
        assert invoke("score", "--data", data, "--method", "random", "--seed", 5, "--out", scores).exit_code == 0
        assert invoke("select", "--scores", scores, "--fraction", 0.3, "--out", scores / "sel").exit_code == 0
        outs.append((scores / "sel" / "selected.jsonl").read_text())
    assert outs[0] == outs[1]


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in " ".join(result.output.split()), result.output


def test_bad_inputs_fail_with_one_line(workspace, tmp_path):
    root, model, data = workspace
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(make_pairs(1)[0]) + "\n{not json\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_column = tmp_path / "nocol.jsonl"
    no_column.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    out = tmp_path / "o"
    one_line_error(invoke("score", "--data", tmp_path / "missing.jsonl", "--method", "random", "--out", out),
                   "file not found")
    one_line_error(invoke("score", "--data", broken, "--method", "random", "--out", out), "line 2", "invalid JSON")
    one_line_error(invoke("score", "--data", empty, "--method", "random", "--out", out), "no rows")
    one_line_error(invoke("score", "--data", no_column, "--method", "random", "--out", out),
                   "missing column", "question")
    one_line_error(invoke("score", "--data", data, "--method", "nope", "--out", out),
                   "unknown method 'nope'", "lossdiff-irm")
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--model", tmp_path / "nope", "--out", out),
                   "model path not found")
    one_line_error(invoke("score", "--data", data, "--method", "irm", "--out", out), "needs --model")
    one_line_error(invoke("score", "--data", data, "--method", "random", "--out", out, "--on-invalid", "fail"),
                   "chosen == rejected", "line 41")
    scores = root / "scores-bad"
    assert invoke("score", "--data", data, "--method", "random", "--out", scores).exit_code == 0
    one_line_error(invoke("select", "--scores", scores, "--fraction", 1.5, "--out", out), "(0, 1]")
    one_line_error(invoke("select", "--scores", scores, "--fraction", 0, "--out", out), "(0, 1]")
    one_line_error(invoke("select", "--scores", tmp_path, "--fraction", 0.5, "--out", out), "no manifest.json")
    one_line_error(invoke("select", "--scores", scores, "--rule", "top", "--column", "irm", "--fraction", 0.5,
                          "--out", out), "no score column 'irm'")
    one_line_error(invoke("train", "--data", data, "--model", model, "--out", out, "--algo", "ppo"),
                   "--algo must be one of dpo, kto")
    one_line_error(invoke("run", "--config", tmp_path / "none.yaml"), "config file not found")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: x\nmodel: y\nfractions: [0.1]\nwarmup_share: 0.5\n")
    one_line_error(invoke("run", "--config", bad_yaml), "unknown option(s) warmup_share")


@pytest.mark.e2e
def test_train_config_yaml_and_eval_without_reference(workspace, tmp_path):
    root, model, data = workspace
    config = tmp_path / "train.yaml"
    config.write_text("algo: kto\nlearning_rate: 0.001\nbatch_size: 4\nmax_length: 64\nepochs: 1.0\n"
                      "gradient_checkpointing: false\n")
    result = invoke("train", "--data", data, "--model", model, "--out", tmp_path / "kto", "--config", config)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "kto" / "manifest.json").read_text())["config"]["algo"] == "kto"
    result = invoke("eval", "--model", model, "--data", data, "--out", tmp_path / "ev", "--max-length", 64)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for stage in ("kto", "ev"):  # the invalid input row is listed beside the model and the evaluation
        assert [json.loads(line) for line in (tmp_path / stage / "dropped.jsonl").read_text().splitlines()] == [
            {"row": 41, "stage": "data", "reason": "chosen == rejected"}]
    assert "pref_accuracy" not in record and 0 <= record["logp_accuracy"] <= 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nmodel: y\ntrain: 5\n")
    one_line_error(invoke("run", "--config", bad), "expected a mapping")
    bad.write_text("data: x\nmodel: y\nfractions: [a]\n")
    one_line_error(invoke("run", "--config", bad), "must be a number")


def test_scale_plans_the_share_of_a_known_curve(tmp_path):
    r, a, b = 0.7, 0.5, 8.0  # R(x) = r − (r − a)·exp(−b·x), sampled without noise
    shares = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    csv = tmp_path / "points.csv"
    csv.write_text("share,score\n" + "".join(f"{x},{r - (r - a) * np.exp(-b * x)}\n" for x in shares))
    result = invoke("scale", "--points", csv, "--out", tmp_path / "scale")
    assert result.exit_code == 0, result.output
    fitted = json.loads((tmp_path / "scale" / "scaling.json").read_text())
    assert fitted["params"]["b"] == pytest.approx(b, rel=1e-4)
    assert fitted["plan"]["share"] == pytest.approx(np.log(20) / b, rel=1e-4)  # 95% of the gain
    assert (tmp_path / "scale" / "scaling.png").stat().st_size > 1000
    one_line_error(invoke("scale", "--out", tmp_path / "s2"), "exactly one of --points or --results")


@pytest.mark.e2e
def test_several_methods_one_scores_file_and_analyze(workspace, tmp_path):
    """`--method tif,lossdiff-irm` runs each model's passes once into one scores file; `analyze` reads it."""
    root, model, data = workspace
    warm, val = root / "warm-analyze", root / "val-analyze"
    common = ["--max-length", 64, "--batch-size", 4, "--no-gradient-checkpointing"]
    assert invoke("train", "--data", data, "--model", model, "--out", warm, "--learning-rate", 5e-3,
                  *common).exit_code == 0
    assert invoke("train", "--data", data, "--model", warm, "--out", val, "--learning-rate", 5e-3,
                  *common).exit_code == 0
    out = tmp_path / "scores"
    result = invoke("score", "--data", data, "--method", "tif,lossdiff-irm", "--model", warm, "--reference", model,
                    "--validation", val, "--validation-data", data, "--max-length", 64, "--out", out,
                    "--param", "lossdiff-irm.band_low=0.2", "--param", "tif.step=1e-4")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["lossdiff-irm"]["params"]["band_low"] == 0.2
    assert manifest["methods"]["tif"]["params"]["step"] == 1e-4
    one_line_error(invoke("select", "--scores", out, "--fraction", 0.5, "--out", tmp_path / "s"), "--method")
    result = invoke("select", "--scores", out, "--method", "tif", "--out", tmp_path / "s")
    assert result.exit_code == 0 and "band" in result.output
    result = invoke("analyze", str(out))
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    table = pq.read_table(out / "scores.parquet").to_pydict()
    irm, influence = np.asarray(table["irm"]), np.asarray(table["influence"])
    assert analysis["correlations"]["irm"]["pearson"] == pytest.approx(np.corrcoef(irm, influence)[0, 1], abs=1e-6)
    one_line_error(invoke("score", "--data", data, "--method", "irm,irm", "--out", tmp_path / "x"), "distinct")
    one_line_error(invoke("score", "--data", data, "--method", "random,irm", "--param", "band_low=0.2", "--out",
                          tmp_path / "x"), "name one")


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize(("yaml_text", "flags", "expected"), [
    ("", (), False),
    ("trust_remote_code: true\ndevice: cpu\ndtype: float32\n", (), True),
    ("trust_remote_code: true\n", ("--no-trust-remote-code",), False),  # the flag wins over the YAML
    ("", ("--trust-remote-code",), True),
])
def test_model_options_reach_the_loader_from_yaml_and_flags(tmp_path, monkeypatch, command, yaml_text, flags,
                                                             expected):
    import prefsift.models
    from prefsift.errors import PrefsiftError

    seen = {}

    def spy(source, **kwargs):
        seen.update(kwargs)
        raise PrefsiftError("loader reached")  # the options are all this test needs

    monkeypatch.setattr(prefsift.models, "load_model", spy)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(4, seed=1)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text or "{}\n")
    result = invoke(command, "--data", data, "--model", "m", "--out", tmp_path / "o", "--config", config, *flags)
    assert result.exit_code == 2 and "loader reached" in result.output, result.output
    assert seen["trust_remote_code"] is expected
    if "device: cpu" in yaml_text:
        assert (seen["device"], seen["dtype"]) == ("cpu", "float32")


def test_compare_takes_the_model_options_and_lora_from_flags_and_yaml(tmp_path, monkeypatch):
    import yaml

    import prefsift.compare

    seen = {}
    monkeypatch.setattr(prefsift.compare, "compare", lambda config, log: seen.setdefault("config", config) and
                        {"markdown": "", "summary": [], "records": []})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": "d.jsonl", "model": "m", "trust_remote_code": True,
                                      "train": {"lora": True, "lora_alpha": 8}, "engine": {"dtype": "bfloat16"}}))
    result = invoke("compare", "--config", config, "--methods", "irm", "--lora-r", 4, "--device", "cpu",
                    "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    run = seen["config"]
    assert run.trust_remote_code and (run.engine.device, run.engine.dtype) == ("cpu", "bfloat16")
    assert (run.train.lora, run.train.lora_r, run.train.lora_alpha) == (True, 4, 8)


@pytest.mark.parametrize(("flags", "message"), [
    (("--correction", "bonferroni"), "--correction must be holm or bh"),
    (("--alpha", "0"), "--alpha must be a number in (0, 1)"),
    (("--margin", "nan"), "--margin must be a finite number >= 0")])
def test_report_refuses_a_correction_it_does_not_know(tmp_path, flags, message):
    result = invoke("report", tmp_path, *flags)
    assert result.exit_code == 2 and f"error: {message}" in result.output, result.output
    assert "Traceback" not in result.output


def _help(*args: str, columns: int):
    from typer.testing import CliRunner

    from prefsift.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_help_page_fits_80_columns_and_shows_every_option():
    """Each command's --help at 80 columns: no line longer, no name cut ("…"), every flag (and its --no- form) and
    argument there in full, options in their panels; help text printed as it is, never read as rich markup."""
    import typer

    from prefsift.cli import app

    group = typer.main.get_command(app)
    assert len(group.commands) == 13
    for name, command in [("", group), *group.commands.items()]:
        page = _help(*([name] if name else []), columns=80)
        lines = page.splitlines()
        assert max(len(line) for line in lines) <= 80, (name, max(lines, key=len))
        assert "…" not in page, name
        for param in command.params:
            names = param.opts + param.secondary_opts if param.param_type_name == "option" else [param.name.upper()]
            for flag in names:
                assert any(flag in line.split() for line in lines), (name, flag)
    for name in group.commands:  # a wide terminal gets lines a reader can follow: at most 100 columns
        assert max(len(line) for line in _help(name, columns=200).splitlines()) <= 100
    page = _help("train", columns=80)
    titles = [line.split()[1] for line in page.splitlines() if line.startswith("╭─")]
    assert titles == ["Data", "Model", "Training", "Engine", "Output", "Options"]
    panel = {}  # each flag's panel
    for line in page.splitlines():
        if line.startswith("╭─"):
            title = line.split()[1]
        elif line.startswith("│ --"):
            panel[line.split()[1]] = title
    assert (panel["--data"], panel["--model"], panel["--learning-rate"], panel["--max-length"], panel["--out"]) == (
        "Data", "Model", "Training", "Engine", "Output")
    said = " ".join(page.split())
    assert "[default: 1024]" in said and "hub name[:split]" in said  # brackets as written, not markup


def test_help_of_a_compare_sorts_the_run_settings_into_panels():
    page = " ".join(_help("compare", columns=80).split())
    for title in ("Data", "Model", "Pipeline", "Statistics", "Training", "Engine", "Output"):
        assert f"╭─ {title} ─" in page, title
    assert "[default: ]" not in page  # an empty default (data, model: required) is not shown as one


def test_a_narrow_terminal_puts_each_help_below_its_name():
    lines = _help("train", columns=40).splitlines()
    assert max(len(line) for line in lines) <= 40
    names = [k for k, line in enumerate(lines) if line.startswith("│ --max-length")]
    assert len(names) == 1 and lines[names[0] + 1].split()[1:3] == ["Token", "cut-off"]  # its help on the next line
