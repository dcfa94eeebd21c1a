"""Reading a score from a judge: parsed from free text, or the expected score from
the probabilities of the score tokens (one generated token, a continuous reward)."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

# Most explicit first. A pattern that matches decides the reading: if its last match is out
# of the scale, the output is unreadable (we do not fall back to a looser pattern and guess).
_SCORE_PATTERNS = (
    re.compile(r"\[\[\s*(-?\d+)\s*\]\]"),  # MT-bench / llm-jp-judge style: [[4]]
    re.compile(
        r"(?:評価|点数|スコア|得点|判定|score|rating)\s*[:=]\s*\[?\s*(-?\d+)", re.IGNORECASE
    ),
    re.compile(r"^\s*(-?\d+)\s*点?\s*[。.]?\s*$"),  # the whole output is a bare number
    re.compile(r"(?<![\d.])(-?\d+)\s*点(?!数)"),  # 「4点です」
)


def _canonical(text: str) -> str:
    # NFKC maps full-width digits and colons (４, ：) to ASCII, so one pattern reads both.
    return unicodedata.normalize("NFKC", text)


def parse_score(text: str | None, scores: Sequence[int]) -> int | None:
    """The score a free-text judgement gives, or None when it cannot be read.

    Reads `[[4]]`, 「評価：4」, `Score: 4`, a bare `4`, 「4点」 (full-width digits too). When a
    judgement states several, the last one of the most explicit kind wins (judges reason
    first and conclude last).
    """
    if not text:
        return None
    text = _canonical(text)
    allowed = set(scores)
    for pattern in _SCORE_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = int(found[-1])
            return value if value in allowed else None
    return None


def score_token_value(token: str, scores: Sequence[int]) -> int | None:
    """The score a single generated token stands for ("4", " 4", "４"), else None."""
    token = _canonical(token).strip().lstrip("▁Ġ")  # sentencepiece / byte-BPE space marks
    if re.fullmatch(r"-?\d+", token) and int(token) in set(scores):
        return int(token)
    return None


def expected_judge_score(
    logprobs: Mapping[str, float], scores: Sequence[int]
) -> tuple[float, float] | None:
    """Probability-weighted mean score, E[s] = sum_s s p(s) / sum_s p(s), over the tokens
    of `logprobs` (token -> log p) that are scores, and the probability mass they hold.

    Several tokens may spell the same score ("4", "▁4"); their probabilities add. None when
    no score token is present.
    """
    mass: dict[int, float] = {}
    for token, logprob in logprobs.items():
        value = score_token_value(token, scores)
        if value is not None and logprob > -math.inf:
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return sum(s * p for s, p in mass.items()) / total, total
