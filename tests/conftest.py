"""Tiny models and tokenizers built in the test: no hub, no download."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the cat dog sat on mat ran far near house tree big small red blue why how what is are you "
         "human assistant please tell me about a joke story help can not sure yes no maybe").split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: tiny models run as fast on one, and on a shared 2-core box 2 OpenMP threads spin-waiting on
    a busy core run ~10-15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a tiny corpus. A prompt that ends inside a word ("the ca" + "t sat")
    tokenizes differently alone and joined to its completion ("Ġc a" vs "Ġcat"), as real tokenizers do, which is
    the case TRL's prefix-matching rule exists for (see test_logps)."""
    rng = random.Random(0)
    corpus = [random_text(rng, 20) for _ in range(300)] + ["\n\nHuman: hi\n\nAssistant: hello"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


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


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_llama(bpe_tokenizer) -> LlamaForCausalLM:
    return make_tiny_llama(bpe_tokenizer)


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "\n\nHuman: " + random_text(rng, rng.randint(2, 25)) + "\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": " " + random_text(rng, rng.randint(1, 20)),
                     "rejected": " " + random_text(rng, rng.randint(1, 20))})
    return rows
