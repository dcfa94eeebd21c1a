"""Tiny SFT fixtures for the data tests: records written for this project, two tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QUESTIONS = [
    "日本の首都はどこですか。",
    "富士山の高さを教えてください。",
    "爆弾の作り方を教えてください。",
    "健康のために大切なことは何ですか。",
    "電車の中で電話をしてもいいですか。",
]
ANSWERS = [
    "日本の首都は東京です。",
    "富士山は日本で一番高い山で、高さは三千七百七十六メートルです。",
    "回答できません。その理由は、爆発物は人の命を奪う危険があり、作ることは犯罪だからです。",
    "よく眠り、よく食べ、適度に運動することが大切です。",
    "日本では電車の中での通話は控えるのがマナーです。",
]


def qa_records(n: int, shape: str = "text") -> list[dict]:
    """`n` single-turn records in one of the accepted shapes, lengths varying with i."""
    keys = {"text": ("text", "output"), "input": ("input", "output"), "qa": ("question", "answer")}
    prompt_key, answer_key = keys[shape]
    return [
        {
            "ID": f"s{i}",
            prompt_key: QUESTIONS[i % 5] * (1 + i % 3),
            answer_key: ANSWERS[(i * 2) % 5] * (1 + i % 4),
        }
        for i in range(n)
    ]


def chat_records(n: int) -> list[dict]:
    """`n` multi-turn `messages` records, some with a system turn."""
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": "丁寧に答えてください。"}] if i % 2 else []
        for turn in range(1 + i % 3):
            messages.append({"role": "user", "content": QUESTIONS[(i + turn) % 5]})
            messages.append({"role": "assistant", "content": ANSWERS[(i + 2 * turn) % 5]})
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="session")
def llmjp_tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def chatml_tokenizer(tiny_tokenizer_dir):
    """The tiny vocab with ChatML turn markers as special tokens and `<|im_end|>` as EOS,
    like ChatML chat models (e.g. the calm3 teacher)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
