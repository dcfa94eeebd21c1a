"""Chat-template rendering and the loss mask: assistant tokens + closing EOS, nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_kaja.data import ChatRenderer, DataFormatError, build_loss_mask, load_chat_template
from tests.data.conftest import CHATML_TEMPLATE

MULTI_TURN = [
    {"role": "system", "content": "丁寧に答えてください。"},
    {"role": "user", "content": "日本の首都はどこですか。"},
    {"role": "assistant", "content": "日本の首都は東京です。"},
    {"role": "user", "content": "富士山の高さを教えてください。"},
    {"role": "assistant", "content": "高さは三千七百七十六メートルです。"},
]


def learned_text(tokenizer, sample) -> list[str]:
    """The learned tokens decoded per contiguous run of mask 1."""
    runs, current = [], []
    pairs = zip(sample.input_ids.tolist(), sample.assistant_mask.tolist(), strict=True)
    for token, learned in pairs:
        if learned:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_llmjp_mask_covers_answers_and_eos_only(llmjp_tokenizer):
    sample = ChatRenderer(llmjp_tokenizer).tokenize(MULTI_TURN)
    eos = llmjp_tokenizer.eos_token
    assert learned_text(llmjp_tokenizer, sample) == [
        "日本の首都は東京です。" + eos,
        "高さは三千七百七十六メートルです。" + eos,
    ]
    # Prompt tokens (BOS, system preamble, "### 指示:", questions, "### 応答:") get no loss.
    assert sample.assistant_mask[0] == 0
    eos_positions = np.flatnonzero(sample.input_ids == llmjp_tokenizer.eos_token_id)
    assert sample.assistant_mask[eos_positions].tolist() == [1, 1]
    # Everything not learned is exactly the template's prompt text.
    renderer = ChatRenderer(llmjp_tokenizer)
    prompt_only = renderer.render(MULTI_TURN)
    for answer in ("日本の首都は東京です。", "高さは三千七百七十六メートルです。"):
        prompt_only = prompt_only.replace(answer + eos, "", 1)
    assert llmjp_tokenizer.decode(sample.input_ids[sample.assistant_mask == 0]) == prompt_only


def test_no_double_bos(llmjp_tokenizer):
    sample = ChatRenderer(llmjp_tokenizer).tokenize(MULTI_TURN[1:3])
    bos = llmjp_tokenizer.bos_token_id
    assert sample.input_ids[0] == bos
    assert (sample.input_ids == bos).sum() == 1
    # The trap this guards against: the default encode adds a second BOS.
    text = ChatRenderer(llmjp_tokenizer).render(MULTI_TURN[1:3])
    assert llmjp_tokenizer(text)["input_ids"][:2] == [bos, bos]
    # And the ids are those of the rendered text exactly.
    assert llmjp_tokenizer.decode(sample.input_ids) == text


def test_chatml_mask_is_template_agnostic(chatml_tokenizer):
    sample = ChatRenderer(chatml_tokenizer).tokenize(MULTI_TURN)
    assert learned_text(chatml_tokenizer, sample) == [
        "日本の首都は東京です。<|im_end|>",
        "高さは三千七百七十六メートルです。<|im_end|>",
    ]
    # The newline after <|im_end|> and the next "<|im_start|>user" are framing: not learned.
    last_eos = np.flatnonzero(sample.input_ids == chatml_tokenizer.eos_token_id)[-1]
    assert sample.assistant_mask[last_eos] == 1
    assert sample.assistant_mask[last_eos + 1 :].sum() == 0
    assert chatml_tokenizer.bos_token_id not in sample.input_ids.tolist()


def test_chat_template_override_from_file(llmjp_tokenizer, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_TEMPLATE, encoding="utf-8")
    renderer = ChatRenderer(llmjp_tokenizer, load_chat_template(path))
    # llm-jp's EOS is </s>, which this ChatML template never writes: a clear error, not a
    # model that never learns to stop.
    with pytest.raises(DataFormatError, match="EOS token '</s>'"):
        renderer.tokenize(MULTI_TURN[1:3], "x.jsonl:3")
    assert renderer.fingerprint() != ChatRenderer(llmjp_tokenizer).fingerprint()
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="jinja"):
        load_chat_template(tmp_path / "plain.txt")


def test_build_loss_mask_uses_token_starts():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 10)]
    # A token straddling the span start (3..5 with span from 4) is prompt text: not learned.
    assert build_loss_mask(offsets, [(4, 10)]).tolist() == [0, 0, 1, 1]
    assert build_loss_mask(offsets, [(0, 3), (9, 10)]).tolist() == [1, 0, 0, 1]
