"""Reward models below every stage: load a sequence-classification reward model, score (prompt, response).

A reward model was trained on its own chat format: prompt and response go through its chat template when it has
one (conversational pairs as they are; an HH-style "\\n\\nHuman: ... \\n\\nAssistant:" transcript split into its
turns; any other string prompt as one user turn), else as plain prompt + response text. The pass over a dataset is
batched, shows a progress bar and keeps resumable shards like the log-prob pass (`prefsift.engine.shards.LogpsRun`),
so a failure after it never loses the rewards computed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from prefsift.data import transcript_messages
from prefsift.engine.shards import ShardBuffer
from prefsift.engine.tokenize import keep_ends
from prefsift.errors import PrefsiftError
from prefsift.models import LoadedModel, load_model
from prefsift.output import cheaper
from prefsift.output import progress as progress_bar

if TYPE_CHECKING:
    from prefsift.engine.executors import RayExecutor


def load_reward_model(source: str, *, dtype: str | None = "auto", device: str | None = None,
                      trust_remote_code: bool = False) -> LoadedModel:
    """A sequence-classification reward model with one output (e.g. a TRL RewardTrainer model). A model whose score
    head is not in its weights (a causal LM) is refused by `load_model`."""
    loaded = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        auto_class=AutoModelForSequenceClassification, num_labels=1)
    loaded.model.config.pad_token_id = loaded.tokenizer.pad_token_id  # batched scoring finds each row's end
    return loaded


def reward_text(tokenizer, prompt, response) -> str:
    """The text the reward model reads for one (prompt, response)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list) and not template:
        raise PrefsiftError("the reward model's tokenizer has no chat template, and these pairs are conversational "
                            "(messages): give a reward model trained on chat, or plain-text pairs")
    if isinstance(prompt, list):  # conversational: messages, the response an assistant turn
        answer = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    if not template:
        return prompt + (response if isinstance(response, str) else "".join(m["content"] for m in response))
    messages = transcript_messages(prompt) or [{"role": "user", "content": prompt}]
    text = response if isinstance(response, str) else "".join(m["content"] for m in response)
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text.strip()}], tokenize=False)


def _score_texts(model, tokenizer, texts: list[str], max_length: int | None) -> np.ndarray:
    device = next(model.parameters()).device
    padding_side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    # Right padding for the classifier's last-token pooling; cut long inputs from the left so the response, not
    # the prompt, survives truncation.
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    texts = keep_ends(tokenizer, texts, max_length)
    try:
        with torch.inference_mode():
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=max_length is not None,
                              max_length=max_length, add_special_tokens=not tokenizer.chat_template).to(device)
            return model(**batch).logits[:, 0].float().cpu().numpy()
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side


def reward_scores(model, tokenizer, prompts: list, responses: list, *, batch_size: int,
                  max_length: int | None, desc: str | None = None) -> np.ndarray:
    """Scalar reward of each (prompt, response) under a sequence-classification reward model."""
    texts = [reward_text(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    out = []
    with tqdm(total=len(texts), desc=desc or "rewards", unit="answer", disable=desc is None or not texts) as bar:
        for start in range(0, len(texts), batch_size):
            out.append(_score_texts(model, tokenizer, texts[start:start + batch_size], max_length))
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros(0)


def _score_batch(replica: tuple, texts: list[str]) -> np.ndarray:
    """One batch's rewards on a replica (model, tokenizer, max_length): in this process or on a Ray worker."""
    model, tokenizer, max_length = replica
    return _score_texts(model, tokenizer, texts, max_length)


def pair_rewards(model, tokenizer, pairs, *, batch_size: int, max_length: int | None, run=None,
                 desc: str = "rewards", flush_rows: int = 512, flush_seconds: float = 60.0,
                 executor: RayExecutor | None = None) -> np.ndarray:
    """(n, 2) [chosen, rejected] rewards of a pairs table (prompt/chosen/rejected columns). With `run` (a
    `LogpsRun`), finished batches are kept as shards and a rerun skips them: batch k is rows
    [k·batch_size, (k+1)·batch_size), fixed by the batch size, which is part of the run's identity. `executor`
    (a `prefsift.engine.executors.RayExecutor`) scores the batches still to compute on a Ray pool; None, here."""
    n = len(pairs)
    out = np.full((n, 2), np.nan)
    done = {}
    if run is not None:
        run.shard_dir.mkdir(parents=True, exist_ok=True)
        done = run.finished()
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    todo = {number for number, rows in enumerate(batches)
            if not (number in done and sorted(done[number][:, 0].astype(int)) == rows)}

    def texts_of(rows: list[int]) -> list[str]:
        batch = pairs[rows[0]:rows[-1] + 1]
        return [reward_text(tokenizer, p, r) for side in ("chosen", "rejected")
                for p, r in zip(batch["prompt"], batch[side], strict=True)]

    replica = (model, tokenizer, max_length)
    texts = (texts_of(rows) for number, rows in enumerate(batches) if number in todo)
    results = (executor.map(_score_batch, replica, texts) if executor is not None
               else (_score_batch(replica, batch) for batch in texts))
    shards = ShardBuffer(run, flush_rows, flush_seconds)
    with progress_bar(total=n, desc=desc, unit="pair", disable=n == 0,
             cheaper=cheaper(max_length, next(model.parameters()).device.type)) as progress:
        for number, rows in enumerate(batches):
            if number in todo:
                values = next(results).reshape(2, len(rows)).T
                out[rows] = values
                shards.add(number, rows, values)
            else:
                out[rows] = done[number][np.argsort(done[number][:, 0])][:, 1:]
            progress.update(len(rows))
        shards.flush()
    return out
