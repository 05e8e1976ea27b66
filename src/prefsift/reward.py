"""Reward models below every stage: load a sequence-classification reward model, score (prompt, response)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from prefsift.models import LoadedModel, load_model


def load_reward_model(source: str, *, dtype: str | None = "auto", device: str | None = None,
                      trust_remote_code: bool = False) -> LoadedModel:
    """A sequence-classification reward model with one output (e.g. a TRL RewardTrainer model)."""
    loaded = load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        auto_class=AutoModelForSequenceClassification, num_labels=1)
    loaded.model.config.pad_token_id = loaded.tokenizer.pad_token_id  # batched scoring finds each row's end
    return loaded


def reward_scores(model, tokenizer, prompts: list, responses: list, *, batch_size: int,
                  max_length: int | None) -> np.ndarray:
    """Scalar reward of each (prompt, response) under a sequence-classification reward model."""
    texts = []
    for prompt, response in zip(prompts, responses, strict=True):
        if isinstance(prompt, list):
            texts.append(tokenizer.apply_chat_template(prompt + response, tokenize=False))
        else:
            texts.append(prompt + response)
    out = []
    device = next(model.parameters()).device
    padding_side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    # Right padding for the classifier's last-token pooling; cut long inputs from the left so the response, not
    # the prompt, survives truncation.
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                  truncation=max_length is not None, max_length=max_length).to(device)
                out.append(model(**batch).logits[:, 0].float().cpu().numpy())
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    return np.concatenate(out) if out else np.zeros(0)
