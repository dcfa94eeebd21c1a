"""Render conversations with the tokenizer's own chat template and build the loss mask.

The mask is derived from the template itself, not from knowledge of any one template: for
each assistant turn k we render the conversation up to k with the generation prompt (the
text the model sees before it starts answering) and up to and including k (the text after
it has answered). The characters in between, cut right after the EOS token that closes the
answer, are what the model must learn to produce. The full conversation is tokenized once
with an offsets mapping, and a token is learned when it *starts* inside such a span: no
character of a prompt is ever a target, which holds for any template (llm-jp-3, ChatML...).

No double BOS: templates like llm-jp-3's write the BOS themselves while the tokenizer adds
one by default, so the rendered text is encoded with ``add_special_tokens=False``; special
tokens written by the template as text (``<s>``, ``</s>``) are still parsed as single ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_kaja.data.records import DataFormatError, Message


def load_chat_template(path: str | Path) -> str:
    """Read a jinja chat template file (the `--chat-template FILE` override)."""
    text = Path(path).read_text(encoding="utf-8")
    if "{%" not in text and "{{" not in text:
        raise ValueError(f"{path}: does not look like a jinja chat template")
    return text


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of one rendered conversation and a 0/1 mask of the tokens to learn."""

    input_ids: np.ndarray  # int32 [n]
    assistant_mask: np.ndarray  # uint8 [n]; 1 = assistant token (incl. the EOS closing a turn)


def build_loss_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose first character lies in one of the `[start, end)` char spans."""
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.uint8)
    for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1
    return mask


class ChatRenderer:
    """Tokenizes conversations with a tokenizer and (optionally overridden) chat template."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        if not self.chat_template:
            raise ValueError(
                "the tokenizer has no chat template; pass one with --chat-template FILE"
            )
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token; answers could never end")

    def fingerprint(self) -> str:
        """A hash of everything that decides the token ids: vocab, normalizer, template."""
        h = hashlib.sha256()
        h.update(self.tokenizer.backend_tokenizer.to_str().encode())
        h.update(self.chat_template.encode())
        h.update(str(self.tokenizer.eos_token).encode())
        h.update(str(self.tokenizer.bos_token).encode())
        return h.hexdigest()

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as the template writes it."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def assistant_spans(self, messages: list[Message], location: str = "") -> list[tuple[int, int]]:
        """Character spans `[start, end)` of each assistant answer and its closing EOS."""
        full = self.render(messages)
        eos = self.tokenizer.eos_token
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            answered = self.render(messages[: k + 1])
            if not (answered.startswith(prompt) and full.startswith(answered)):
                raise DataFormatError(
                    f"{location}: the chat template renders turn {k} differently once later "
                    "turns are added, so the assistant text cannot be located"
                )
            # Cut after the EOS that closes the answer: ChatML writes "<|im_end|>\n", and
            # the newline after the EOS is template framing, not something to learn.
            content_at = answered.find(message["content"], len(prompt))
            search_from = content_at + len(message["content"]) if content_at >= 0 else len(prompt)
            eos_at = answered.find(eos, search_from)
            if eos_at < 0:
                raise DataFormatError(
                    f"{location}: the chat template does not end assistant turns with the EOS "
                    f"token {eos!r}; the model would never learn to stop"
                )
            spans.append((len(prompt), eos_at + len(eos)))
        return spans

    def tokenize(self, messages: list[Message], location: str = "") -> TokenizedConversation:
        """Token ids (no added special tokens: the template writes them) and the loss mask."""
        text = self.render(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = self.assistant_spans(messages, location)
        mask = build_loss_mask(enc["offset_mapping"], spans)
        return TokenizedConversation(np.asarray(enc["input_ids"], dtype=np.int32), mask)
