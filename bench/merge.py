"""Benchmark tools/merge_models.py against mergekit on two synthetic llm-jp-shaped checkpoints.

    python bench/merge.py --size-gb 1.0 --workdir /tmp/merge_bench

Builds two bf16 `LlamaForCausalLM` checkpoints of about `--size-gb` each (llm-jp-3's
vocabulary of 99584, head_dim 128, ffn = 3.5 x hidden; the layer count sets the size),
then runs `linear` (A, B) and `ties` (base A, model B) merges by us and by mergekit, each
in its own subprocess, alternating, `--repeat` times, and reports the best wall time, peak
RSS (the child's ru_maxrss from wait4) and the largest difference between the two
outputs, tensor by tensor.

Both tools compute in float32 and write bfloat16 (mergekit's `dtype: float32`), so the
outputs should agree up to bf16 rounding; TIES may also differ where a magnitude equals
the trim threshold exactly (ties broken by index order here, by an unstable sort in
mergekit). Inputs are read once before timing so that every run starts from the same
(warm) page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_kaja.checkpoint.safetensors_io import (  # noqa: E402
    ShardedSafetensorsWriter,
    TensorSpec,
)
from megatron_kaja.merge.sources import open_tensor_source  # noqa: E402

VOCAB = 99584  # llm-jp-3's padded vocabulary
HEAD_DIM = 128


def llmjp_shape(size_gb: float) -> dict:
    """Hidden size and layer count giving about `size_gb` of bf16 weights."""
    params = size_gb * 1e9 / 2
    hidden = 2048
    # Shrink the hidden size until the two vocab matrices leave room for 2+ layers.
    while hidden > 256 and 2 * VOCAB * hidden > 0.6 * params:
        hidden //= 2
    ffn = hidden * 7 // 2
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(2, round((params - 2 * VOCAB * hidden - hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers}


def write_pair(dir_a: Path, dir_b: Path, shape: dict, seed: int = 0) -> None:
    """Checkpoint A random, B = A + a small task vector; both bf16, sharded, with config."""
    from transformers import LlamaConfig

    h, ffn, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=h // HEAD_DIM,
        num_key_value_heads=h // HEAD_DIM,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )
    shapes = {"model.embed_tokens.weight": (VOCAB, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    specs = [TensorSpec(k, s, torch.bfloat16) for k, s in shapes.items()]
    gen = torch.Generator().manual_seed(seed)
    writers = []
    for d in (dir_a, dir_b):
        d.mkdir(parents=True)
        config.save_pretrained(d)
        writers.append(ShardedSafetensorsWriter(d, specs, 500 * 10**6))
    for spec in specs:
        a = torch.randn(spec.shape, generator=gen).mul_(0.02)
        if spec.name.endswith("norm.weight"):
            a.add_(1.0)
        b = torch.randn(spec.shape, generator=gen).mul_(0.002).add_(a)
        writers[0].write(spec.name, a.to(torch.bfloat16))
        writers[1].write(spec.name, b.to(torch.bfloat16))
    for w in writers:
        w.close()


def timed_run(command: list[str]) -> dict:
    """Run `command`; its wall time and peak RSS (this child's own ru_maxrss, KiB)."""
    start = time.perf_counter()
    # This checkout's package, whatever copy of megatron_kaja is installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def compare(ours: Path, theirs: Path) -> dict:
    """Largest |ours - theirs| over all tensors, and the fraction of elements that differ."""
    a, b = open_tensor_source(ours), open_tensor_source(theirs)
    if set(a.keys()) != set(b.keys()):
        raise RuntimeError(f"tensor sets differ: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
    max_diff, differing, total = 0.0, 0, 0
    names = a.keys()
    for key in names:
        x, y = a.get(key).float(), b.get(key).float()
        diff = (x - y).abs()
        max_diff = max(max_diff, float(diff.max()))
        differing += int((diff > 0).sum())
        total += diff.numel()
    return {"max_abs_diff": max_diff, "frac_elements_differing": differing / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="size of each input checkpoint")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/merge_bench"))
    p.add_argument("--methods", nargs="+", default=["linear", "ties"], choices=["linear", "ties"])
    p.add_argument("--density", type=float, default=0.5, help="ties density")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest counts")
    p.add_argument("--report", type=Path, help="also write the results as JSON here")
    args = p.parse_args()

    shape = llmjp_shape(args.size_gb)
    a, b = args.workdir / "model_a", args.workdir / "model_b"
    # The index is written last: its presence means a checkpoint was written completely.
    if not all((d / "model.safetensors.index.json").is_file() for d in (a, b)):
        shutil.rmtree(args.workdir, ignore_errors=True)
        print(f"writing two synthetic checkpoints {shape} to {args.workdir}", flush=True)
        write_pair(a, b, shape)
    size = sum(f.stat().st_size for f in a.glob("*.safetensors")) / 1e9
    for f in [*a.glob("*.safetensors"), *b.glob("*.safetensors")]:
        with open(f, "rb") as fh:  # warm the page cache for every run alike
            while fh.read(1 << 26):
                pass

    recipes = {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": str(b), "parameters": {"weight": 0.5}},
            ],
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(a),
            "models": [{"model": str(b), "parameters": {"weight": 1.0, "density": args.density}}],
        },
    }
    results = {"input_gb_each": round(size, 3), "shape": shape, "methods": {}}
    for method in args.methods:
        ours_cfg = {**recipes[method], "out_dtype": "bfloat16"}
        theirs_cfg = {**recipes[method], "dtype": "float32", "out_dtype": "bfloat16"}
        paths = {}
        for name, cfg in (("ours", ours_cfg), ("mergekit", theirs_cfg)):
            (args.workdir / f"{method}_{name}.yaml").write_text(yaml.safe_dump(cfg))
            paths[name] = args.workdir / f"out_{method}_{name}"
        tool = str(REPO / "tools" / "merge_models.py")
        ours_recipe = str(args.workdir / f"{method}_ours.yaml")
        theirs_recipe = str(args.workdir / f"{method}_mergekit.yaml")
        mergekit_cli = [sys.executable, "-m", "mergekit.scripts.run_yaml"]
        commands = {
            "ours": [sys.executable, tool, "--config", ours_recipe, "--out", str(paths["ours"])],
            "mergekit": [*mergekit_cli, theirs_recipe, str(paths["mergekit"])],
        }
        # Alternate the tools and keep each one's best time: the machine is shared, so
        # single runs mostly measure the neighbours' load.
        runs: dict[str, list[dict]] = {"ours": [], "mergekit": []}
        for _ in range(args.repeat):
            for name, command in commands.items():
                shutil.rmtree(paths[name], ignore_errors=True)
                runs[name].append(timed_run(command))
        ours, theirs = (
            {
                "wall_s": min(r["wall_s"] for r in runs[name]),
                "peak_rss_gb": max(r["peak_rss_gb"] for r in runs[name]),
                "all_wall_s": [r["wall_s"] for r in runs[name]],
            }
            for name in ("ours", "mergekit")
        )
        row = {
            "ours": ours,
            "mergekit": theirs,
            "time_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
            "rss_ratio": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3),
            **compare(paths["ours"], paths["mergekit"]),
        }
        results["methods"][method] = row
        print(json.dumps({method: row}), flush=True)
        for out in paths.values():
            shutil.rmtree(out)

    print(
        "\n| method | ours s | mergekit s | time ratio | ours RSS GB | mergekit RSS GB "
        "| max abs diff | elements differing |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, r in results["methods"].items():
        print(
            f"| {method} | {r['ours']['wall_s']} | {r['mergekit']['wall_s']} | "
            f"{r['time_ratio']} | {r['ours']['peak_rss_gb']} | {r['mergekit']['peak_rss_gb']} | "
            f"{r['max_abs_diff']:.3g} | {r['frac_elements_differing']:.2e} |"
        )
    print(f"(inputs: 2 x {results['input_gb_each']} GB bf16, shape {shape})")
    if args.report:
        args.report.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
