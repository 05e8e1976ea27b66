"""The fixtures: a tiny tokenizer and model, one torch thread, and the scorer registry restored after every test.
The plain helpers are in helpers.py."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import make_tiny_llama, random_text, registry_restored
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture(autouse=True)
def restore_scorer_registry():
    """A scorer a test registers (the README's example, a deliberately broken one) is gone after it."""
    with registry_restored():
        yield


@pytest.fixture(scope="session", autouse=True)
def no_user_cache(tmp_path_factory):
    """The log-prob cache (prefsift.reference) of module fixtures' commands: never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFSIFT_CACHE", str(tmp_path_factory.mktemp("prefsift-cache")))
        yield


@pytest.fixture(autouse=True)
def log_prob_cache(monkeypatch, tmp_path_factory):
    """Each test's own log-prob cache: no test reads another's passes."""
    monkeypatch.setenv("PREFSIFT_CACHE", str(tmp_path_factory.mktemp("prefsift-cache")))


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


@pytest.fixture
def tiny_llama(bpe_tokenizer) -> LlamaForCausalLM:
    return make_tiny_llama(bpe_tokenizer)
