"""Preference pairs in TRL's schema (`prompt`, `chosen`, `rejected`), rendered with the
model's chat template into two rows each.

`prompt` is a string (one user turn) or a list of chat messages ending with a user turn;
`chosen` / `rejected` are strings (one assistant answer) or lists of messages (the answer's
turns). A pair becomes two conversations, prompt + chosen and prompt + rejected, tokenized by
the same `ChatRenderer` as SFT data: the loss mask covers the answer's tokens and the EOS that
closes it, never the prompt (nor earlier assistant turns inside the prompt).

Each answer is one row of `--seq-length` tokens, padded (the padding its own attention
segment), so a pair is never split and nothing attends across answers: a micro-batch of m
pairs is 2m rows, the m chosen answers then the m rejected ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from megatron_kaja.data.chat import ChatRenderer, build_loss_mask, load_chat_template
from megatron_kaja.data.mixing import mix_samples
from megatron_kaja.data.readers import read_records
from megatron_kaja.data.records import DataFormatError, Message
from megatron_kaja.data.sources import DataSource

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _messages(value, location: str, field: str, role: str) -> list[Message]:
    """A field as chat messages: a string is one turn of `role`."""
    if isinstance(value, str):
        if not value.strip():
            raise DataFormatError(f"{location}: field '{field}' is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataFormatError(
            f"{location}: field '{field}' must be a string or a non-empty list of messages"
        )
    out = []
    for i, message in enumerate(value):
        where = f"{location}: field '{field}[{i}]'"
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise DataFormatError(f"{where} must be an object with 'role' and string 'content'")
        if message.get("role") not in ("system", "user", "assistant"):
            raise DataFormatError(f"{where}.role is {message.get('role')!r}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def normalize_pair(record, location: str) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) messages of one record; errors name file:line and field."""
    if not isinstance(record, Mapping):
        raise DataFormatError(f"{location}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in PAIR_FIELDS if f not in record]
    if missing:
        raise DataFormatError(
            f"{location}: field '{missing[0]}' is missing (a preference pair has "
            f"{', '.join(PAIR_FIELDS)})"
        )
    prompt = _messages(record["prompt"], location, "prompt", "user")
    if prompt[-1]["role"] != "user":
        raise DataFormatError(f"{location}: field 'prompt' must end with a user turn")
    answers = []
    for field in ("chosen", "rejected"):
        answer = _messages(record[field], location, field, "assistant")
        if answer[-1]["role"] != "assistant" or not answer[-1]["content"].strip():
            raise DataFormatError(f"{location}: field '{field}' must end with an assistant answer")
        answers.append(answer)
    if answers[0] == answers[1]:
        raise DataFormatError(f"{location}: 'chosen' and 'rejected' are the same answer")
    return prompt, answers[0], answers[1]


def tokenize_answer(
    renderer: ChatRenderer, prompt: list[Message], answer: list[Message], location: str
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of prompt + answer and the mask of the answer's own assistant tokens."""
    messages = prompt + answer
    text = renderer.render(messages)
    enc = renderer.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = renderer.assistant_spans(messages, location)
    # Only the answer's turns are learned: assistant turns inside the prompt are context.
    answer_turns = sum(1 for m in answer if m["role"] == "assistant")
    mask = build_loss_mask(enc["offset_mapping"], spans[len(spans) - answer_turns :])
    return np.asarray(enc["input_ids"], dtype=np.int64), mask


@dataclass
class PreferenceStats:
    num_pairs: int
    dropped_overlong: int
    tokens: int  # prompt + answer tokens of the kept pairs (both answers)


class PreferenceDataset:
    """Tokenized pairs; `pair_rows(i)` gives the chosen and the rejected row of pair i."""

    def __init__(self, answers: list[tuple], seq_length: int, pad_id: int, stats):
        self.answers = answers  # (chosen ids, chosen mask, rejected ids, rejected mask)
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.stats = stats

    def __len__(self) -> int:
        return len(self.answers)

    def row(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One answer as a padded row: labels are the next tokens, the loss mask marks the
        positions whose next token is an answer token; the padding is a segment of its own."""
        s, n = self.seq_length, len(ids)
        tokens = np.full(s + 1, self.pad_id, dtype=np.int64)
        tokens[:n] = ids
        learn = np.zeros(s + 1, dtype=np.float32)
        learn[:n] = mask
        boundaries = [0, n - 1] + ([s] if n - 1 < s else [])
        return {
            "tokens": tokens[:s],
            "labels": tokens[1:],
            "loss_mask": learn[1:],
            "position_ids": np.arange(s, dtype=np.int64),
            "cu_seqlens": np.asarray(boundaries, dtype=np.int64),
        }

    def pair_rows(self, index: int) -> tuple[dict, dict]:
        chosen_ids, chosen_mask, rejected_ids, rejected_mask = self.answers[index]
        return self.row(chosen_ids, chosen_mask), self.row(rejected_ids, rejected_mask)


def collate_pairs(dataset: PreferenceDataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs: the chosen rows, then the rejected rows (as packed rows)."""
    from megatron_kaja.data.batch import collate_packed_rows

    pairs = [dataset.pair_rows(i) for i in indices]
    return collate_packed_rows([c for c, _ in pairs] + [r for _, r in pairs])


def count_pairs(source: DataSource) -> int:
    """Read and validate a pair file as a run does, without tokenizing (`--dry-run`): the
    number of pairs, or the run's own file:line error."""
    count = 0
    for location, record in read_records(source):
        normalize_pair(record, location)
        count += 1
    return count


def build_preference_dataset(
    sources: list[DataSource],
    tokenizer,
    seq_length: int,
    seed: int,
    chat_template: str | None = None,
) -> PreferenceDataset:
    """Read, validate and tokenize the pairs of `sources`, mixed by their weights.

    A pair whose longer answer does not fit `seq_length` + 1 tokens is dropped (counted):
    cutting an answer would compare a truncated answer with a whole one."""
    template = load_chat_template(chat_template) if chat_template else None
    renderer = ChatRenderer(tokenizer, template)
    per_source, dropped, tokens = [], 0, 0
    for source in sources:
        kept = []
        for location, record in read_records(source):
            prompt, chosen, rejected = normalize_pair(record, location)
            c_ids, c_mask = tokenize_answer(renderer, prompt, chosen, location)
            r_ids, r_mask = tokenize_answer(renderer, prompt, rejected, location)
            if max(len(c_ids), len(r_ids)) > seq_length + 1:
                dropped += 1
                continue
            kept.append((c_ids, c_mask, r_ids, r_mask))
            tokens += len(c_ids) + len(r_ids)
        per_source.append(kept)
    sizes = [len(kept) for kept in per_source]
    if not sum(sizes):
        raise DataFormatError(
            f"{', '.join(s.path for s in sources)}: no preference pair fits --seq-length "
            f"{seq_length} ({dropped} dropped as too long)"
        )
    empty = [s.path for s, n in zip(sources, sizes, strict=True) if n == 0]
    if empty:
        raise DataFormatError(f"{empty[0]}: no preference pair fits --seq-length {seq_length}")
    source_ids, sample_ids = mix_samples(sizes, [s.weight for s in sources], seed)
    answers = [
        per_source[s][i] for s, i in zip(source_ids.tolist(), sample_ids.tolist(), strict=True)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreferenceDataset(
        answers, seq_length, pad, PreferenceStats(len(answers), dropped, tokens)
    )
