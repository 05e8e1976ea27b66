"""Pairs as token ids, exactly as TRL's DPOTrainer tokenizes them, and the batch plan of a pass.

Tokenization mirrors TRL 1.16 (`DPOTrainer._prepare_dataset` and `DataCollatorForPreference`): the text is
prompt + completion with EOS appended (plain text) or the chat template (conversational); the completion starts
where the tokenized prompt and prompt + completion stop matching; sequences are cut to `max_length` keeping
their start; a pair whose prompt alone reaches `max_length` is dropped (None here, NaN in a pass's output).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


# A text far over max_length tokens is judged from its characters, before any tokenizing (a 100 MB prompt took 13.7 GB
# to tokenize whole only to be dropped): no token covers more characters than the tokenizer's longest vocabulary entry,
# so a prompt of more than (max_length + CHAR_SLACK_TOKENS) x that many characters has more than max_length tokens;
# a completion is cut to as many characters (its tokens past max_length are cut anyway). Normal data is far below.
CHAR_SLACK_TOKENS = 64
_TOKEN_CHARS: dict[int, tuple[Any, int]] = {}


def _max_token_chars(tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for (its longest vocabulary entry), cached."""
    cached = _TOKEN_CHARS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        cached = _TOKEN_CHARS[id(tokenizer)] = (tokenizer, max(1, longest))
    return cached[1]


def char_cap(tokenizer, max_length: int | None, texts: Sequence) -> int | None:
    """The character count past which a text of `texts` is judged by its length (None: no text needs it)."""
    if max_length is None:
        return None
    longest = max((len(_text_of(t)) for t in texts), default=0)
    if longest <= max_length + CHAR_SLACK_TOKENS:  # every token is at least one character: none can be over
        return None
    return (max_length + CHAR_SLACK_TOKENS) * _max_token_chars(tokenizer)


def keep_ends(tokenizer, texts: Sequence[str], max_length: int | None) -> list[str]:
    """`texts` for a tokenizer that truncates from the left to `max_length` tokens (a reward model's or embedder's
    input: the response, at the end, survives), cut first to their last `char_cap` characters: the tokens kept are
    the same (the cut is at least CHAR_SLACK_TOKENS tokens before them), and a 100 MB text is never tokenized whole."""
    cap = char_cap(tokenizer, max_length, texts)
    if cap is None:
        return list(texts)
    return [t[-cap:] if len(t) > cap else t for t in texts]


def _text_of(value) -> str:
    return value if isinstance(value, str) else "".join(str(m.get("content") or "") for m in value)


def _cut_messages(messages: list[dict], cap: int) -> list[dict]:
    out, left = [], cap
    for m in messages:
        content = str(m.get("content") or "")
        out.append({**m, "content": content[:max(left, 0)]} if len(content) > left else m)
        left -= len(content)
    return out


def tokenize_pairs(tokenizer, prompts: list, chosens: list, rejecteds: list, max_length: int | None
                   ) -> list[TokenizedPair | None]:
    """TRL's tokenization of preference pairs; `None` marks a pair TRL drops (prompt fills `max_length`). A prompt
    over `char_cap` characters is such a pair without being tokenized; completions are cut to that many."""
    cap = char_cap(tokenizer, max_length, [*prompts, *chosens, *rejecteds])
    if cap is not None:
        long = {i for i, p in enumerate(prompts) if len(_text_of(p)) > cap}
        keep = [i for i in range(len(prompts)) if i not in long]
        if isinstance(prompts[0] if prompts else "", list):
            cut = [[_cut_messages(x[i], cap) for i in keep] for x in (chosens, rejecteds)]
        else:
            cut = [[x[i][:cap] for i in keep] for x in (chosens, rejecteds)]
        done = iter(_tokenize_pairs(tokenizer, [prompts[i] for i in keep], *cut, max_length) if keep else [])
        return [None if i in long else next(done) for i in range(len(prompts))]
    return _tokenize_pairs(tokenizer, prompts, chosens, rejecteds, max_length)


