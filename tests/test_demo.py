"""The README's CPU demo: the whole pipeline on tiny models (fast variant)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    demo = REPO / "examples" / "tiny" / "run_demo.py"
    proc = subprocess.run(
        [sys.executable, str(demo), "--fast", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 8):
        assert f"[{n}/7" in proc.stdout
    assert (out / "data" / "synthetic.summary.json").is_file()
    for run in ("sft", "grpo"):
        assert (out / "runs" / run / "latest_checkpointed_iteration.txt").is_file()
        assert (out / "runs" / run / "metrics.jsonl").stat().st_size > 0
    for model in ("sft_hf", "grpo_hf", "merged_hf"):
        assert (out / "models" / model / "model.safetensors.index.json").is_file()
    compare = json.loads((out / "eval" / "compare" / "compare.json").read_text())
    assert set(next(iter(compare.values()))) == {"base", "sft", "grpo", "merged"}
    assert (out / "eval" / "compare" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
