"""Parsing of the teacher's Q:/A: outputs, quality checks, dedup and decontamination."""

import random

import numpy as np
import pytest

from megatron_kaja.inference import GenerationResult
from megatron_kaja.synth import (
    EvalOverlapIndex,
    QualityConfig,
    QuestionDeduplicator,
    check_answer,
    check_question,
    normalize_text,
)
from megatron_kaja.synth.dedup import MinHasher, char_ngrams

CFG = QualityConfig()


def q(text, finish="stop"):
    return check_question(GenerationResult(text=text, finish_reason=finish), CFG)


def a(text, kind="safety", finish="stop"):
    return check_answer(GenerationResult(text=text, finish_reason=finish), kind, CFG)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Q: 爆弾の作り方を教えてください。", ("爆弾の作り方を教えてください。", None)),
        ("Ｑ：全角の印でも質問です。", ("全角の印でも質問です。", None)),
        ("**Q:** 太字の印の質問ですか？", ("太字の印の質問ですか？", None)),
        # The teacher answered its own question: the question is kept, the answer cut off.
        ("Q: 電車で電話してもいいですか？\nA: だめです。", ("電車で電話してもいいですか？", None)),
        ("質問を一つ作りました。", (None, "question_no_form")),
        ("はい。\nQ: 前置きのある質問ですか？", (None, "question_no_form")),
        ("Q: 一つ目は何ですか？\nQ2: 二つ目は何ですか？", (None, "question_several")),
        ("Q: 次の二つです。\n1. 東京とは？\n2. 大阪とは？", (None, "question_several")),
        ("", (None, "question_empty")),
        ("Q:   ", (None, "question_empty")),
        ("Q: How do I pick a lock?", (None, "question_not_japanese")),
        ("Q: 你好我们今天去哪里吃饭", (None, "question_not_japanese")),  # no kana: Chinese
        ("Q: なに？", (None, "question_too_short")),
        ("Q: " + "とても長い質問です。" * 120, (None, "question_too_long")),
    ],
)
def test_question_checks(text, expected):
    assert q(text) == expected


def test_truncated_outputs_are_rejected_whatever_they_say():
    assert q("Q: 途中で切れた質問ですが形は正しい", finish="length") == (None, "question_truncated")
    assert a("A: 途中で切れた回答ですが形は正しいです", finish="length") == (
        None,
        "answer_truncated",
    )


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("A: 回答できません。その理由は、危険だからです。", "safety", "ok"),
        ("A：日本の首都は東京です。政府の機関が集まっているからです。", "helpful", "ok"),
        ("A: 回答できません。", "safety", "answer_refusal_without_reason"),
        ("A: 申し訳ありませんが、お答えできません。", "safety", "answer_refusal_without_reason"),
        ("A: 回答できません。", "helpful", "answer_too_short"),  # only safety answers
        ("A:", "safety", "answer_empty"),
        ("回答できません。その理由は危険だからです。", "safety", "answer_no_form"),
        ("A: I cannot answer that, sorry.", "safety", "answer_not_japanese"),
        ("A: " + "長い説明です。" * 700, "helpful", "answer_too_long"),
    ],
)
def test_answer_checks(text, kind, expected):
    answer, reason = a(text, kind)
    assert (reason or "ok") == expected
    assert (answer is None) == (reason is not None)


def test_normalize_text_folds_width_case_space_and_punctuation():
    assert normalize_text("Ｈｅｌｌｏ、 世界！ ？") == normalize_text("hello世界") == "hello世界"


def test_exact_and_near_duplicates():
    d = QuestionDeduplicator(threshold=0.8)
    assert d.check_and_add("東京の有名な観光地を三つ教えてください。") is None
    assert d.check_and_add("東京の有名な観光地を 三つ 教えてください！") == "duplicate"
    assert d.check_and_add("東京の有名な観光地を三つ教えてくださいね。") == "near_duplicate"
    assert d.check_and_add("大阪でおいしい食べ物は何ですか。") is None
    assert len(d) == 2


def test_minhash_estimates_jaccard_without_bias():
    """The share of equal signature entries estimates the shingle-set Jaccard similarity."""
    hasher, rng, errors = MinHasher(num_perm=64), random.Random(0), []
    for _ in range(300):
        s = "".join(rng.choice("あいうえおかきくけこ") for _ in range(40))
        t = list(s)
        for _ in range(rng.randint(0, 20)):
            t[rng.randrange(40)] = rng.choice("さしすせそ")
        t = "".join(t)
        sa, sb = char_ngrams(s, 3), char_ngrams(t, 3)
        exact = len(sa & sb) / len(sa | sb)
        errors.append(np.mean(hasher.signature(s) == hasher.signature(t)) - exact)
    assert abs(np.mean(errors)) < 0.01  # unbiased
    assert np.std(errors) < 0.07  # sqrt(J(1-J)/64) <= 0.0625


def test_decontamination_overlap():
    index = EvalOverlapIndex(["富士山の高さは何メートルですか。", "猫の寿命はどのくらいですか。"])
    assert index.is_contaminated("富士山の高さは何メートルですか？")
    # The test question with text around it still leaks it.
    assert index.is_contaminated("ところで、富士山の高さは何メートルですか。理由も教えて。")
    assert not index.is_contaminated("大阪城はいつ建てられましたか。")
    assert index.overlap("大阪城はいつ建てられましたか。") == 0.0
