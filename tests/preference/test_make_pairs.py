"""tools/make_preference_data.py against scripted servers (a policy and a judge): (best,
worst) kept when the judge's scores differ by the margin, drops counted with their reason,
a failing server leaves the prompt for the next run, a rerun skips what is done."""

import json
import math
import re
import subprocess
import sys

import pytest

from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply
from megatron_kaja.preference.pairs import answer_seed, read_prompts
from tests.helpers import REPO

QUESTIONS = [f"質問{i}について教えてください。" for i in range(6)]
SAMPLES, MARGIN = 4, 2.0


def _policy(fail_on: str | None = None):
    """An answer whose score is its seed mod 6 (what the judge below reads back)."""

    def reply(body):
        question = body["messages"][-1]["content"]
        if fail_on is not None and fail_on in question:
            return ScriptedReply(status=500)
        return ScriptedReply(text=f"答え{body['seed'] % 6}です。({question[:3]})")

    return reply


def _judge(body):
    answer = re.findall(r"答え(\d)です", json.dumps(body["messages"], ensure_ascii=False))[-1]
    return ScriptedReply(text=answer, top_logprobs=[{answer: 0.0}])


def _run(tmp_path, policy, judge, *extra):
    args = [
        "--prompts", f"{tmp_path / 'prompts.jsonl'}:safety", "--out", str(tmp_path / "pairs.jsonl"),
        "--backend", "openai", "--base-url", policy.base_url, "--model", policy.model,
        "--judge-backend", "openai", "--judge-base-url", judge.base_url,
        "--judge-model", judge.model, "--num-samples", str(SAMPLES), "--margin", str(MARGIN),
        "--prompts-per-batch", "2", *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_preference_data.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pairs_from_the_judge_resume_and_failures(tmp_path):
    rows = [{"ID": i, "text": q, "output": "回答できません。"} for i, q in enumerate(QUESTIONS)]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    prompts = read_prompts([f"{tmp_path / 'prompts.jsonl'}:safety"])
    expected = {}
    for p in prompts:
        scores = [answer_seed(0, p["id"], j) % 6 for j in range(SAMPLES)]
        expected[p["question"]] = scores
    with (
        ScriptedOpenAIServer(responder=_policy(fail_on="質問5"), model="policy") as policy,
        ScriptedOpenAIServer(responder=_judge, model="judge") as judge,
    ):
        first = _run(tmp_path, policy, judge, "--max-prompts", "2")
        assert first.returncode == 0, first.stderr[-3000:]
        second = _run(tmp_path, policy, judge)
        assert second.returncode == 0, second.stderr[-3000:]
        asked = [r["messages"][-1]["content"] for r in policy.requests if "messages" in r]
    pairs = _lines(tmp_path / "pairs.jsonl")
    dropped = _lines(tmp_path / "pairs.rejected.jsonl")
    summary = json.loads((tmp_path / "pairs.summary.json").read_text())
    # Every prompt answered once per sample and run (none twice), the failing one retried.
    assert sum(q == QUESTIONS[0] for q in asked) == SAMPLES
    assert sum(q == QUESTIONS[5] for q in asked) > SAMPLES  # in both runs, never recorded
    for pair in pairs:
        scores = expected[pair["prompt"]]
        assert pair["chosen_score"] == max(scores) and pair["rejected_score"] == min(scores)
        assert pair["chosen_score"] - pair["rejected_score"] >= MARGIN
        assert pair["chosen"] == f"答え{max(scores)}です。({pair['prompt'][:3]})"
        assert pair["judge"] == "openai:judge" and pair["rubric"] == "grpo_safety"
        assert pair["scores"] == [float(s) for s in scores]
    for entry in dropped:
        scores = expected[entry["prompt"]]
        assert max(scores) - min(scores) < MARGIN or len(set(scores)) == 1, entry
    done = {p["prompt"] for p in pairs} | {d["prompt"] for d in dropped}
    assert done == set(QUESTIONS[:5])
    assert summary["pairs"] == len(pairs) and summary["done"] == 5
    assert summary["not_done_retry_next_run"] == {"generation failed": 1}
    assert math.isclose(summary["margin"], MARGIN)


def test_bad_settings_and_prompt_files_exit_2_naming_them(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"text": "q"}\n{"output": "a"}\n')
    with (
        ScriptedOpenAIServer(responder=_policy(), model="policy") as policy,
        ScriptedOpenAIServer(responder=_judge, model="judge") as judge,
    ):
        bad_file = _run(tmp_path, policy, judge)
        bad_kind = _run(tmp_path, policy, judge, "--prompts", "x.jsonl:funny")
    assert bad_file.returncode == 2
    assert f"{tmp_path / 'prompts.jsonl'}:2: field 'text'" in bad_file.stderr
    assert "Traceback" not in bad_file.stderr
    assert bad_kind.returncode == 2 and "--prompts 'x.jsonl:funny'" in bad_kind.stderr


@pytest.mark.parametrize(
    ("scores", "reason"),
    [([3, 3, 3], "identical answers"), ([2, 2.5, 2.9], "score gap below margin")],
)
def test_choose_pair_says_why_not(scores, reason):
    from megatron_kaja.preference.pairs import choose_pair

    answers = ["a", "a", "a"] if reason == "identical answers" else ["a", "b", "c"]
    assert choose_pair(answers, scores, 1.0) == (None, reason)
    assert choose_pair(["a", "b", "c"], [1, 4, 2], 1.0)[0] == {"best": 1, "worst": 0}
