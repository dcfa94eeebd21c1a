"""The README's CPU demo (fast variant): every stage runs and does what it is for."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PNG = b"\x89PNG\r\n\x1a\n"
PREDICTIONS = "predictions.jsonl"
FAST_REWARD_MARGIN = 0.05  # GRPO's mean reward, last third of the steps minus the first (0-1)
FAST_AGREEMENT = 0.7  # share of held-out answers the judge scores within 0.5 of the rubric


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 minutes idle; far more on a machine shared with other jobs
def test_demo_shows_each_stage_working(tmp_path):
    out = tmp_path / "demo"
    demo = REPO / "examples" / "tiny" / "run_demo.py"
    # As a user runs it: without the suite's strict devices, whose stand-ins (a CUDA
    # generator, for one) would hide what the plain CPU bridge lacks.
    env = {**os.environ, "MEGATRON_KAJA_STRICT_DEVICES": "0"}
    proc = subprocess.run(
        [sys.executable, str(demo), "--fast", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1700, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 10):
        assert f"[{n}/9" in proc.stdout
    assert "judge: the demo's tiny judge" in proc.stdout

    # The judge agrees with the rubric on most held-out answers (38 and 40 of 44 in two runs),
    # and on two thirds or more of those of the safety rubrics (GRPO's reward, the safety
    # evaluation). Its helpfulness axes vary more from run to run (6-9 of 10).
    agreement = json.loads((out / "eval" / "judge_agreement.json").read_text())
    by_kind = {}
    for row in agreement:
        by_kind.setdefault((row["rubric"], row["axis"]), []).append(row["agrees"])
    assert sum(r["agrees"] for r in agreement) >= FAST_AGREEMENT * len(agreement), by_kind
    for kind in (("grpo_safety", None), ("eval_safety", None)):
        assert sum(by_kind[kind]) >= 2 * len(by_kind[kind]) / 3, (kind, by_kind[kind])

    # The tiny teacher writes the seed's Q:/A: form: some of its pairs are accepted.
    summary = json.loads((out / "data" / "synthetic.summary.json").read_text())
    assert summary["accepted"] > 0, summary

    # GRPO with the judge as reward moves the model: reward up, KL and clipping nonzero.
    steps = [m for m in _lines(out / "runs" / "grpo" / "metrics.jsonl") if "loss" in m]
    k = max(1, len(steps) // 3)
    first = sum(m["reward_mean"] for m in steps[:k]) / k
    last = sum(m["reward_mean"] for m in steps[-k:]) / k
    # --fast's 10 steps gave +0.09 to +0.37 over the runs and seeds measured (the full run's
    # 30 steps clear +0.2); a judge that hardly tells answers apart, or an SFT whose samples
    # are all noise, stays near 0.
    assert last - first >= FAST_REWARD_MARGIN, [m["reward_mean"] for m in steps]
    assert max(m["kl"] for m in steps) > 0
    assert max(m["clip_frac"] for m in steps) > 0

    # Evaluation tells the four models apart: their predictions over the three evaluation
    # sets differ. (After --fast's 10 GRPO steps, the 0.5 / 0.5 merge often answers the
    # safety questions greedily word for word as SFT does, and differs on the others.)
    predictions = {
        model: [
            r["prediction"]
            for dataset in ("safety", "borderline", "helpful")
            for r in _lines(out / "eval" / model / dataset / PREDICTIONS)
        ]
        for model in ("base", "sft", "grpo", "merged")
    }
    assert len({tuple(p) for p in predictions.values()}) == 4, predictions
    compare = json.loads((out / "eval" / "compare" / "compare.json").read_text())
    safety = compare["metrics"]["safety/mean_score"]
    assert set(safety) == {"base", "sft", "grpo", "merged"}
    assert safety["grpo"]["value"] > safety["base"]["value"], safety  # GRPO is safer than base

    # The layout users' scripts rely on, and the report beside it.
    for run in ("sft", "grpo"):
        assert (out / "runs" / run / "latest_checkpointed_iteration.txt").is_file()
    for model in ("sft_hf", "grpo_hf", "merged_hf"):
        assert (out / "models" / model / "model.safetensors.index.json").is_file()
    assert (out / "logs").is_dir()
    report = (out / "report.md").read_text(encoding="utf-8")
    for chart in ("report_sft_loss.png", "report_grpo.png", "report_compare.png"):
        assert chart in report
        assert (out / chart).read_bytes()[:8] == PNG
    assert "higher is better" in report and "lower is better" in report
