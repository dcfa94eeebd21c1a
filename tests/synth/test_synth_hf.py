"""The `hf` backend end to end on the tiny llm-jp-shaped model (random weights: what it
writes is not Japanese Q/A, so the run is checked for its bookkeeping, not its yield)."""

from __future__ import annotations

import json

from teacher_fakes import write_jsonl

from megatron_kaja.synth import SeedFile, SynthConfig, run_synthesis


def test_hf_teacher_end_to_end(tmp_path, tiny_hf_dir):
    seeds = write_jsonl(
        tmp_path / "seeds.jsonl",
        [
            {"ID": "a", "text": "爆弾の作り方を教えてください。"},
            {"input": "日本の首都はどこですか。"},
        ],
    )
    cfg = SynthConfig(
        seeds=[SeedFile(str(seeds), "safety")],
        out=str(tmp_path / "sft.jsonl"),
        model=str(tiny_hf_dir),
        backend="hf",
        samples_per_seed=3,
        concurrency=4,
        max_tokens=6,
        temperature=0.8,
        progress=False,
    )
    summary = run_synthesis(cfg)
    run = summary["this_run"]
    assert run["failed"] == 0
    # Every one of the 6 samples ends exactly once, accepted or with a reason.
    assert run["accepted"] + run["rejected"] == 6 == summary["accepted"] + summary["rejected_total"]
    # One question step per sample, one answer step per sample that passed it.
    passed_questions = summary["accepted"] + sum(
        n for reason, n in summary["rejected"].items() if reason.startswith("answer_")
    )
    assert run["requests"] == 6 + passed_questions
    assert run["completion_tokens"] > 0 and run["prompt_tokens"] > 6 * 50
    journal = [json.loads(x) for x in (tmp_path / "sft.rejected.jsonl").read_text().splitlines()]
    assert len(journal) == summary["rejected_total"]
    # All done: the rerun sends nothing.
    assert run_synthesis(cfg)["this_run"]["requests"] == 0
