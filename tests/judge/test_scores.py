import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megatron_kaja.judge import expected_judge_score, parse_score

ONE_TO_FIVE = range(1, 6)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("[[4]]", 4),
        ("理由: 丁寧に断っている。\n評価：4", 4),
        ("評価: ５", 5),  # full-width digit
        ("４", 4),
        (" 3 \n", 3),
        ("2点", 2),
        ("この回答は3点です。", 3),
        ("Rating: [[2]]", 2),
        ("最初は評価：2と考えたが、見直して評価：4とする。", 4),  # the conclusion counts
        ("[[5]] ... 評価：1", 5),  # the most explicit form wins
        ("[[9]]", None),  # out of scale: unreadable, not clipped, no fallback
        ("評価：0", None),
        ("よい回答です。", None),
        ("", None),
        (None, None),
        ("10点満点中8点", None),
    ],
)
def test_parse_score_examples(text, score):
    assert parse_score(text, ONE_TO_FIVE) == score


filler = st.text(alphabet=st.characters(blacklist_categories=("Nd",), blacklist_characters="[]点"))


@given(prefix=filler, score=st.integers(1, 5), fullwidth=st.booleans(), form=st.integers(0, 2))
def test_parse_score_reads_any_stated_score(prefix, score, fullwidth, form):
    digit = chr(ord("０") + score) if fullwidth else str(score)
    stated = [f"[[{digit}]]", f"評価：{digit}", f"\n評価: {digit}"][form]
    assert parse_score(prefix + "\n" + stated, ONE_TO_FIVE) == score


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd", "No"))))
def test_text_without_digits_is_unreadable(text):
    assert parse_score(text, ONE_TO_FIVE) is None


def test_expected_score_by_hand():
    logprobs = {"4": math.log(0.6), "▁4": math.log(0.1), "5": math.log(0.2), "の": math.log(0.1)}
    expected, mass = expected_judge_score(logprobs, ONE_TO_FIVE)
    assert mass == pytest.approx(0.9)
    assert expected == pytest.approx((4 * 0.7 + 5 * 0.2) / 0.9)
    assert expected_judge_score({"の": -0.1, "9": -0.2}, ONE_TO_FIVE) is None


@given(st.dictionaries(st.sampled_from("12345"), st.floats(-20, 0), min_size=1))
def test_expected_score_is_within_the_scale(logprobs):
    expected, mass = expected_judge_score(logprobs, ONE_TO_FIVE)
    lo, hi = min(map(int, logprobs)), max(map(int, logprobs))
    assert lo - 1e-9 <= expected <= hi + 1e-9 and 0 < mass <= len(logprobs)
