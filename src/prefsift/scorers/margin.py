"""Margin: the dataset's own rating difference (e.g. UltraFeedback's score_chosen − score_rejected), or a
sequence-classification reward model's score difference between chosen and rejected."""

from __future__ import annotations

import numpy as np
import torch

from prefsift.errors import PrefsiftError
from prefsift.scorers.base import Scorer, ScoringContext, register

RATING_COLUMNS = ("score_chosen", "score_rejected")


def reward_scores(model, tokenizer, prompts: list, responses: list, *, batch_size: int = 16,
                  max_length: int | None = 1024) -> np.ndarray:
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


@register
class MarginScorer(Scorer):
    name = "margin"
    needs = ()  # a reward model is optional: without one, the dataset's rating columns are used
    columns = ("margin",)
    default_rule = {"rule": "top"}

    def score(self, context: ScoringContext) -> dict[str, np.ndarray]:
        if "reward_model" in context.models:
            loaded = context.models["reward_model"]
            pairs = context.pairs
            chosen = reward_scores(loaded.model, loaded.tokenizer, pairs["prompt"], pairs["chosen"],
                                   max_length=context.max_length)
            rejected = reward_scores(loaded.model, loaded.tokenizer, pairs["prompt"], pairs["rejected"],
                                     max_length=context.max_length)
            return {"margin": chosen - rejected}
        raw = context.raw
        if raw is None or not all(c in raw.column_names for c in RATING_COLUMNS):
            known = ", ".join(raw.column_names) if raw is not None else "none"
            raise PrefsiftError(f"method 'margin' needs a --reward-model or the columns score_chosen and "
                                f"score_rejected (columns: {known})")
        try:
            chosen, rejected = (np.asarray(raw[c], dtype=float) for c in RATING_COLUMNS)
        except (TypeError, ValueError):
            raise PrefsiftError("score_chosen and score_rejected must be numbers") from None
        return {"margin": chosen - rejected}
