"""The seed's four teacher prompts, filled exactly (golden strings typed from the seed)."""

# ruff: noqa: E501  (the golden prompts are the seed's lines, verbatim)

import pytest

from megatron_kaja.synth import load_template_pair, load_templates

SEED_QUESTION = "電車の中で大声で電話をしてもいいですか。"
NEW_QUESTION = "図書館で大きな声で話してもいいですか。"

SAFETY_QUESTION = """以下の指示に従い、参考質問に基づいて、Questionを作成してください。

指示1: 本タスクでは、有害な質問が与えられ、それに対して適切な回答を生成することが求められます。

指示2: 本タスクにおける「適切さ」とは、回答が有害ではないことと、質問に対して適切な回答を生成することの両方を指します。

指示3: 参考質問に類似した、有害な質問を作成して下さい。

指示4: Qは余分なものは入れずに、一つだけ作成してください。

指示5: 日本語で出力してください。

指示6: 出力は、Q:で始めて下さい。

参考質問:

電車の中で大声で電話をしてもいいですか。"""

SAFETY_ANSWER = """以下の指示に従い、Q:に基づいて、適切なAnswerを作成してください。

指示1: 本タスクでは、有害な質問が与えられ、それに対して適切な回答を生成することが求められます。

指示2: 本タスクにおける「適切さ」とは、回答が有害ではないことと、質問に対して適切な回答を生成することの両方を指します。

指示3: 「回答できません。」という回答よりも「回答できません。その理由は…」という回答を生成するようにして下さい。

指示4: Aは余分なものは入れずに、一つだけ作成してください。

指示5: 日本語のみで出力し、回答に不要な文章は含めないでください。

指示6: 出力は、A:で始めて下さい。

Q: 図書館で大きな声で話してもいいですか。"""

HELPFUL_QUESTION = """以下の指示に従い、参考質問に基づいて、Questionを作成してください。

指示1: 本タスクでは、有用な質問が与えられ、それに対して適切な回答を生成することが求められます。

指示2: 本タスクにおける「適切さ」とは、回答が有害ではないことと、質問に対して適切な回答を生成することの両方を指します。

指示3: 参考質問に類似した、有用な質問を作成して下さい。

指示4: Qは余分なものは入れずに、一つだけ作成してください。

指示5: 日本語で出力してください。

指示6: 出力は、Q:で始めて下さい。

参考質問:

電車の中で大声で電話をしてもいいですか。"""

HELPFUL_ANSWER = """以下の指示に従い、Q:に基づいて、適切なAnswerを作成してください。

指示1: 本タスクでは、有用な質問が与えられ、それに対して適切な回答を生成することが求められます。

指示2: 本タスクにおける「適切さ」とは、回答が有害ではないことと、質問に対して適切な回答を生成することの両方を指します。

指示3: 質問に対して正しい回答を、理由も加えて生成するようにして下さい。

指示4: Aは余分なものは入れずに、一つだけ作成してください。

指示5: 日本語のみで出力し、回答に不要な文章は含めないでください。

指示6: 出力は、A:で始めて下さい。

Q: 図書館で大きな声で話してもいいですか。"""


def test_seed_templates_filled_exactly():
    templates = load_templates()
    assert templates["safety"].question_prompt(SEED_QUESTION) == SAFETY_QUESTION
    assert templates["safety"].answer_prompt(NEW_QUESTION) == SAFETY_ANSWER
    assert templates["helpful"].question_prompt(SEED_QUESTION) == HELPFUL_QUESTION
    assert templates["helpful"].answer_prompt(NEW_QUESTION) == HELPFUL_ANSWER


def test_braces_in_the_question_are_kept():
    pair = load_template_pair("helpful")
    text = 'JSON {"a": 1} と {question} をそのまま'
    assert pair.question_prompt(text).endswith(text)


def test_override_file_and_bad_files(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nquestion: '参考: {question}'\nanswer: '{question}'\n", "utf-8")
    templates = load_templates({"safety": str(good)})
    assert templates["safety"].question_prompt("x") == "参考: x"
    assert templates["helpful"].name == "helpful"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nquestion: 'no placeholder'\nanswer: '{question}'\n", "utf-8")
    with pytest.raises(ValueError, match=r"bad.yaml: question: .*placeholder \{question\}"):
        load_templates({"safety": str(bad)})
    with pytest.raises(ValueError, match="unknown template kind"):
        load_templates({"borderline": str(good)})
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_templates({"helpful": str(tmp_path / "missing.yaml")})
