"""The test helpers, in one module: tiny models and tokenizers built in the test (no hub, no download), pair
tables, the textbook log-prob, a provider, a table embedder, score directories and the CLI runner. conftest.py keeps
the fixtures; a test module imports helpers from here, never from another test module."""

from __future__ import annotations

import hashlib
import json
import random
from contextlib import contextmanager

import numpy as np
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from prefsift.config import EngineConfig
from prefsift.data import load_pairs
from prefsift.resources import Resources

WORDS = ("the cat dog sat on mat ran far near house tree big small red blue why how what is are you "
         "human assistant please tell me about a joke story help can not sure yes no maybe").split()
BETA = 0.2  # the DPO temperature of the hand computations (test_scorers, test_peer_scorers)


# --- text and pairs ------------------------------------------------------------------------------------------------
def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "\n\nHuman: " + random_text(rng, rng.randint(2, 25)) + "\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": " " + random_text(rng, rng.randint(1, 20)),
                     "rejected": " " + random_text(rng, rng.randint(1, 20))})
    return rows


def hh_rows(n: int) -> list[dict]:
    """HH-RLHF-style transcripts (implicit prompt), multi-turn, whose two answers share their first letters: TRL's
    character-prefix extract_prompt cuts those inside the answer."""
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question {i}?\n\nAssistant: An earlier answer {i}.\n\nHuman: and then?\n\nAssistant:"
        rows.append({"chosen": prompt + f" Duck {i} says yes.", "rejected": prompt + f" Ducks {i} say no.",
                     "source": f"s{i}"})
    return rows


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- tiny models ---------------------------------------------------------------------------------------------------
def make_tiny_llama(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def saved_tiny_llama(directory, tokenizer, **kwargs):
    """A tiny Llama and its tokenizer saved as a model directory, as a user's SFT model is."""
    make_tiny_llama(tokenizer, **kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_reward_model(tokenizer) -> LlamaForSequenceClassification:
    """A one-layer sequence-classification reward model (num_labels=1), seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


# --- the textbook log-prob and a provider --------------------------------------------------------------------------
def naive_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log π(completion | prompt) the textbook way: one unpadded sequence, full logits, sum over the completion."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
    return float(sum(logits[t - 1, full[t]] for t in range(len(prompt_ids), len(full))))


def naive(model, tokenizer, rows) -> np.ndarray:
    return np.array([[naive_logp(model, tokenizer, r["prompt"], r["chosen"]),
                      naive_logp(model, tokenizer, r["prompt"], r["rejected"])] for r in rows])


def provider(rows: list[dict], models: dict | None = None, seed: int = 0, **engine) -> Resources:
    return Resources(load_pairs(Dataset.from_list(rows)), EngineConfig(**{"beta": BETA, "max_length": None, **engine}),
                     dict(models or {}), seed=seed)


class TableEmbedder:
    """A test double with the Embedder interface: fixed vectors looked up by text, every call recorded."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table, self.calls = table, []
        digest = hashlib.sha256(b"".join(k.encode() + np.asarray(v).tobytes() for k, v in table.items()))
        self.source, self.fingerprint, self.dim = "table", digest.hexdigest()[:16], len(next(iter(table.values())))
        self.identity = {"kind": "table", "fingerprint": self.fingerprint}

    def embed(self, texts, batch_size=32):
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


# --- score directories and the CLI ---------------------------------------------------------------------------------
def score_dir(tmp_path, rows, irm, *, policy="fp-warm", reference="fp-sft", nan_rows=()):
    """A score directory written by score.py's own writer, with the given irm column; `nan_rows` are pairs whose
    prompt filled max_length (NaN log-probs and scores, as the log-prob engine leaves them)."""
    from prefsift.score import write_scores

    data = load_pairs(Dataset.from_list(rows))
    n = len(data.pairs)
    irm = np.asarray(irm, dtype=float)
    logps = np.zeros(n)
    for r in nan_rows:
        irm[r], logps[r] = np.nan, np.nan
    scores = {"pair_id": np.asarray(data.pairs["pair_id"], dtype=object), "irm": irm,
              "chosen_logps": logps, "rejected_logps": logps, "ref_chosen_logps": logps,
              "ref_rejected_logps": logps}
    record = {"methods": {"irm": {"rule": {"rule": "band", "column": "irm", "low": 0.1, "high": 0.9}}},
              "default_rule": {"rule": "band", "column": "irm", "low": 0.1, "high": 0.9},
              "engine": {"max_length": 64}, "data": {"kind": data.kind, "hash": data.data_hash},
              "models": {"policy": {"fingerprint": policy}, "reference": {"fingerprint": reference}}}
    out = tmp_path / "scores"
    write_scores(out, scores, data, record)
    return out, data


def invoke(*args):
    """`prefsift <args>` in-process (typer's CliRunner), every argument as a string."""
    from typer.testing import CliRunner

    from prefsift.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# --- the scorer registry -------------------------------------------------------------------------------------------
@contextmanager
def registry_restored():
    """Whatever a block registers in prefsift's scorer registry is gone after it: the dict is restored in place
    (every module holds the same object)."""
    from prefsift.scorers.base import SCORERS

    saved = dict(SCORERS)
    try:
        yield SCORERS
    finally:
        SCORERS.clear()
        SCORERS.update(saved)
