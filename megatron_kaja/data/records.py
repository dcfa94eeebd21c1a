"""Record shapes accepted as SFT data, normalized to OpenAI-style chat messages.

Every reader hands records here one by one with a location string ("a.jsonl:17"), so that
any bad record fails before tokenization with a message naming the file, line and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Message = dict[str, str]

ROLES = ("system", "user", "assistant")

# Single-turn schemas, tried in order: (prompt field, answer field, where the schema is from).
PAIR_SCHEMAS = (
    ("text", "output", "AnswerCarefully / ichikara-instruction"),
    ("input", "output", "ELYZA-tasks-100"),
    ("question", "answer", "question/answer"),
)

ACCEPTED_SHAPES = "{'messages': [...]}, " + ", ".join(
    f"{{'{prompt}', '{answer}'}}" for prompt, answer, _ in PAIR_SCHEMAS
)


class DataFormatError(ValueError):
    """A data record cannot be used; the message names the file, line/row and field."""


def normalize_record(record: Any, location: str) -> list[Message]:
    """Turn one record of any accepted shape into a validated list of chat messages.

    The conversation must end with a non-empty assistant turn (that is what is learned);
    `location` is prefixed to every error, e.g. ``"sft.jsonl:12"``.
    """
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{location}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _validate_messages(record["messages"], location)
    # A schema whose two fields are both present wins; otherwise the first schema with one
    # of its fields present is what the record was meant to be, and the other is missing.
    complete = [s for s in PAIR_SCHEMAS if s[0] in record and s[1] in record]
    partial = [s for s in PAIR_SCHEMAS if s[0] in record or s[1] in record]
    for prompt_key, answer_key, _ in (complete or partial)[:1]:
        prompt = _required_text(record, prompt_key, location, "prompt")
        answer = _required_text(record, answer_key, location, "answer")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    raise DataFormatError(
        f"{location}: unknown record shape with fields {sorted(record)}; "
        f"accepted shapes are {ACCEPTED_SHAPES}"
    )


def _required_text(record: Mapping, key: str, location: str, what: str) -> str:
    if key not in record:
        raise DataFormatError(f"{location}: field '{key}' is missing (the {what})")
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(
            f"{location}: field '{key}' must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataFormatError(f"{location}: field '{key}' is empty (the {what})")
    return value


def _validate_messages(messages: Any, location: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{location}: field 'messages' must be a non-empty list")
    normalized = []
    for i, message in enumerate(messages):
        where = f"{location}: field 'messages[{i}]'"
        if not isinstance(message, Mapping):
            raise DataFormatError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(f"{where}.role is {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}.content must be a string")
        if role == "assistant" and not content.strip():
            raise DataFormatError(f"{where}.content is empty (an assistant answer)")
        # An answer is learned as the reply to a user turn; the loss mask is cut there.
        if role == "assistant" and (not normalized or normalized[-1]["role"] != "user"):
            raise DataFormatError(f"{where} is an assistant turn that does not follow a user turn")
        normalized.append({"role": role, "content": content})
    if normalized[-1]["role"] != "assistant":
        raise DataFormatError(
            f"{location}: field 'messages' must end with an assistant turn "
            f"(ends with '{normalized[-1]['role']}')"
        )
    return normalized