def _tokenize_pairs(tokenizer, prompts: list, chosens: list, rejecteds: list, max_length: int | None
                    ) -> list[TokenizedPair | None]:
    if prompts and isinstance(prompts[0], list):  # conversational: chat template, no EOS appended
        prompt_ids = [_chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]
        chosen_full = [_chat_ids(tokenizer, p + c) for p, c in zip(prompts, chosens, strict=True)]
        rejected_full = [_chat_ids(tokenizer, p + r) for p, r in zip(prompts, rejecteds, strict=True)]
    else:
        eos = tokenizer.eos_token
        chosens = [c if c.endswith(eos) else c + eos for c in chosens]
        rejecteds = [r if r.endswith(eos) else r + eos for r in rejecteds]
        prompt_ids = tokenizer(list(prompts))["input_ids"]
        chosen_full = tokenizer([p + c for p, c in zip(prompts, chosens, strict=True)])["input_ids"]
        rejected_full = tokenizer([p + r for p, r in zip(prompts, rejecteds, strict=True)])["input_ids"]
    out: list[TokenizedPair | None] = []
    for p, pc, pr in zip(prompt_ids, chosen_full, rejected_full, strict=True):
        n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
        if max_length is not None and n >= max_length:
            out.append(None)
            continue
        room = None if max_length is None else max_length - n
        out.append(TokenizedPair(list(p[:n]), list(pc[n:])[:room], list(pr[n:])[:room]))
    return out


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (as TRL pads)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batches(lengths: list[int], batch_tokens: int, slack: float = 0.125) -> Iterator[list[int]]:
    """Indices sorted by length (longest first, so memory peaks at once), cut into batches of ≤ batch_tokens; a batch
    also ends where the next pair is shorter than 1 - `slack` of its longest, so padding stays under an eighth of any
    batch (12 HH pairs in one batch fed 1.78× their unique tokens; cut this way, 1.04×)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and ((len(batch) + 1) * lengths[batch[0]] > batch_tokens
                      or lengths[i] < (1 - slack) * lengths[batch[0]]):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


# A packed pair's mask is width² entries (bool + the model's dtype): ~9 GB at 36k tokens. A pair longer than this
# goes alone through `_forward_long`, whose memory grows linearly with its length.
LONG_PAIR_TOKENS = 8192


def check_pair(pair: TokenizedPair, prompt: int = 128, completion: int = 64) -> TokenizedPair:
    """The pair that checks a model's exact paths (`packed_path_ok`): `pair` with its prompt and each completion cut
    to their first `prompt` / `completion` tokens."""
    return TokenizedPair(pair.prompt_ids[:prompt], pair.chosen_ids[:completion], pair.rejected_ids[:completion])


def path_check_pair(plan: BatchPlan, tokenized: Sequence[TokenizedPair | None]) -> TokenizedPair | None:
    """The one pair a model's exact paths are checked on, fixed by the plan whichever batches a resumed run still has
    to compute: the longest pair short enough to pack, cut to `check_pair`'s size. The check runs three forwards of
    it; on the whole longest pair they took a third of a 16-pair HH-RLHF pass (bench/logps.py). A cut pair tests the
    block mask and the positions as well (sliding windows are refused by `can_pack`, whatever the length)."""
    short = [b[0] for b in plan.batches if len(tokenized[b[0]]) <= LONG_PAIR_TOKENS]  # type: ignore[arg-type]
    return check_pair(tokenized[short[0]]) if short else None  # type: ignore[arg-type]


@dataclass
class BatchPlan:
    """Row indices of each forward batch, fixed by the tokenized lengths and the token budget alone, so a resumed
    run computes every pair in the same batch, with the same padding, as an uninterrupted one: identical values."""

    batches: list[list[int]]
    n_kept: int

    @classmethod
    def of(cls, tokenized: Sequence[TokenizedPair | None], batch_tokens: int) -> BatchPlan:
        if isinstance(tokenized, CompactPairs):
            kept, lengths = tokenized.kept_and_lengths()
        else:
            kept = [i for i, t in enumerate(tokenized) if t is not None]
            lengths = [len(tokenized[i]) for i in kept]  # type: ignore[arg-type]
        return cls([[kept[i] for i in batch] for batch in _batches(lengths, batch_tokens)], len(kept))


class CompactPairs(Sequence):
    """Tokenized pairs held as one int32 array, 4 bytes a token (a list of Python ints costs ~36), so a pass over a
    large dataset does not hold several times the data's size between tokenization and the forward passes. Indexing
    gives the `TokenizedPair` (or None for a dropped pair) back."""

    def __init__(self, parts: Iterable[list[TokenizedPair | None]]) -> None:
        chunks, meta, offset = [], [], 0
        for part in parts:
            flat: list[int] = []
            for pair in part:
                if pair is None:
                    meta.append((-1, 0, 0, 0))
                    continue
                meta.append((offset + len(flat), len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)))
                flat += pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
            chunks.append(np.asarray(flat, dtype=np.int32))
            offset += len(flat)
        self.ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        self.meta = np.asarray(meta, dtype=np.int64).reshape(-1, 4)  # start, prompt, chosen, rejected lengths

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i):  # type: ignore[override]
        start, n_p, n_c, n_r = (int(v) for v in self.meta[i])
        if start < 0:
            return None
        ids = self.ids[start:start + n_p + n_c + n_r].tolist()
        return TokenizedPair(ids[:n_p], ids[n_p:n_p + n_c], ids[n_p + n_c:])

    def kept_and_lengths(self) -> tuple[list[int], list[int]]:
        kept = np.flatnonzero(self.meta[:, 0] >= 0)
        return kept.tolist(), self.meta[kept, 1:].sum(axis=1).tolist()


def too_long_rows(tokenizer, pairs, rows: np.ndarray, max_length: int | None) -> np.ndarray:
    """Which of `rows` (indices into the pairs table) TRL drops because the prompt fills max_length: the tokenizer's
    verdict, the only thing that makes a pair too long. Only the rows asked about are tokenized."""
    rows = np.asarray(rows, dtype=int)
    if not len(rows):
        return np.zeros(0, dtype=bool)
    subset = pairs.select(rows.tolist())
    tokenized = tokenize_pairs(tokenizer, subset["prompt"], subset["chosen"], subset["rejected"], max_length)
    return np.array([t is None for t in tokenized], dtype=bool)


def non_finite_logps(values: np.ndarray, tokenizer, pairs, max_length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(too_long, failed) masks of an (n, 2) log-prob pass: a NaN pair is too long when the tokenizer says its prompt
    fills max_length; any other NaN or ±inf is the model's failure (NaN or inf weights, an overflowing dtype)."""
    values = np.asarray(values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    too_long = np.zeros(len(values), dtype=bool)
    too_long[bad[too_long_rows(tokenizer, pairs, bad, max_length)]] = True
    return too_long, ~np.isfinite(values).all(axis=1) & ~too_long
