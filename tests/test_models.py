"""Model loading: safetensors only, content fingerprints, one-line errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import make_tiny_llama

from prefsift.errors import ModelError
from prefsift.models import fingerprint_files, load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe_tokenizer):
    directory = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_llama(bpe_tokenizer).save_pretrained(directory)
    bpe_tokenizer.save_pretrained(directory)
    return directory


def test_loads_on_cpu_in_eval_mode_with_pad_token(saved):
    loaded = load_model(str(saved), device="cpu", dtype="float32")
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token is not None and loaded.fingerprint == fingerprint_files(str(saved), None)
    assert load_model(str(saved), device="cpu", dtype="bfloat16").model.dtype == torch.bfloat16


def test_a_byte_identical_copy_is_the_same_model_and_rewritten_weights_are_not(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)  # new names' parent, new mtimes: same content
    assert fingerprint_files(str(copy), None) == fingerprint_files(str(saved), None)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF  # one weight changed; same size, and the mtime put back
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_files(str(copy), None) != fingerprint_files(str(saved), None)


def test_pickled_weights_are_refused(saved, tmp_path):
    unsafe = tmp_path / "unsafe"
    shutil.copytree(saved, unsafe)
    model = load_model(str(saved), device="cpu").model
    (unsafe / "model.safetensors").unlink()
    torch.save(model.state_dict(), unsafe / "pytorch_model.bin")  # a pickle: loading it could run code
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(unsafe), device="cpu")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "./missing-dir"}, "model path not found"),
    ({"source": "weights.gguf"}, "model file not found"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
])
def test_one_line_errors(saved, kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_model(**{"source": str(saved), **kwargs})


def test_a_reward_model_reads_pairs_through_its_chat_template(bpe_tokenizer):
    from prefsift.data import transcript_messages
    from prefsift.engine.reward import reward_text
    from prefsift.errors import PrefsiftError

    hh = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    assert transcript_messages(hh) == [{"role": "user", "content": "hi there"},
                                       {"role": "assistant", "content": "hello"},
                                       {"role": "user", "content": "a joke?"}]
    assert transcript_messages("just a question") is None
    # an HH transcript becomes its turns, the response the assistant's: the template's own format
    assert reward_text(bpe_tokenizer, hh, " why not") == ("<|user|>hi there\n<|assistant|>hello\n<|user|>a joke?\n"
                                                          "<|assistant|>why not\n")
    assert reward_text(bpe_tokenizer, "q", " a") == "<|user|>q\n<|assistant|>a\n"  # any other string: one turn
    messages = [{"role": "user", "content": "q"}]
    assert reward_text(bpe_tokenizer, messages, [{"role": "assistant", "content": "a"}]) == \
        "<|user|>q\n<|assistant|>a\n"
    plain = bpe_tokenizer.__class__(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|eos|>")
    plain.chat_template = None
    assert reward_text(plain, hh, " why not") == hh + " why not"  # no template: the text as it is
    with pytest.raises(PrefsiftError, match="no chat template, and these pairs are conversational"):
        reward_text(plain, messages, [{"role": "assistant", "content": "a"}])
