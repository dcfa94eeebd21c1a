#!/usr/bin/env python
"""Conversion speed and memory on a synthetic llm-jp-3-1.8b-shaped checkpoint.

Writes a random bf16 HF checkpoint with the 1.8b shape (~3.7 GB; `--layers 16` ~2.8 GB),
then in one run measures two figures per direction (HF -> torch_dist, torch_dist -> HF):

* whole command: `python tools/convert_checkpoint.py ...; sync`, timed from process start to
  exit (imports included), against `cp -r SRC DST; sync` of the same bytes, timed the same
  way. This is what a user times. Target: <= 2x the copy.
* work only: the conversion function alone in a fresh interpreter after its imports, against
  `shutil.copytree` of the same bytes.

Beside each time, its CPU seconds (user + sys of the command itself), which depend less on
what else the machine runs. Peak RSS is each child's, from the kernel (target <= 1.5 GB).
The machine's load (`/proc/loadavg`) is printed beside the figures: compare the ratios
within one run.

    python bench/convert.py [--workdir DIR] [--layers N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each step runs in a fresh interpreter started from this small parent process (Linux keeps
# ru_maxrss across fork + exec, so the parent must never grow: it imports no torch until the
# end). The child imports first, then times the work alone.
CHILD = """
import resource, sys, time
sys.path.insert(0, {repo!r})
{imports}
u = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
{body}
r = resource.getrusage(resource.RUSAGE_SELF)
cpu = r.ru_utime + r.ru_stime - u.ru_utime - u.ru_stime
print(time.perf_counter() - t, cpu, r.ru_maxrss)
"""


def run_child(body: str, imports: str = "") -> tuple[float, float, float]:
    """Run `body` in a fresh interpreter; return (seconds, CPU seconds, peak RSS in MB)."""
    code = CHILD.format(repo=str(REPO), imports=imports, body=body)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[-3]), float(out[-2]), float(out[-1]) / 1024


def run_command(cmd: list[str]) -> tuple[float, float, float]:
    """Run `cmd` and then `sync` as a user would; (seconds from start to exit, CPU seconds
    (user + sys) of the command, peak RSS MB of the command)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    subprocess.run(["sync"], check=True)
    cpu = usage.ru_utime + usage.ru_stime
    return time.perf_counter() - start, cpu, usage.ru_maxrss / 1024


