"""Preference pairs in TRL's schema (`prompt`, `chosen`, `rejected`), rendered with the
model's chat template into two rows each.

`prompt` is a string (one user turn) or a list of chat messages ending with a user turn;
`chosen` / `rejected` are strings (one assistant answer) or lists of messages (the answer's
turns). A pair becomes two conversations, prompt + chosen and prompt + rejected, tokenized by
the same `ChatRenderer` as SFT data: the loss mask covers the answer's tokens and the EOS that
closes it, never the prompt (nor earlier assistant turns inside the prompt).

A micro-batch of m pairs holds 2m answer sequences, numbered chosen answers 0..m-1 then
rejected answers m..2m-1. An answer of n tokens fills n - 1 row positions (inputs
`tokens[:-1]`, labels `tokens[1:]`, as SFT rows), its own attention segment with positions
restarting at 0; `sequence_ids` names the answer of each position (-1: padding), so that
log-probs are summed per answer whatever the layout. Unpacked, each answer has a row of
`--seq-length` positions to itself (2m rows); packed (`--packing`), the 2m answers are placed
best-fit decreasing into as few rows as hold them (`data/packing.py`). Attention never
crosses a segment, so an answer's log-probs do not depend on its neighbours: both layouts
give the same numbers up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from megatron_kaja.data.chat import ChatRenderer, build_loss_mask, load_chat_template
from megatron_kaja.data.mixing import mix_samples
from megatron_kaja.data.packing import pack_sequences
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
    """Tokenized pairs: `answers[i]` = (chosen ids, chosen mask, rejected ids, rejected mask)."""

    def __init__(self, answers: list[tuple], seq_length: int, pad_id: int, stats):
        self.answers = answers
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.stats = stats

    def __len__(self) -> int:
        return len(self.answers)

    def row(self, sequences: list[tuple[int, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """One row holding `sequences` ((answer number, ids, mask) each, in order) then
        padding: labels are the next tokens, the loss mask marks the positions whose next
        token is an answer token; each answer and the trailing padding are segments."""
        s = self.seq_length
        row = {
            "tokens": np.full(s, self.pad_id, dtype=np.int64),
            "labels": np.full(s, self.pad_id, dtype=np.int64),
            "loss_mask": np.zeros(s, dtype=np.float32),
            "position_ids": np.zeros(s, dtype=np.int64),
            "sequence_ids": np.full(s, -1, dtype=np.int64),
        }
        boundaries, at = [0], 0
        for number, ids, mask in sequences:
            n = len(ids) - 1
            row["tokens"][at : at + n] = ids[:-1]
            row["labels"][at : at + n] = ids[1:]
            row["loss_mask"][at : at + n] = mask[1:]
            row["position_ids"][at : at + n] = np.arange(n)
            row["sequence_ids"][at : at + n] = number
            at += n
            boundaries.append(at)
        if at < s:
            row["position_ids"][at:] = np.arange(s - at)
            boundaries.append(s)
        row["cu_seqlens"] = np.asarray(boundaries, dtype=np.int64)
        return row

    def pair_rows(self, indices: list[int], packing: bool) -> list[dict[str, np.ndarray]]:
        """The rows of a micro-batch of pairs `indices`: one per answer (chosen answers,
        then rejected ones), or, with `packing`, the answers packed best-fit decreasing."""
        chosen = [(self.answers[i][0], self.answers[i][1]) for i in indices]
        rejected = [(self.answers[i][2], self.answers[i][3]) for i in indices]
        sequences = [(k, ids, mask) for k, (ids, mask) in enumerate(chosen + rejected)]
        if not packing:
            return [self.row([sequence]) for sequence in sequences]
        plan = pack_sequences(
            np.asarray([len(ids) - 1 for _, ids, _ in sequences]), self.seq_length
        )
        return [
            self.row([sequences[k] for k in plan.row_samples(r).tolist()])
            for r in range(plan.num_rows)
        ]

    def padding_row(self) -> dict[str, np.ndarray]:
        """A row of padding only (no answer): evens out micro-batches' row counts."""
        return self.row([])


def collate_pairs(rows: list[dict[str, np.ndarray]], pairs: int) -> dict[str, torch.Tensor]:
    """A micro-batch of `pairs` pairs from its rows: the packed-row tensors, `sequence_ids`
    (int64 [b, s]) and the pair count."""
    from megatron_kaja.data.batch import collate_packed_rows

    batch = collate_packed_rows(rows)
    batch["sequence_ids"] = torch.from_numpy(np.stack([row["sequence_ids"] for row in rows]))
    batch["pairs"] = pairs
    return batch


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
