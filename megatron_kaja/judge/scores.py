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

    Reads `[[4]]`, 「評価：4」, `Score: 4`, a bare `4`, 「4点」 (full-width digits too). The
    verdict is the judge's conclusion: the last line that states a score decides, and in it
    the last score of the most explicit kind. A score stated earlier (reasoning, or a
    quotation of the answer under judgement) never outranks the final verdict.
    """
    if not text:
        return None
    text = _canonical(text)
    allowed = set(scores)
    for line in reversed(text.splitlines() or [text]):
        for pattern in _SCORE_PATTERNS:
            found = pattern.findall(line)
            if found:
                value = int(found[-1])
                return value if value in allowed else None
    return None


# A verbatim copy of at least this many characters of the answer, around a score the judge
# wrote, marks that score as quoted (long enough that a judge's own 「評価：[[1]]」 line is
# not mistaken for a quotation of an answer that happens to contain the same few characters).
QUOTE_MIN_CHARS = 12


def mask_quoted(text: str, quoted: str, pattern: re.Pattern | str = r"\[\[[^\]]*\]\]|\d") -> str:
    """`text` (a judge's output) with every score-like match that lies inside a verbatim
    quotation of `quoted` (the answer under judgement) blanked out.

    A judge may quote the answer before its verdict; a score forged in the answer
    (「[[5]]」, 「評価：5」) must not be read as the judge's. For each match of `pattern` in
    `text`, the longest stretch of `text` around it that also occurs in `quoted` is found;
    when that stretch is at least `QUOTE_MIN_CHARS` long (or is the whole answer), the
    match is replaced by spaces. Text that was not copied from the answer is left as is.
    """
    if not text or not quoted:
        return text or ""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    stripped = quoted.strip()
    out = list(text)
    covered_to = -1  # end of the last quoted stretch: matches inside it need no new search
    for match in pattern.finditer(text):
        start, end = match.span()
        if end <= covered_to:
            out[start:end] = " " * (end - start)
            continue
        if text[start:end] not in quoted:
            continue
        # Grow the copied stretch to the left, then to the right, while it stays in `quoted`.
        lo, hi = start, end
        while lo > 0 and text[lo - 1 : hi] in quoted:
            lo -= 1
        while hi < len(text) and text[lo : hi + 1] in quoted:
            hi += 1
        if hi - lo >= min(QUOTE_MIN_CHARS, len(stripped)):
            out[start:end] = " " * (end - start)
            covered_to = hi
    return "".join(out)


def _score_mass(logprobs: Mapping[str, float], scores: Sequence[int]) -> dict[int, float]:
    # Several tokens may spell the same score ("4", "▁4"): their probabilities add.
    mass: dict[int, float] = {}
    for token, logprob in logprobs.items():
        value = score_token_value(token, scores)
        if value is not None and logprob > -math.inf:
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    return mass


def score_distribution(
    logprobs: Mapping[str, float], scores: Sequence[int]
) -> dict[int, float] | None:
    """P(score) over the tokens of `logprobs` (token -> log p) that are scores, renormalized
    to sum to 1. None when no score token is present."""
    mass = _score_mass(logprobs, scores)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return {s: p / total for s, p in sorted(mass.items())}


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
    mass = _score_mass(logprobs, scores)
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return sum(s * p for s, p in mass.items()) / total, total
