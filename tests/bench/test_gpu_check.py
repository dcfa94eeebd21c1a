"""`bench/gpu_check.py --cpu` runs every check of the GPU check end to end at small sizes."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_check_cpu_runs_every_check(tmp_path):
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    out = tmp_path / "gpu_check"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1500,
        env={**env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, log[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = summary["checks"]
    assert summary["ok"] and summary["device"] == "cpu"
    assert set(checks) == {
        "gpu_tests", "convert_verify", "sft_bf16", "grpo", "sft_gpu_bench", "scale"
    }  # fmt: skip
    assert "skipped" in checks["gpu_tests"]["result"]  # no CUDA here
    assert checks["convert_verify"]["relative_diff"] < checks["convert_verify"]["tolerance"]
    sft = checks["sft_bf16"]
    assert len(sft["bf16_losses"]) == 4 and sft["resumed_losses"] == sft["bf16_losses"]
    assert sft["differing_weights"] == []
    assert sft["bf16_first_loss"] != sft["fp32_first_loss"]  # bf16 really ran
    assert all(len(checks["grpo"][e]["losses"]) == 2 for e in ("builtin", "hf"))
    assert checks["sft_gpu_bench"]["megatron_kaja"]["tokens_per_s"] > 0
    assert "== sft bf16_resumed: ok" in log
    # The scale flags: the 2-device settings run as 2 CPU processes; FP8 says why it cannot.
    scale = checks["scale"]
    assert scale["overlap"]["max_loss_diff"] <= scale["overlap"]["atol"]
    assert scale["grpo_overlap"]["max_loss_diff"] <= scale["grpo_overlap"]["atol"]
    # The GRPO comparisons compare something: the judge's varied scores give gradients.
    assert min(scale["grpo_overlap"]["grad_norms"]) > 0
    assert min(scale["sequence_parallel"]["grpo_grad_norms"]) > 0
    assert "no CUDA device" in scale["fp8"]["skipped"]
    assert scale["sequence_parallel"]["sft_max_loss_rel_diff"] <= scale["sequence_parallel"]["tol"]
    assert scale["sequence_parallel"]["grpo_max_loss_diff"] <= scale["sequence_parallel"]["tol"]
    assert scale["virtual_pipeline"]["max_loss_rel_diff"] <= scale["virtual_pipeline"]["tol"]
    assert scale["virtual_pipeline"]["grpo_max_loss_diff"] <= scale["virtual_pipeline"]["tol"]
    assert min(scale["virtual_pipeline"]["grpo_grad_norms"]) > 0
    for name in ("sft tp2_sp", "grpo tp2_sp", "sft pp2_vpp2", "grpo pp2_vpp2", "sft bf16_overlap"):
        assert f"== {name}: ok" in log, name
