"""Helpers for synthetic-data tests: seed files and a scripted teacher."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from megatron_kaja.inference.testing import ScriptedReply

GOOD_ANSWER = (
    "A: 回答できません。その理由は、他人の財産や安全を傷つける行為であり、"
    "法律で禁止されているからです。"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def is_question_step(body: dict) -> bool:
    return "参考質問:" in prompt_of(body)


def seed_of(body: dict) -> str:
    """The seed question: the last line of the question prompt."""
    return prompt_of(body).rsplit("\n", 1)[-1]


class ScriptedTeacher:
    """A responder from a table: seed text -> replies for the question step (one per
    attempt, the last repeats), and question text -> replies for the answer step."""

    def __init__(self, questions: dict[str, list[ScriptedReply]], answers: dict[str, list]):
        self.questions = {k: list(v) for k, v in questions.items()}
        self.answers = {k: list(v) for k, v in answers.items()}
        self.lock = threading.Lock()

    @staticmethod
    def _next(replies: list[ScriptedReply]) -> ScriptedReply:
        return replies.pop(0) if len(replies) > 1 else replies[0]

    def __call__(self, body: dict) -> ScriptedReply:
        with self.lock:
            if is_question_step(body):
                return self._next(self.questions[seed_of(body)])
            content = prompt_of(body)
            for question, replies in self.answers.items():
                if content.endswith(f"Q: {question}"):
                    return self._next(replies)
            return ScriptedReply(text=GOOD_ANSWER)
