"""`kill -9` in the middle of a run, then the same command again: the same number of
accepted pairs as an uninterrupted run, every id once, no lost or doubled record."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from teacher_fakes import GOOD_ANSWER, write_jsonl

from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

ROOT = Path(__file__).resolve().parents[2]
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほ"


def teacher(body: dict) -> ScriptedReply:
    """Deterministic per sample (the request seed) and per seed question, whatever the order:
    a quarter of samples answer in the wrong form, a quarter repeat their seed's one fixed
    question (exact duplicates: whichever comes first is kept), answers depend only on the
    question, and one question in five gets a bare refusal."""
    prompt = body["messages"][0]["content"]
    delay = 0.005 + random.Random(body["seed"] + 1).random() * 0.02
    if "参考質問:" in prompt:
        seed_text = prompt.rsplit("\n", 1)[-1]
        rng = random.Random(body["seed"])
        roll = rng.random()
        if roll < 0.25:
            return ScriptedReply(text="質問はこちらです。", delay_s=delay)
        if roll < 0.5:
            rng = random.Random(seed_text)
        return ScriptedReply(text="Q: " + "".join(rng.choices(KANA, k=24)) + "？", delay_s=delay)
    question = prompt.rsplit("Q: ", 1)[-1]
    if sum(map(ord, question)) % 5 == 0:
        return ScriptedReply(text="A: 回答できません。", delay_s=delay)
    return ScriptedReply(text=GOOD_ANSWER, delay_s=delay)


def command(base_url: str, seeds: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "tools" / "generate_sft_data.py"),
        "--seeds", f"{seeds}:safety",
        "--samples-per-seed", "5",
        "--base-url", base_url,
        "--model", "teacher",
        "--concurrency", "8",
        "--out", str(out),
        "--no-progress",
    ]  # fmt: skip


def lines(path: Path) -> list[dict]:
    """Complete records of a JSONL file that may be being written right now."""
    if not path.exists():
        return []
    return [
        json.loads(x) for x in path.read_text("utf-8").splitlines(keepends=True) if x.endswith("\n")
    ]


def test_kill_9_and_rerun_equals_uninterrupted_run(tmp_path):
    seeds = write_jsonl(
        tmp_path / "seeds.jsonl",
        [{"ID": f"q{i}", "text": f"種の質問その{i}です。"} for i in range(50)],
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with ScriptedOpenAIServer(responder=teacher, model="teacher") as server:
        full_out = tmp_path / "full" / "sft.jsonl"
        subprocess.run(command(server.base_url, seeds, full_out), env=env, check=True, timeout=300)

        out = tmp_path / "killed" / "sft.jsonl"
        proc = subprocess.Popen(command(server.base_url, seeds, out), env=env)
        deadline = time.monotonic() + 120
        while len(lines(out)) < 20:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = len(lines(out))
        # A write torn by the kill: the rerun must cut it, not choke on it or keep it.
        with out.open("ab") as f:
            f.write('{"id": "torn", "question": "途中で'.encode())
        subprocess.run(command(server.base_url, seeds, out), env=env, check=True, timeout=300)

    full, resumed = lines(full_out), lines(out)
    assert 20 <= killed_at < len(full)  # really killed mid-run
    assert len(resumed) == len(full)
    ids = [r["id"] for r in resumed]
    assert len(set(ids)) == len(ids) and "torn" not in ids
    # Which sample of a duplicate group wins depends on arrival order; the questions do not.
    assert sorted(r["question"] for r in resumed) == sorted(r["question"] for r in full)
    rejected_full = lines(full_out.with_name("sft.rejected.jsonl"))
    rejected = lines(out.with_name("sft.rejected.jsonl"))
    assert len(rejected) == len(rejected_full) == 250 - len(full)
    assert len({r["id"] for r in rejected} | set(ids)) == 250  # every sample exactly once
    summary = json.loads(out.with_name("sft.summary.json").read_text("utf-8"))
    assert summary["accepted"] == len(full) and summary["this_run"]["repaired_torn_bytes"] > 0