def make_checkpoint(out: Path, num_layers: int | None) -> int:
    """A random bf16 llm-jp-3-1.8b-shaped HF checkpoint, streamed to disk shard by shard."""
    import torch

    from megatron_kaja.checkpoint.convert import hf_tensor_plan
    from megatron_kaja.checkpoint.safetensors_io import TensorSpec, write_safetensors_streaming
    from megatron_kaja.models.llama.config import PRESETS

    arch = PRESETS["llm-jp-3-1.8b"]
    if num_layers:
        arch = replace(arch, num_layers=num_layers)
    out.mkdir(parents=True)
    plan: list[TensorSpec] = hf_tensor_plan(arch, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for t in plan:
            yield t.name, (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)

    write_safetensors_streaming(out, plan, tensors(), max_shard_size="2GB")
    (out / "config.json").write_text(json.dumps(arch.to_hf_config("bfloat16")))
    return sum(t.nbytes for t in plan)


def _same_tensors(a_dir: Path, b_dir: Path) -> bool:
    import torch

    from megatron_kaja.checkpoint.hf import HFCheckpointReader

    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    return sorted(a.keys()) == sorted(b.keys()) and all(
        torch.equal(a.get(k), b.get(k)) for k in sorted(a.keys())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write (default: a temp dir)")
    parser.add_argument("--layers", type=int, help="fewer layers than 24 (said in the output)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, copy, mc, back = work / "hf", work / "copy", work / "mc", work / "hf_back"
    for path in (hf, copy, mc, back, work / "hf_back_cmd"):
        shutil.rmtree(path, ignore_errors=True)
    try:
        run_child(
            f"make_checkpoint(Path({str(hf)!r}), {args.layers})",
            imports="from pathlib import Path; from bench.convert import make_checkpoint",
        )
        nbytes = sum(p.stat().st_size for p in hf.iterdir())
        layers = f"{args.layers} layers" if args.layers else "24 layers"
        print(f"synthetic llm-jp-3-1.8b-shaped checkpoint ({layers}): {nbytes / 1e9:.2f} GB bf16")
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        # Whole commands, as a user times them.
        cp_cmd_s, cp_cmd_cpu, cp_cmd_rss = run_command(["cp", "-r", str(hf), str(copy)])
        shutil.rmtree(copy)
        tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
        to_mc_cmd_s, to_mc_cmd_cpu, to_mc_cmd_rss = run_command(
            [*tool, "hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc)]
        )
        to_hf_cmd_s, to_hf_cmd_cpu, to_hf_cmd_rss = run_command(
            [*tool, "mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back)]
        )
        shutil.rmtree(mc)
        back.rename(work / "hf_back_cmd")  # compared at the end: the parent stays small
        # The work alone, after imports.
        copy_s, copy_cpu, copy_rss = run_child(
            f"shutil.copytree({str(hf)!r}, {str(copy)!r})", imports="import shutil"
        )
        shutil.rmtree(copy)
        imports = "from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf"
        _, _, import_rss = run_child("pass", imports=imports)
        to_mc_s, to_mc_cpu, to_mc_rss = run_child(
            f"hf_to_mcore({str(hf)!r}, {str(mc)!r}, progress=False)", imports=imports
        )
        to_hf_s, to_hf_cpu, to_hf_rss = run_child(
            f"mcore_to_hf({str(mc)!r}, {str(back)!r}, progress=False)", imports=imports
        )
        same_cmd = _same_tensors(hf, work / "hf_back_cmd")
        same = _same_tensors(hf, back)
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        print(f"load average before / after: {' '.join(load_before)} / {' '.join(load_after)}")
        print(f"converter imports alone (work-only children): peak RSS {import_rss:.0f} MB")
        # CPU seconds (user + sys, the command's own, `sync` not included) depend less on
        # what else the machine runs than wall seconds do.
        print(f"{'step':<30}{'seconds':>9}{'x copy':>8}{'CPU s':>8}{'peak RSS MB':>13}")
        rows = [
            ("whole: cp -r + sync", cp_cmd_s, cp_cmd_s, cp_cmd_cpu, cp_cmd_rss),
            ("whole: hf-to-mcore + sync", to_mc_cmd_s, cp_cmd_s, to_mc_cmd_cpu, to_mc_cmd_rss),
            ("whole: mcore-to-hf + sync", to_hf_cmd_s, cp_cmd_s, to_hf_cmd_cpu, to_hf_cmd_rss),
            ("work: copytree", copy_s, copy_s, copy_cpu, copy_rss),
            ("work: hf -> torch_dist", to_mc_s, copy_s, to_mc_cpu, to_mc_rss),
            ("work: torch_dist -> hf", to_hf_s, copy_s, to_hf_cpu, to_hf_rss),
        ]
        for name, secs, base, cpu, rss in rows:
            print(f"{name:<30}{secs:>9.2f}{secs / base:>8.2f}{cpu:>8.2f}{rss:>13.0f}")
        print(f"round trips bitwise equal: whole commands {same_cmd}, work only {same}")
        worst = max(to_mc_cmd_s, to_hf_cmd_s) / cp_cmd_s
        peak = max(to_mc_cmd_rss, to_hf_cmd_rss, to_mc_rss, to_hf_rss)
        print(
            f"targets: each whole command <= 2x cp -r + sync -> {worst <= 2} ({worst:.2f}x); "
            f"peak RSS <= 1.5 GB -> {peak <= 1536} ({peak:.0f} MB)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
