"""Reading the teacher's `Q:` / `A:` outputs and rejecting the ones not worth training on.

Every check returns a rejection reason (a name from `REJECTION_REASONS`) instead of
raising: a 240k-sample run meets every kind of malformed output, and each is counted in
the summary rather than stopping the run.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from megatron_kaja.inference import GenerationResult

# Per teacher step (question / answer), then the question-set filters (dedup, leaks).
STEP_REASONS = ("truncated", "empty", "no_form", "several", "not_japanese", "too_short", "too_long")
REJECTION_REASONS = (
    *(f"question_{r}" for r in STEP_REASONS),
    "question_duplicate",
    "question_near_duplicate",
    "question_contaminated",
    *(f"answer_{r}" for r in STEP_REASONS if r != "several"),
    "answer_refusal_without_reason",
)

# A line that opens a question ("Q:", "Ｑ２：", "**Q:**", "質問1:") or an answer ("A:",
# "回答:"); full-width letters and colons are common in Japanese output. `\d` is Unicode.
_Q_MARK = re.compile(r"^[ \t*#>]*(?:[QＱ]\d*|質問\d*)[ \t]*[:：][ \t]*(?:\*\*)?", re.MULTILINE)
_A_MARK = re.compile(r"^[ \t*#>]*(?:[AＡ]\d*|回答\d*|答え)[ \t]*[:：][ \t]*(?:\*\*)?", re.MULTILINE)
# A numbered list of questions ("1. ...？") is several questions in one output too.
_NUMBERED_QUESTION = re.compile(r"^[ \t]*\d+[.)、][^\n]*[?？]", re.MULTILINE)
_KANA = re.compile(r"[\u3040-\u30ff]")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f々〆ー]")
# A refusal, and the signs that it gives its reason (the seed asks for
# 「回答できません。その理由は…」 rather than a bare 「回答できません。」).
_REFUSAL = re.compile(
    r"(回答|お答え|答え|お応え|対応|提供|お手伝い|協力)(は|することは)?(でき|いたしかね)(ません|かねます)"
    r"|(申し訳ありませんが|申し訳ございませんが)"
)
_REASON = re.compile(
    r"理由|なぜなら|ため[でに、。]|からです|からだ|ので[、。]|ためです|恐れがあ|可能性があ"
)


@dataclass(frozen=True)
class QualityConfig:
    """Limits on generated text, in characters after stripping the `Q:` / `A:` marker."""

    min_question_chars: int = 5
    max_question_chars: int = 1000
    min_answer_chars: int = 10
    max_answer_chars: int = 4000
    # Share of Japanese characters (kana, kanji) among letters; digits, Latin product names
    # and punctuation are common in good answers, so this is a majority test, plus at least
    # one kana so that Chinese text does not pass as Japanese.
    min_japanese_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_question_chars <= self.max_question_chars:
            raise ValueError("quality: need 0 < min_question_chars <= max_question_chars")
        if not 0 < self.min_answer_chars <= self.max_answer_chars:
            raise ValueError("quality: need 0 < min_answer_chars <= max_answer_chars")
        if not 0 <= self.min_japanese_ratio <= 1:
            raise ValueError("quality: min_japanese_ratio must be in [0, 1]")


def japanese_ratio(text: str) -> float:
    """Share of Japanese characters among the letters of `text` (0 when it has none)."""
    letters = [c for c in text if unicodedata.category(c)[0] == "L"]
    if not letters:
        return 0.0
    return sum(bool(_JAPANESE.match(c)) for c in letters) / len(letters)


def is_japanese(text: str, min_ratio: float) -> bool:
    return japanese_ratio(text) >= min_ratio and _KANA.search(text) is not None


def refuses_without_reason(answer: str) -> bool:
    """A refusal (回答できません, お答えできません, 申し訳ありませんが…) that never says why."""
    return _REFUSAL.search(answer) is not None and _REASON.search(answer) is None


def _after_marker(text: str, mark: re.Pattern, stop: re.Pattern) -> str | None:
    """The body after the first `mark` line, up to a line that opens the other part."""
    first = mark.search(text)
    if first is None or text[: first.start()].strip():
        return None  # no marker, or chatter before it
    body = text[first.end() :]
    end = stop.search(body)
    return (body[: end.start()] if end else body).strip()


def _length_reason(text: str, low: int, high: int) -> str | None:
    if len(text) < low:
        return "too_short"
    if len(text) > high:
        return "too_long"
    return None


def check_question(result: GenerationResult, cfg: QualityConfig) -> tuple[str | None, str | None]:
    """`(question, None)` for a usable first-step output, else `(None, reason)`.

    A trailing `A:` part (the teacher answered its own question) is cut off: the question
    is still good. Two `Q:` lines or a numbered list of questions are `question_several`.
    """
    text = (result.text or "").strip()
    if result.finish_reason == "length":
        return None, "question_truncated"
    if not text:
        return None, "question_empty"
    question = _after_marker(text, _Q_MARK, _A_MARK)
    if question is None:
        return None, "question_no_form"
    if not question:
        return None, "question_empty"
    if len(_Q_MARK.findall(text)) > 1 or len(_NUMBERED_QUESTION.findall(question)) > 1:
        return None, "question_several"
    if not is_japanese(question, cfg.min_japanese_ratio):
        return None, "question_not_japanese"
    reason = _length_reason(question, cfg.min_question_chars, cfg.max_question_chars)
    return (None, f"question_{reason}") if reason else (question, None)


def check_answer(
    result: GenerationResult, kind: str, cfg: QualityConfig
) -> tuple[str | None, str | None]:
    """`(answer, None)` for a usable second-step output, else `(None, reason)`.

    A `safety` answer that refuses without giving a reason is
    `answer_refusal_without_reason`: the seed's answer prompt asks for
    「回答できません。その理由は…」, and a bare refusal teaches the over-short answer.
    """
    text = (result.text or "").strip()
    if result.finish_reason == "length":
        return None, "answer_truncated"
    if not text:
        return None, "answer_empty"
    answer = _after_marker(text, _A_MARK, _Q_MARK)
    if answer is None:
        return None, "answer_no_form"
    if not answer:
        return None, "answer_empty"
    if not is_japanese(answer, cfg.min_japanese_ratio):
        return None, "answer_not_japanese"
    # Before the length check: a bare refusal is usually short, and this is the reason to report.
    if kind == "safety" and refuses_without_reason(answer):
        return None, "answer_refusal_without_reason"
    reason = _length_reason(answer, cfg.min_answer_chars, cfg.max_answer_chars)
    return (None, f"answer_{reason}") if reason else (answer, None)
