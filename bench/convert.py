#!/usr/bin/env python
"""Conversion speed and memory on a synthetic llm-jp-3-1.8b-shaped checkpoint.

Writes a random bf16 HF checkpoint with the 1.8b shape (~3.6 GB), then in one run measures:
copying the same bytes (the baseline), HF -> torch_dist, and torch_dist -> HF, each in a
fresh subprocess whose peak RSS is read from the kernel. Prints the time ratios to the copy
and the peak RSS. Targets (issue 2): <= 3x the copy time, <= 1.5 GB peak RSS.

    python bench/convert.py [--workdir DIR] [--layers N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
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
t = time.perf_counter()
{body}
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_child(body: str, imports: str = "") -> tuple[float, float]:
    """Run `body` in a fresh interpreter; return (seconds, peak RSS in MB)."""
    code = CHILD.format(repo=str(REPO), imports=imports, body=body)
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(out[-2]), float(out[-1]) / 1024


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write (default: a temp dir)")
    parser.add_argument("--layers", type=int, help="fewer layers than 24 (said in the output)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, copy, mc, back = work / "hf", work / "copy", work / "mc", work / "hf_back"
    for path in (hf, copy, mc, back):
        shutil.rmtree(path, ignore_errors=True)
    try:
        run_child(
            f"make_checkpoint(Path({str(hf)!r}), {args.layers})",
            imports="from pathlib import Path; from bench.convert import make_checkpoint",
        )
        nbytes = sum(p.stat().st_size for p in hf.iterdir())
        layers = f"{args.layers} layers" if args.layers else "24 layers"
        print(f"synthetic llm-jp-3-1.8b-shaped checkpoint ({layers}): {nbytes / 1e9:.2f} GB bf16")
        copy_s, copy_rss = run_child(
            f"shutil.copytree({str(hf)!r}, {str(copy)!r})", imports="import shutil"
        )
        shutil.rmtree(copy)
        imports = "from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf"
        _, import_rss = run_child("pass", imports=imports + "; import megatron.core")
        to_mc_s, to_mc_rss = run_child(
            f"hf_to_mcore({str(hf)!r}, {str(mc)!r}, progress=False)", imports=imports
        )
        to_hf_s, to_hf_rss = run_child(
            f"mcore_to_hf({str(mc)!r}, {str(back)!r}, progress=False)", imports=imports
        )
        from megatron_kaja.checkpoint.hf import HFCheckpointReader

        a, b = HFCheckpointReader(hf), HFCheckpointReader(back)
        import torch

        same = all(torch.equal(a.get(k), b.get(k)) for k in sorted(a.keys()))
        rows = [
            ("copy (baseline)", copy_s, copy_rss),
            ("hf -> torch_dist", to_mc_s, to_mc_rss),
            ("torch_dist -> hf", to_hf_s, to_hf_rss),
        ]
        print(f"python + torch + megatron-core imports alone: peak RSS {import_rss:.0f} MB")
        print(f"{'step':<18}{'seconds':>9}{'x copy':>8}{'peak RSS MB':>13}")
        for name, secs, rss in rows:
            print(f"{name:<18}{secs:>9.2f}{secs / copy_s:>8.2f}{rss:>13.0f}")
        print(f"round trip bitwise equal: {same}")
        print(
            f"targets: each direction <= 3x copy -> "
            f"{max(to_mc_s, to_hf_s) / copy_s <= 3}; peak RSS <= 1.5 GB -> "
            f"{max(to_mc_rss, to_hf_rss) <= 1536}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
