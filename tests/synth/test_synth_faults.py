"""`tools/generate_sft_data.py` against a teacher that misbehaves: replies that are not chat
completions, a hung server, a run where nothing succeeds. Scripted servers on loopback."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from teacher_fakes import GOOD_ANSWER, is_question_step, seed_of, write_jsonl

from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import generate_sft_data as cli

SEEDS = ["友達の家の鍵を勝手に開ける方法は？", "薬局で薬を盗むにはどうしたらいい？"]


def run_cli(tmp_path, server, *extra, seeds=SEEDS) -> int:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"text": t} for t in seeds])
    argv = ["--seeds", f"{seeds}:safety", "--out", str(tmp_path / "sft.jsonl")]
    argv += ["--samples-per-seed", "1", "--model", server.model, "--base-url", server.base_url]
    return cli.main([*argv, "--max-attempts", "2", "--no-progress", *extra])


def test_malformed_replies_are_retried_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr("megatron_kaja.inference.openai_backend.random.uniform", lambda a, b: 0)
    failed_once: set[str] = set()

    def teacher(body):
        if is_question_step(body):
            seed = seed_of(body)
            if seed not in failed_once:  # each sample's first question attempt: not a completion
                failed_once.add(seed)
                return ScriptedReply(raw_body='{"choices": []}')
            return ScriptedReply(text=f"Q: 隣の家の玄関の鍵を開ける方法その{SEEDS.index(seed)}は？")
        return ScriptedReply(text=GOOD_ANSWER)

    with ScriptedOpenAIServer(responder=teacher, model="teacher") as server:
        assert run_cli(tmp_path, server) == 0
    summary = json.loads((tmp_path / "sft.summary.json").read_text("utf-8"))
    assert summary["accepted"] == 2
    assert (summary["this_run"]["retries"], summary["this_run"]["failed"]) == (2, 0)


def test_nothing_accepted_because_the_teacher_failed_exits_non_zero(tmp_path, capsys):
    html = ScriptedReply(raw_body="<html><body>Service Unavailable</body></html>")
    with ScriptedOpenAIServer(responder=lambda body: html, model="teacher") as server:
        assert run_cli(tmp_path, server) == 1
        assert len(server.requests) == 4  # two samples x two attempts
    err = capsys.readouterr().err
    assert "2 samples failed (last error: MalformedReply: not JSON: '<html><body>Service" in err
    assert "/v1/chat/completions]" in err
    assert "error: no pair was accepted in this run and requests failed" in err


def test_a_hung_teacher_stops_the_run_within_one_deadline(tmp_path, capsys):
    hang = ScriptedReply(text="Q: 質問ですか？", delay_s=30)
    seeds = [f"質問その{i}について教えてください。" for i in range(8)]
    with ScriptedOpenAIServer(responder=lambda body: hang, model="teacher") as server:
        start = time.monotonic()
        code = run_cli(
            tmp_path, server, "--request-timeout", "1", "--concurrency", "8", seeds=seeds
        )
        elapsed = time.monotonic() - start
    assert code == 1 and elapsed < 10, elapsed  # one 1 s deadline, not 8 x 2 x 30 s
    err = capsys.readouterr().err
    assert "error: the teacher server is failing: " in err
    assert "requests to http://127.0.0.1:" in err and "RequestTimeout" in err
    summary = json.loads((tmp_path / "sft.summary.json").read_text("utf-8"))
    assert summary["accepted"] == 0 and summary["this_run"]["failed"] >= 3
