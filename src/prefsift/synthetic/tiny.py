"""Tiny models for tests and the demo: a character tokenizer, a small random Llama, a plain SFT loop, greedy
decoding. Everything is built locally (no hub) and is deterministic given a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefsift.config import EngineConfig, TrainConfig

if TYPE_CHECKING:
    from prefsift.synthetic.task import BenchmarkTask

# Printable ASCII (space to "~") plus newline: enough for prompts, chat transcripts and the synthetic task.
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

# One line per message, then an assistant header: enough for `apply_chat_template` in conversational tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` torch CPU threads (None: leave the setting alone), then restore the old count.

    The tiny model's matmuls are too small to split: on a 2-core machine where another process holds a core,
    two threads made SFT 8x slower than one (the threads wait on each other), with identical results.
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of `alphabet`, no BOS/EOS added on encoding."""
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order so ids are stable
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    # BPE without merges and without a pre-tokenizer splits any string into its characters; unknown ones map
    # to <unk>. Fuse joins tokens back without separators, so decode(encode(s)) == s.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama sized to `tokenizer`, with its special token ids in both configs."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # halves the parameter count of a model whose vocab is ~100 tokens
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model.eval()


def _completion_batch(
    tokenizer: PreTrainedTokenizerFast, batch: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels with the prompt and padding masked to -100."""
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, completion in batch:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        n_prompt, n_total = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        input_ids[i, :n_total] = torch.tensor(prompt_ids + completion_ids)
        attention_mask[i, :n_total] = 1
        labels[i, n_prompt:n_total] = torch.tensor(completion_ids)
    return input_ids, attention_mask, labels


def completion_loss(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
) -> float:
    """Mean per-token cross-entropy of the completions (EOS included) given their prompts."""
    model.eval()
    with torch.no_grad():
        input_ids, attention_mask, labels = _completion_batch(tokenizer, examples)
        return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


def sft_train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[tuple[str, str]],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    threads: int | None = 1,
) -> LlamaForCausalLM:
    """Supervised fine-tuning on (prompt, completion) pairs: loss on the completion tokens + EOS only.

    A plain fp32 AdamW loop rather than a Trainer: a few hundred tiny steps, where the Trainer's own overhead
    would dominate, and nothing to configure. Deterministic given `seed`; `threads` as in `torch_threads`.
    """
    with torch_threads(threads):
        torch.manual_seed(seed)
        order_rng = random.Random(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        n_steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
        # Linear decay to zero: the last steps settle the model instead of leaving it on a noisy high-lr step.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, n_steps))
        model.train()
        for _ in range(epochs):
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[start : start + batch_size]]
                input_ids, attention_mask, labels = _completion_batch(tokenizer, batch)
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        return model.eval()


def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    threads: int | None = 1,
) -> list[str]:
    """`prefsift.evaluate.greedy_answers` on `threads` torch threads (one is fastest for the tiny model)."""
    from prefsift.evaluate import greedy_answers as generate

    with torch_threads(threads):
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, quiet=True)


def dpo_engine() -> EngineConfig:
    """The benchmark's engine: β 0.5 (at TRL's 0.1 the clean run drifts far from the SFT model within an epoch and
    its greedy answers degrade, which hides the noise's cost), max_length 32 (prompt <= 11 characters, response <= 7
    + EOS), fp32 (bf16 drowns small steps on a CPU), one thread (fastest for a model this small)."""
    return EngineConfig(beta=0.5, max_length=32, batch_tokens=16384, dtype="float32", threads=1)


def dpo_train() -> TrainConfig:
    """The benchmark's DPO recipe, one for `prefsift demo` and `check_task`, so that the check's full-data run is the
    demo's `full` row from the SFT model under the same seed."""
    return TrainConfig(learning_rate=2e-4, epochs=2.0, batch_size=32, logging_steps=1000, gradient_checkpointing=False)


# SFT recipe of the benchmark's model; on 2 shared CPU cores (one thread) ~20 s for 4,000 demonstrations.
SFT_EPOCHS = 8
SFT_LR = 3e-3
SFT_BATCH_SIZE = 64


def sft_model(task: BenchmarkTask, *, seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The benchmark's starting point: a char tokenizer and a tiny Llama SFT-trained on `task.sft_examples`.

    The demonstrations mix exact, lazy (echo) and flawed answers, so the result is not yet aligned: its greedy
    answers are a blend of modes that preference training can improve.
    """
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    sft_train(
        model,
        tokenizer,
        task.sft_examples,
        epochs=SFT_EPOCHS,
        lr=SFT_LR,
        batch_size=SFT_BATCH_SIZE,
        seed=seed,
    )
    return model, tokenizer
