"""SIGTERM sent to `torchrun` itself (what some schedulers do): torchrun passes it to each
worker's whole process group, checkpoint-writer processes included; the run still saves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.training.checkpointing import latest_iteration
from tests.helpers import REPO


@pytest.mark.slow
def test_sigterm_to_torchrun_still_saves_the_step_it_stopped_at(tiny_hf_dir, tmp_path):
    mc, save, metrics = tmp_path / "mc", tmp_path / "save", tmp_path / "metrics.jsonl"
    hf_to_mcore(tiny_hf_dir, mc, progress=False)
    rows = [{"text": "日本の首都は?" * (1 + i % 3), "output": "東京です。" * (1 + i % 2)}
            for i in range(64)]  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        str(REPO / "pretrain_sft.py"), "--load", str(mc), "--tokenizer", str(tiny_hf_dir),
        "--train-data", str(train), "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "100000", "--save", str(save),
        "--save-interval", "2", "--metrics-file", str(metrics),
        "--data-cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    # After a first save: megatron-core's writer queue process is running by then.
    while time.time() < deadline and latest_iteration(save) is None and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)  # to torchrun, not to the worker
    output, _ = proc.communicate(timeout=300)
    steps = [json.loads(line)["step"] for line in metrics.read_text("utf-8").splitlines()]
    assert "BrokenPipeError" not in output, output[-3000:]
    assert latest_iteration(save) == steps[-1] >= 2, output[-3000:]
    assert f"SIGTERM received: stopped after iteration {steps[-1]}, saved" in output
    assert not list(save.glob(".iter_*.tmp"))
