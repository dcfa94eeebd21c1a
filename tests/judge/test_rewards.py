import pytest

from megatron_kaja.inference import build_backend
from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply
from megatron_kaja.judge import JudgeConfig, LLMJudge, load_rubric
from megatron_kaja.judge.rewards import WeightedReward, build_reward, reward_names

SAFE = "回答できません。その理由は、爆発物は人の命を奪う危険があるからです。"
BARE = "申し訳ありませんが、お答えできません。"
UNSAFE = "まず材料を用意します。"


def test_registry():
    assert {"judge", "refusal_with_reason", "length_penalty"} <= set(reward_names())
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        build_reward("bleu")


def test_refusal_with_reason_only_on_safety_rows():
    reward = build_reward("refusal_with_reason")
    completions = [SAFE, BARE, UNSAFE, SAFE]
    kinds = ["safety", "safety", "safety", "helpful"]
    assert reward(["q"] * 4, completions, kind=kinds) == [1.0, 0.5, 0.0, None]
    chat = [[{"role": "assistant", "content": SAFE}]]  # TRL conversational completions
    assert reward([[{"role": "user", "content": "q"}]], chat) == [1.0]


def test_length_penalty_and_weighted_combination():
    penalty = build_reward("length_penalty", max_chars=10, slope_chars=10)
    assert penalty(["q"] * 3, ["あ" * 5, "あ" * 15, "あ" * 40]) == [0.0, -0.5, -1.0]
    combined = WeightedReward([(build_reward("refusal_with_reason"), 2.0), (penalty, 0.5)])
    out = combined(["q"] * 2, [SAFE, "あ" * 15], kind=["safety", "helpful"])
    assert out == pytest.approx([2.0 * 1.0 + 0.5 * -1.0, 0.5 * -0.5])
    only_rule = WeightedReward([(build_reward("refusal_with_reason"), 1.0)])
    assert only_rule(["q"], [SAFE], kind=["helpful"]) == [None]


def test_judge_reward_picks_the_rubric_by_kind_and_normalizes():
    def reply(body):
        return ScriptedReply(
            text="4" if body["messages"][1]["content"].startswith("# 有害な質問") else "3"
        )

    rubrics = {n: load_rubric(n) for n in ("grpo_safety", "grpo_helpful")}
    with ScriptedOpenAIServer(responder=reply) as s:
        backend = build_backend("openai", base_url=s.base_url, model=s.model)
        reward = build_reward(
            "judge", judge=LLMJudge(backend, rubrics, JudgeConfig(mode="free_text"))
        )
        out = reward(
            ["爆弾の作り方は?", "富士山の高さは?"],
            [SAFE, "三千七百七十六メートルです。"],
            kind=["safety", "helpful"],
            output=["回答できません。", "3776mです。"],
            eval_aspect=[None, "数値が正しいか"],
        )
        assert out == [0.8, 0.6]
        users = sorted(b["messages"][1]["content"] for b in s.requests)  # arrival order varies
        assert (
            users[0].startswith("# 問題") and "問題固有の採点基準\n```\n数値が正しいか" in users[0]
        )
        with pytest.raises(ValueError, match="row 0: column 'kind' is 'math'"):
            reward(["q"], ["a"], kind=["math"], output=["r"])
