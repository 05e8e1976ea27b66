"""The run's splits: train, validation and test rows by a seeded hash of the prompt, so pairs sharing a prompt land
in the same split and no test prompt is trained on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from prefsift.config import RunConfig
from prefsift.data import LoadedPairs, data_hash_of, load_pairs
from prefsift.errors import ConfigError
from prefsift.evaluate import win_rate_prompts
from prefsift.scorers import parse_methods


def hash_order(keys: list[str], seed: int) -> np.ndarray:
    hashes = [hashlib.sha256(f"{seed}:{key}".encode()).hexdigest() for key in keys]
    return np.argsort(np.asarray(hashes), kind="stable")


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def split_pairs(data: LoadedPairs, validation_fraction: float, test_fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, validation, test), by a seeded hash of the PROMPT: pairs that share a prompt land in
    the same split, so no test prompt (nor its win-rate question) was trained on. Reproducible and order-free."""
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(data.pairs["prompt"]):
        groups.setdefault(_prompt_key(prompt), []).append(row)
    keys = list(groups)
    n = len(data.pairs)
    targets = (round(test_fraction * n), round(validation_fraction * n))
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])  # test, validation, train
    for g in hash_order(keys, seed):
        rows = groups[keys[g]]
        part = 0 if len(splits[0]) < targets[0] else 1 if len(splits[1]) < targets[1] else 2
        splits[part].extend(rows)
    test, validation, train_rows = (np.sort(np.asarray(x, dtype=int)) for x in splits)
    return train_rows, validation, test


@dataclass
class Splits:
    train: LoadedPairs
    validation: LoadedPairs
    test: LoadedPairs | None
    eval_prompts: list
    n_held_out_prompts_removed: int = 0  # training pairs dropped because their prompt is a validation/test prompt


def subset(data: LoadedPairs, rows: np.ndarray) -> LoadedPairs:
    rows = rows.tolist()
    return LoadedPairs(pairs=data.pairs.select(rows), raw=data.raw.select(rows), kind=data.kind, invalid=[],
                       n_read=len(rows), source=data.source,
                       data_hash=data_hash_of(data.pairs.select(rows)["pair_id"]), keys=data.keys)


def make_splits(config: RunConfig) -> Splits:
    keys = {"prompt_key": config.prompt_key, "chosen_key": config.chosen_key, "rejected_key": config.rejected_key,
            "chat_template": config.chat_template}
    data = load_pairs(config.data, **keys)
    train_rows, val_rows, test_rows = split_pairs(
        data, 0.0 if config.validation_data else config.validation_fraction,
        0.0 if config.test_data else config.test_fraction, config.seed)
    validation = load_pairs(config.validation_data, **keys) if config.validation_data else subset(data, val_rows)
    test = load_pairs(config.test_data, **keys) if config.test_data else subset(data, test_rows)
    # A user's own validation/test file may share prompts with the training data: train on none of them.
    held_out = {_prompt_key(p) for split in (validation, test) for p in split.pairs["prompt"]}
    prompts = data.pairs["prompt"]
    kept = np.asarray([r for r in train_rows if _prompt_key(prompts[int(r)]) not in held_out], dtype=int)
    if any("validation" in s.needs or "validation_pairs" in s.needs for s in parse_methods(config.methods)) \
            and len(validation.pairs) == 0:
        raise ConfigError("the validation split is empty: raise validation_fraction or give validation_data")
    return Splits(subset(data, kept), validation, test, win_rate_prompts(test, config.eval.eval_prompts),
                  len(train_rows) - len(kept))
