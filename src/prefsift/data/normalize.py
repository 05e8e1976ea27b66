"""Turn one input row into a normalized pair (or say why it is invalid), and the content hash `pair_id`.

Normalized forms (TRL's explicit-prompt types):
- standard / implicit: `prompt`, `chosen`, `rejected` strings, `prompt + chosen` the full transcript;
- conversational: `prompt` the messages before the answer, `chosen`/`rejected` the answer messages,
  every message `{"role": str, "content": str}`;
- unpaired (KTO): `prompt`, `completion` (strings or messages), `label` bool.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

Message = dict[str, str]
Text = str | list[Message]


class Invalid(Exception):
    """A row that cannot become a pair; the message is the reason shown to the user."""


def pair_id_of(prompt: Any, chosen: Any, rejected: Any) -> str:
    """16 hex characters of sha256 over a canonical JSON of the three values (strings or message lists).

    For unpaired data call it as `pair_id_of(prompt, completion, label)`.
    """
    values = [prompt, chosen, rejected]
    canonical = json.dumps(values, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def data_hash_of(pair_ids: Iterable[str]) -> str:
    """sha256 hex over the ordered pair_ids (one per line): `LoadedPairs.data_hash`, for any subset too."""
    return hashlib.sha256("\n".join(pair_ids).encode("utf-8")).hexdigest()


def split_implicit_prompt(
    chosen: str, rejected: str, assistant_marker: str = "\n\nAssistant:"
) -> tuple[str, str, str] | None:
    """Split two transcripts at the last assistant turn marker they share.

    Returns `(prompt, chosen_response, rejected_response)` with `prompt` the longest shared prefix that ends
    with `assistant_marker`, so `prompt + chosen_response == chosen` exactly; `None` if no such prefix exists.
    """
    if not assistant_marker:
        return None
    end = len(chosen)
    while (start := chosen.rfind(assistant_marker, 0, end)) >= 0:
        cut = start + len(assistant_marker)
        if rejected.startswith(chosen[:cut]):
            return chosen[:cut], chosen[cut:], rejected[cut:]
        end = cut - 1  # the next candidate ends strictly before this one
    return None


def normalize_text_pair(
    prompt: Any, chosen: Any, rejected: Any, *, implicit: bool, assistant_marker: str
) -> tuple[str, str, str]:
    """A standard (`implicit=False`, prompt given) or implicit (prompt inside the transcripts) string pair."""
    if not implicit:
        _require(prompt, "prompt", str)
    _require(chosen, "chosen", str)
    _require(rejected, "rejected", str)
    _require_nonempty(chosen, "chosen response")
    _require_nonempty(rejected, "rejected response")
    if chosen == rejected:
        raise Invalid("chosen == rejected")
    if implicit:
        parts = split_implicit_prompt(chosen, rejected, assistant_marker)
        if parts is None:
            raise Invalid("no shared assistant turn")
        prompt, chosen, rejected = parts
        _require_nonempty(chosen, "chosen response")
        _require_nonempty(rejected, "rejected response")
    return prompt, chosen, rejected


def normalize_conversation_pair(
    prompt: Any, chosen: Any, rejected: Any
) -> tuple[list[Message], list[Message], list[Message]]:
    """A conversational pair; `prompt` is a message list, a string (UltraFeedback) or None (no column)."""
    chosen_msgs = _messages(chosen, "chosen")
    rejected_msgs = _messages(rejected, "rejected")
    _require_nonempty(chosen_msgs, "chosen response")
    _require_nonempty(rejected_msgs, "rejected response")
    if chosen_msgs == rejected_msgs:
        raise Invalid("chosen == rejected")

    if isinstance(prompt, list):
        prompt_msgs = _messages(prompt, "prompt")
        n = len(prompt_msgs)
        # Tolerate chosen/rejected that repeat the prompt in front of the answer.
        if n and chosen_msgs[:n] == prompt_msgs and rejected_msgs[:n] == prompt_msgs:
            chosen_msgs, rejected_msgs = chosen_msgs[n:], rejected_msgs[n:]
    else:
        if prompt is not None and not isinstance(prompt, str):
            raise Invalid("prompt is neither a string nor a message list")
        shared = 0
        for a, b in zip(chosen_msgs, rejected_msgs, strict=False):
            if a != b:
                break
            shared += 1
        if shared:
            prompt_msgs = chosen_msgs[:shared]
            chosen_msgs, rejected_msgs = chosen_msgs[shared:], rejected_msgs[shared:]
        elif isinstance(prompt, str) and prompt.strip():
            prompt_msgs = [{"role": "user", "content": prompt}]
        else:
            raise Invalid("no shared prompt messages")
    _require_nonempty(chosen_msgs, "chosen response")
    _require_nonempty(rejected_msgs, "rejected response")
    for name, response in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        _check_roles(prompt_msgs, response, name)
    return prompt_msgs, chosen_msgs, rejected_msgs


# Roles chat templates know. A tool result may follow an assistant turn; system / developer lead.
ROLES = {"system", "developer", "user", "assistant", "tool", "function", "ipython"}
_TURNS = {"user", "assistant"}


def _check_roles(prompt: list[Message], response: list[Message], name: str) -> None:
    """A response is the assistant's answer to a prompt that ends with the user's (or a tool's) turn, and user and
    assistant turns alternate: otherwise a user turn would be scored as the "response"."""
    for where, messages in (("prompt", prompt), (name, response)):
        for message in messages:
            if message["role"] not in ROLES:
                raise Invalid(f"unknown role '{message['role']}' in {where} (roles: {', '.join(sorted(ROLES))})")
    if response[0]["role"] != "assistant" or response[-1]["role"] != "assistant":
        role = (response[0] if response[0]["role"] != "assistant" else response[-1])["role"]
        raise Invalid(f"{name} response is not an assistant turn (it holds a {role} message)")
    if prompt and prompt[-1]["role"] == "assistant":
        raise Invalid("prompt ends with an assistant turn: roles do not alternate")
    conversation = prompt + response
    for a, b in zip(conversation, conversation[1:], strict=False):
        if a["role"] == b["role"] and a["role"] in _TURNS:
            raise Invalid(f"roles do not alternate: two {a['role']} turns in a row ({name})")


def normalize_unpaired(prompt: Any, completion: Any, label: Any, *, conversational: bool) -> tuple[Text, Text, bool]:
    """A KTO example: prompt and completion of one type (strings or messages), label coerced to bool."""
    if conversational:
        prompt_out: Text = _messages(prompt, "prompt")
        completion_out: Text = _messages(completion, "completion")
    else:
        prompt_out = _require(prompt, "prompt", str)
        completion_out = _require(completion, "completion", str)
    _require_nonempty(completion_out, "completion")
    return prompt_out, completion_out, _label(label)


def _require(value: Any, field: str, kind: type) -> Any:
    if value is None:
        raise Invalid(f"missing field '{field}'")
    if not isinstance(value, kind):
        raise Invalid(f"{field} is not a {'string' if kind is str else 'message list'}")
    return value


def _require_nonempty(value: Text, what: str) -> None:
    text = value if isinstance(value, str) else "".join(m["content"] for m in value)
    if not text.strip():
        raise Invalid(f"empty {what}")


def _messages(value: Any, field: str) -> list[Message]:
    """A list of `{role, content}` messages, extra keys dropped (Arrow may add them as None)."""
    _require(value, field, list)
    out = []
    for message in value:
        if not isinstance(message, dict):
            raise Invalid(f"{field} is not a message list")
        role, content = message.get("role"), message.get("content")
        if content is None:
            content = ""
        if not isinstance(role, str) or not isinstance(content, str):
            raise Invalid(f"{field} has a message without a string role and content")
        out.append({"role": role, "content": content})
    return out


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _label(value: Any) -> bool:
    if value is None:
        raise Invalid("missing field 'label'")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise Invalid(f"invalid label {value!r} (expected true/false or 1/0)")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def transcript_messages(prompt: str) -> list[Message] | None:
    """An HH-style transcript prompt ("\\n\\nHuman: ... \\n\\nAssistant:") as chat messages, or None when the
    prompt is not one."""
    parts = _HH_TURN.split(prompt)
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1:-2:2], parts[2:-2:2],
                                                                                strict=True)]


def as_chat(prompt: str, completions: list[str]) -> tuple[list[Message], list[list[Message]]]:
    """`--chat-template`: a plain-text prompt as the user's turn (an HH transcript as its turns, when they
    alternate) and each completion as the assistant's answer, so the model's chat template formats them."""
    answers = [[{"role": "assistant", "content": c.strip()}] for c in completions]
    turns = transcript_messages(prompt)
    if turns:
        try:
            _check_roles(turns, answers[0], "chosen")
            return turns, answers
        except Invalid:
            pass  # a transcript whose turns do not alternate stays one user message, as it reads
    return [{"role": "user", "content": prompt.strip()}], answers
