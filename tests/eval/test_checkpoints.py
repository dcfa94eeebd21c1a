"""`--checkpoints RUN_DIR`: every iter_XXXXXXX of a run converted on the fly, evaluated,
resumable, and drawn over steps."""

import json
import math
import sys
from pathlib import Path

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import evaluate as evaluate_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_checkpoint_is_evaluated_resumably_and_drawn(tmp_path, tiny_hf_dir):
    run = tmp_path / "runs" / "grpo"
    for step in (10, 20):
        hf_to_mcore(tiny_hf_dir, run / f"iter_{step:07d}")
    (run / "iter_0000030").mkdir()  # an unfinished save: skipped
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"ID": "q1", "text": "質問"}, ensure_ascii=False) + "\n", "utf-8")
    bl = tmp_path / "b.jsonl"
    bl.write_text(json.dumps({"ID": "b1", "text": "包丁"}, ensure_ascii=False) + "\n", "utf-8")

    def reply(body):
        scores = body.get("structured_outputs", {}).get("choice", ["1"])
        dist = {s: math.log(1 / len(scores)) for s in scores}
        return ScriptedReply(text=scores[0], top_logprobs=[dist])

    with ScriptedOpenAIServer(responder=reply) as server:
        argv = ["--checkpoints", str(run), "--hf-template", str(tiny_hf_dir),
                "--dataset", f"safety={data}", "--dataset", f"borderline={bl}",
                "--max-new-tokens", "2", "--judge-backend", "openai",
                "--judge-base-url", server.base_url, "--judge-model", server.model,
                "--bootstrap-samples", "20", "--out", str(tmp_path / "curve")]  # fmt: skip
        assert evaluate_cli.main(argv) == 0
        asked = len(server.requests)
        assert evaluate_cli.main(argv) == 0  # resumed: nothing is converted or asked again
        assert len(server.requests) == asked
    out = tmp_path / "curve"
    curve = json.loads((out / "curve.json").read_text("utf-8"))
    assert sorted(curve) == ["10", "20"]
    assert curve["10"]["safety"]["violation_rate"]["value"] == 40.0  # P(1) + P(2) = 2/5
    report = json.loads((out / "step_0000020" / "report.json").read_text("utf-8"))
    assert report["name"] == "grpo step 20"
    assert not (out / ".hf" / "iter_0000020").exists()  # the HF copy is gone once evaluated
    for png in ("curve.png", "tradeoff.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
