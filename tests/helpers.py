"""Helpers shared by tests: launching torchrun workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 600) -> str:
    """Run `script` (a path, or `-m module`) under torchrun with `nproc` CPU processes.

    Returns its output, or fails with the tail of both streams.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def torchrun_result(script: str | Path, nproc: int, *args: str, timeout: int = 600) -> dict:
    """`run_torchrun`, then the JSON a worker printed on its `RESULT ` line (also printed
    here: `pytest -s` shows the measured figures)."""
    out = run_torchrun(script, nproc, *args, timeout=timeout)
    line = next(row for row in out.splitlines() if row.startswith("RESULT "))
    print(line)
    return json.loads(line.removeprefix("RESULT "))


def checkpoint_weights(ckpt) -> dict:
    """Every global tensor of a megatron checkpoint folder (any TP / PP), by its TE name."""
    from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
    from megatron_kaja.models.llama.state_dict import GLOBAL_MAPPINGS

    reader = open_mcore_checkpoint(ckpt)
    out = {m.te: reader.load_global(m) for m in GLOBAL_MAPPINGS}
    for layer in range(reader.arch.num_layers):
        out.update({f"{m.te}.{layer}": t for m, t in reader.load_layer(layer).items()})
    return out
