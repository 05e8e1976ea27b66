"""Settings declared once: checks at construction, YAML with strict keys, CLI flags generated from the fields."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from prefsift.cli import app
from prefsift.config import EngineConfig, RunConfig, TrainConfig
from prefsift.errors import ConfigError
from prefsift.pipeline import load_run_config
from prefsift.scorers import parse_methods
from prefsift.settings import from_dict, load_yaml, parse_params, split_flags


def test_yaml_sections_types_and_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: d.jsonl\nmodel: m\nengine: {beta: 0.2, max_length: 256}\n"
                    "train: {learning_rate: 5e-7, epochs: 2}\nmethods: [random, {name: irm, band_low: 0.2}]\n")
    config = from_dict(RunConfig, load_yaml(path), str(path))
    assert config.engine == EngineConfig(beta=0.2, max_length=256)
    assert config.train.learning_rate == 5e-7 and isinstance(config.train.epochs, float)  # YAML 1.2 floats
    assert [s.describe()["params"] for s in parse_methods(config.methods)] == [{}, {"band_low": 0.2,
                                                                                   "band_high": 0.9}]


@pytest.mark.parametrize(("text", "message"), [
    ("data: x\nengine: {beta: .nan}\n", "beta must be a finite number"),
    ("data: x\nengine: {max_length: 0}\n", "max_length must be >= 2"),
    ("data: x\nengine: {device: cuda0}\n", "device must look like cpu, cuda"),
    ("data: x\nseed: -1\n", "seed must be >= 0"),
    ("data: x\nseed: true\n", "seed must be an integer"),
    ("data: x\nfractions: [0.1, 0]\n", r"fractions\[1\] must be > 0"),
    ("data: x\nmethods: [{name: irm, band_low: 0.95}]\n", "method 'irm': band cut-offs"),
    ("data: x\nmethods: [irm, irm]\n", "each method once"),
    ("data: x\ntrain: {algo: kto}\n", "run trains with DPO"),
    ("data: x\nengine: {betta: 1}\n", r"engine: unknown option\(s\) betta"),
    ("data: x\ntrain: 5\n", "train: expected a mapping"),
])
def test_bad_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(load_yaml(path), str(path))


def test_yaml_that_is_not_utf8(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"data: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(path)


def test_params_and_flat_options():
    assert parse_params(["band_low=0.2", "scope=last_k", "lora=true", "name=", "lossdiff-irm.band-high=0.8"]) == {
        "band_low": 0.2, "scope": "last_k", "lora": True, "name": "", "lossdiff-irm.band_high": 0.8}
    with pytest.raises(ConfigError, match="key=value"):
        parse_params(["band_low"])
    train, engine = split_flags({"beta": 0.3, "epochs": 2.0}, TrainConfig, EngineConfig)
    assert train == {"epochs": 2.0} and engine == {"beta": 0.3}
    with pytest.raises(ConfigError, match="unknown option 'betta'"):
        split_flags({"betta": 1}, TrainConfig, EngineConfig)


def test_every_field_is_a_flag_with_its_help():
    """The CLI flags come from the dataclasses: each option's help text is the field's, so they cannot drift."""
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "1000"}).output.split())
    for cls in (TrainConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in help_text
            assert " ".join(f.metadata["help"].split())[:40] in help_text


def test_a_bad_flag_names_the_flag(tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", "x", "--model", "m", "--out", str(tmp_path / "o"),
                                      "--epochs", "0"])
    assert result.exit_code == 2 and "--epochs must be > 0" in result.output


def test_scheduler_choices_are_transformers_own():
    from transformers import SchedulerType

    from prefsift.config import SCHEDULERS

    assert set(SCHEDULERS) == {s.value for s in SchedulerType}
    with pytest.raises(ConfigError, match="lr_scheduler_type must be one of"):
        TrainConfig(lr_scheduler_type="bogus")


@pytest.mark.parametrize(("values", "message"), [
    ({"correction": "bonferroni"}, "correction must be one of"),
    ({"alpha": 0.0}, "alpha must be > 0"),
    ({"alpha": 1.0}, "alpha must be < 1"),
    ({"noninferiority_margin": -0.01}, "noninferiority_margin must be >= 0"),
])
def test_a_tables_family_settings_are_checked(values, message):
    """The correction of a table's tests (prefsift.stats reads them through settings_of) is refused out of range."""
    with pytest.raises(ConfigError, match=message):
        RunConfig(data="d", model="m", **values)


def test_run_and_compare_carry_the_family_settings_to_the_tables():
    from prefsift.stats import settings_of

    config = from_dict(RunConfig, {"data": "d", "model": "m", "correction": "bh", "alpha": 0.1}, "run.yaml")
    assert settings_of(config) == {"correction": "bh", "alpha": 0.1, "margin": 0.02}
