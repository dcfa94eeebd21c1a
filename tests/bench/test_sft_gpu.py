"""`bench/sft_gpu.py --tiny` runs on CPU and prints every figure the GPU run reports."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_sft_gpu_bench_tiny_prints_its_figures():
    # A world of its own: not the address of a process group this pytest process set up.
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "sft_gpu.py"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        timeout=600,  # generous: CI machines may be shared
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for prefix in ("device:", "model:", "matmul_tflops:", "megatron_kaja:", "hf_sdpa:", "ratio"):
        assert any(line.startswith(prefix) for line in lines), (prefix, proc.stdout)
    summary = json.loads(lines[-1])
    assert summary["layers"] == summary["full_layers"] == 2
    assert summary["megatron_kaja"]["impl"] == "sdpa"
    assert summary["matmul_tflops"] > 0
    for name in ("megatron_kaja", "hf_sdpa"):
        result = summary[name]
        assert result["tokens_per_s"] > 0 and result["mfu"] > 0
        assert 0 < result["first_loss"] < 10  # ~ln(256) for random weights, finite
    expected = summary["megatron_kaja"]["tokens_per_s"] / summary["hf_sdpa"]["tokens_per_s"]
    assert abs(summary["ratio"] - expected) < 1e-9
