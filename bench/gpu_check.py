#!/usr/bin/env python
"""The GPU check: everything only a GPU can prove, in one call on ONE GPU (<= 8 minutes).

    python bench/gpu_check.py --out gpu_check        # one GPU: llm-jp-3-shaped model
    python bench/gpu_check.py --cpu --out gpu_check  # the same checks, small, on the CPU

Writes `OUT/summary.json` (one object: device, command, date, every check with its figures
and `ok`) and `OUT/gpu_check.log` (each step's command and output). Checks, in order:
1. `gpu_tests`: the `gpu`-marked tests (SDPA varlen flash equal to the masked path; strict
   devices' rules equal to what CUDA itself refuses);
2. `convert_verify`: a random HF llm-jp-3-shaped checkpoint -> megatron (tools/
   convert_checkpoint.py), then `checkpoint.verify`'s logits on the device vs transformers;
3. `sft_bf16`: pretrain_sft.py on one GPU (hidden 1024, 8 layers, seq 2048, vocab 99584):
   fp32 and bf16 (distributed optimizer) first-step losses equal within bf16 tolerance; a
   bf16 run stopped and saved at step 2 (--exit-interval, the process ends) and resumed to
   step 4 has the uninterrupted run's losses and weights, bitwise;
4. `grpo`: train_grpo.py, 2 steps each with the builtin and the hf rollout engines (the
   check's model as an in-process judge);
5. `sft_gpu_bench`: bench/sft_gpu.py once (tokens/s and MFU against transformers);
6. `scale`: the scale flags, each against the run without it (docs/scale.md):
   `overlap` (SFT, --overlap-grad-reduce + --overlap-param-gather, several buckets: the
   losses of the bf16 run of 3.), `grpo_overlap` (the same flags in train_grpo.py: the
   losses of 4.'s builtin run), `fp8` (--fp8-format hybrid through transformer-engine:
   first loss within FP8 tolerance of bf16's, tokens/s and MFU; skipped, saying why, without
   transformer-engine or an FP8 GPU), and on 2 devices (skipped, saying so, on one GPU)
   `sequence_parallel` (SFT and GRPO at TP=2, with vs without, peak memory of each),
   `virtual_pipeline` (SFT and GRPO at PP=2 with 2 model chunks per stage vs without) and
   `context_parallel` (SFT at CP=2 on sdpa vs DP=2 on sdpa, peak memory of each).
`--cpu` shrinks every size so CI proves the script end to end (its figures mean nothing);
there the 2-device settings run as 2 CPU processes.

Bringing the project to a machine that has only torch (CUDA) and transformers, Python 3.12,
no network. On a machine with network, from this repository:

    pip download --only-binary=:all: --no-deps --python-version 3.12 \\
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels \\
        megatron-core==0.16.1 pydantic pydantic-core annotated-types typing-inspection \\
        psutil pytest pluggy iniconfig pytest-timeout
    pip wheel --no-deps -w wheels .

(about 6 MiB of wheels in all). Copy `wheels/` and the repository over, then there:

    pip install --no-index --no-deps wheels/*.whl
    python bench/gpu_check.py --out gpu_check

The rest of the project's requirements (openai, datasets, matplotlib, sentencepiece) are
imported lazily and not needed here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (GPU, --cpu) sizes. The GPU model is large enough to take the real kernels.
SIZES = {
    "gpu": dict(
        hidden=1024, ffn=3584, layers=8, heads=16, kv_heads=8, vocab=99584, seq=2048,
        micro_batch=2, global_batch=4, records=160, text_repeat=60, new_tokens=32,
        bench=["--layers", "4", "--steps", "6", "--warmup", "2"],
    ),
    "cpu": dict(
        hidden=64, ffn=176, layers=4, heads=4, kv_heads=2, vocab=509, seq=128,
        micro_batch=2, global_batch=4, records=64, text_repeat=2, new_tokens=4,
        bench=["--tiny"],
    ),
}  # fmt: skip
BF16_FIRST_LOSS_RTOL = 2e-2  # bf16 weights and activations vs fp32, same data and init
VERIFY_RTOL = 1e-3  # |megatron - transformers| logits / largest logit (fp32)
FP8_FIRST_LOSS_RTOL = 5e-2  # FP8 GEMMs (hybrid, delayed scaling) vs bf16, same data and init
OVERLAP_LOSS_ATOL = 1e-6  # overlap only moves communication: the same sums
SCALE_LOSS_RTOL = 1e-5  # SP / VPP vs without, fp32: the same sums in another order
BUCKET_ELEMENTS = {"gpu": 4_000_000, "cpu": 2000}  # --ddp-bucket-size: several buckets


class Log:
    """The readable log: each step's command and output."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()
        print(text, flush=True)


def run(log: Log, name: str, cmd: list[str], timeout: int) -> tuple[bool, str, float]:
    """Run one command from the repository root; (succeeded, its stdout, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # every run is a world of its own
    log.write(f"== {name}: {' '.join(cmd)}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        ok, stdout, stderr = proc.returncode == 0, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        ok, stdout, stderr = False, "", f"timed out after {timeout} s\n{exc.stderr or ''}"
    seconds = time.perf_counter() - start
    log.write((stdout + stderr)[-6000:])
    log.write(f"== {name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s")
    return ok, stdout, seconds


def prepare(work: Path, size: dict) -> dict:
    """A random llm-jp-3-shaped HF checkpoint, the tiny tokenizer, SFT data and prompts."""
    from megatron_kaja.tiny import TinyLlamaShape, build_tiny_hf_model, build_tiny_tokenizer

    tokenizer = work / "tokenizer"
    build_tiny_tokenizer(tokenizer)
    shape = TinyLlamaShape(
        hidden_size=size["hidden"],
        intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        vocab_size=size["vocab"],
        max_position_embeddings=max(4096, size["seq"]),
    )
    hf = work / "hf"
    build_tiny_hf_model(hf, shape, seed=0, tokenizer_dir=tokenizer, max_shard_size="4GB")
    questions = ["日本の首都はどこですか。", "富士山の高さを教えてください。", "爆弾の作り方は?"]
    answers = ["東京です。", "三千七百七十六メートルです。", "回答できません。危険だからです。"]
    records = [
        {
            "ID": f"r{i}",
            "text": questions[i % 3] * (1 + i % size["text_repeat"]),
            "output": answers[(i + 1) % 3] * (1 + (i * 7) % size["text_repeat"]),
        }
        for i in range(size["records"])
    ]
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"ID": f"p{i}", "text": q, "output": a}, ensure_ascii=False) + "\n"
            for i, (q, a) in enumerate(list(zip(questions, answers, strict=True)) * 4)
        )
    )
    return dict(hf=hf, tokenizer=hf, train=train, prompts=prompts)


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def _weights(ckpt: Path) -> dict:
    from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
    from megatron_kaja.models.llama.state_dict import GLOBAL_MAPPINGS

    reader = open_mcore_checkpoint(ckpt)
    tensors = {m.te: reader.load_global(m) for m in GLOBAL_MAPPINGS}
    for layer in range(reader.arch.num_layers):
        tensors.update({f"{m.te}.{layer}": t for m, t in reader.load_layer(layer).items()})
    return tensors


def check_gpu_tests(log: Log, work: Path) -> dict:
    marked = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").rglob("test_*.py"))
              if "mark.gpu" in p.read_text(encoding="utf-8")]  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           f"--basetemp={work / 'pytest'}", *marked]  # fmt: skip
    ok, output, seconds = run(log, "gpu_tests", cmd, timeout=300)
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return dict(ok=ok, seconds=seconds, files=marked, result=tail)


def check_convert_verify(log: Log, work: Path, data: dict) -> dict:
    mcore = work / "mcore"
    convert = [sys.executable, "tools/convert_checkpoint.py", "hf-to-mcore",
               "--hf-dir", str(data["hf"]), "--out", str(mcore)]  # fmt: skip
    ok, _, seconds = run(log, "convert", convert, timeout=300)
    result = dict(ok=ok, convert_seconds=seconds)
    if not ok:
        return result
    out = work / "verify.jsonl"
    verify = [sys.executable, "-m", "megatron_kaja.checkpoint.verify", "--hf", str(data["hf"]),
              "--mcore", str(mcore), "--out", str(out)]  # fmt: skip
    ok, _, seconds = run(log, "verify", verify, timeout=300)
    result.update(verify_seconds=seconds)
    if ok:
        figures = json.loads(out.read_text().splitlines()[0])
        relative = figures["max_abs_diff"] / figures["logit_scale"]
        ok = relative < VERIFY_RTOL
        result.update(
            max_abs_diff=figures["max_abs_diff"], logit_scale=figures["logit_scale"],
            relative_diff=relative, tolerance=VERIFY_RTOL,
        )  # fmt: skip
    result["ok"] = ok
    return result


def launcher(processes: int) -> list[str]:
    """The command prefix that starts a script as `processes` ranks (one per device)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}"]  # fmt: skip


def sft_run(
    log: Log, work: Path, data: dict, size: dict, name: str, *extra: str,
    iters: int = 4, load: Path | None = None, processes: int = 1,
) -> tuple[bool, list[dict]]:  # fmt: skip
    """pretrain_sft.py on the check's model and data; (succeeded, its step records)."""
    out = work / "sft" / name
    cmd = [
        *launcher(processes), "pretrain_sft.py", "--load", str(load or work / "mcore"),
        "--tokenizer", str(data["tokenizer"]), "--train-data", str(data["train"]),
        "--seq-length", str(size["seq"]), "--micro-batch-size", str(size["micro_batch"]),
        "--global-batch-size", str(size["global_batch"]), "--train-iters", str(iters),
        "--data-cache-dir", str(work / "cache"), "--metrics-file", str(out / "m.jsonl"),
        "--seed", "5", "--lr", "2e-4", "--min-lr", "2e-5", *extra,
    ]  # fmt: skip
    ok, _, _ = run(log, f"sft {name}", cmd, timeout=300)
    return ok, _metrics(out / "m.jsonl")


def grpo_run(
    log: Log, work: Path, data: dict, size: dict, name: str, *extra: str, processes: int = 1
) -> tuple[bool, list[dict], float]:
    """train_grpo.py, 2 steps; (succeeded, its step records, seconds). The reward is the
    check's own model as an in-process judge: its scores vary, so the advantages, losses and
    updates compared are not zero (a rule reward scores a random model's answers all 0)."""
    out = work / "grpo" / name
    cmd = [
        *launcher(processes), "train_grpo.py", "--load", str(work / "mcore"),
        "--tokenizer", str(data["tokenizer"]), "--prompts", f"{data['prompts']}:safety",
        "--num-generations", "4", "--max-new-tokens", str(size["new_tokens"]),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "2",
        "--lr", "1e-5", "--metrics-file", str(out / "m.jsonl"), "--seed", "3",
        "--reward", "judge", "--judge-backend", "hf", "--judge-model", str(data["hf"]), *extra,
    ]  # fmt: skip
    ok, _, seconds = run(log, f"grpo {name}", cmd, timeout=300)
    steps = _metrics(out / "m.jsonl")
    ok = ok and len(steps) == 2 and all(math.isfinite(m["loss"]) for m in steps)
    return ok, steps, seconds


def check_sft(log: Log, work: Path, data: dict, size: dict) -> dict:
    def sft(name: str, *extra: str, iters: int = 4, load=None) -> tuple[bool, list[dict]]:
        return sft_run(log, work, data, size, name, *extra, iters=iters, load=load)

    bf16 = ("--bf16", "--use-distributed-optimizer")
    saved = work / "sft" / "bf16_resumed_ckpt"
    ok32, fp32 = sft("fp32", iters=1)
    ok16, full = sft("bf16", *bf16, "--save", str(work / "sft" / "bf16_ckpt"))
    ok_a, part1 = sft("bf16_part1", *bf16, "--save", str(saved), "--exit-interval", "2")
    ok_b, part2 = sft("bf16_resumed", *bf16, "--save", str(saved), load=saved)
    result: dict = dict(runs_ok=all((ok32, ok16, ok_a, ok_b)))
    if not result["runs_ok"] or not fp32 or len(full) != 4:
        return {**result, "ok": False}
    first32, first16 = fp32[0]["loss"], full[0]["loss"]
    resumed = [m["loss"] for m in part1 + part2]
    uninterrupted = [m["loss"] for m in full]
    ckpt = lambda root: root / "iter_0000004"  # noqa: E731
    a, b = _weights(ckpt(work / "sft" / "bf16_ckpt")), _weights(ckpt(saved))
    differing = sorted(k for k in a if not (a[k].shape == b[k].shape and a[k].equal(b[k])))
    first_ok = math.isfinite(first16) and abs(first16 - first32) <= BF16_FIRST_LOSS_RTOL * first32
    result.update(
        fp32_first_loss=first32, bf16_first_loss=first16, rtol=BF16_FIRST_LOSS_RTOL,
        bf16_losses=uninterrupted, resumed_losses=resumed, differing_weights=differing,
        tokens_per_s=full[-1].get("tokens_per_s"), mfu=full[-1].get("mfu"),
        ok=first_ok and resumed == uninterrupted and not differing,
    )  # fmt: skip
    return result


def check_grpo(log: Log, work: Path, data: dict, size: dict) -> dict:
    result = {}
    for engine in ("builtin", "hf"):
        ok, steps, seconds = grpo_run(log, work, data, size, engine, "--rollout-engine", engine)
        result[engine] = dict(ok=ok, seconds=seconds, losses=[m["loss"] for m in steps])
    return {**result, "ok": all(r["ok"] for r in result.values())}


def _loss_diff(a: list[dict], b: list[dict], relative: bool = False) -> float:
    """The largest loss difference of two runs step by step (inf unless both have steps)."""
    if not a or len(a) != len(b):
        return math.inf
    scale = (lambda m: abs(m["loss"])) if relative else (lambda m: 1.0)
    return max(abs(x["loss"] - y["loss"]) / scale(y) for x, y in zip(a, b, strict=True))


def _speed(steps: list[dict]) -> dict:
    last = steps[-1] if steps else {}
    return {k: last.get(k) for k in ("tokens_per_s", "mfu", "max_memory_gib")}


def fp8_unavailable(cpu: bool) -> str | None:
    """Why the FP8 setting cannot run here (None: it can)."""
    import torch

    from megatron_kaja.extras import is_available

    if cpu or not torch.cuda.is_available():
        return "no CUDA device (FP8 GEMMs need an FP8 GPU)"
    if not is_available("transformer_engine"):
        return "transformer-engine is not installed (pip install 'megatron-kaja[gpu]')"
    if torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name()
        return f"{name} has no FP8 tensor cores (compute capability 8.9 or newer needed)"
    return None


def check_scale(log: Log, work: Path, data: dict, size: dict, cpu: bool) -> dict:
    """The scale flags against the runs without them (the runs of check_sft / check_grpo are
    the baselines of the one-device settings)."""
    import torch

    bf16 = ("--bf16", "--use-distributed-optimizer")
    overlap = ("--overlap-grad-reduce", "--overlap-param-gather",
               "--ddp-bucket-size", str(BUCKET_ELEMENTS["cpu" if cpu else "gpu"]))  # fmt: skip
    result: dict = {}

    ok, steps = sft_run(log, work, data, size, "bf16_overlap", *bf16, *overlap)
    plain = _metrics(work / "sft" / "bf16" / "m.jsonl")
    diff = _loss_diff(steps, plain)
    result["overlap"] = dict(
        ok=ok and diff <= OVERLAP_LOSS_ATOL, max_loss_diff=diff, atol=OVERLAP_LOSS_ATOL,
        overlapped=_speed(steps), blocking=_speed(plain),
    )  # fmt: skip

    ok, steps, seconds = grpo_run(
        log, work, data, size, "builtin_overlap", "--use-distributed-optimizer", *overlap
    )
    diff = _loss_diff(steps, _metrics(work / "grpo" / "builtin" / "m.jsonl"))
    result["grpo_overlap"] = dict(
        ok=ok and diff <= SCALE_LOSS_RTOL, max_loss_diff=diff, atol=SCALE_LOSS_RTOL,
        seconds=seconds, losses=[m["loss"] for m in steps],
        grad_norms=[m["grad_norm"] for m in steps],
    )  # fmt: skip

    why_not = fp8_unavailable(cpu)
    if why_not:
        result["fp8"] = dict(ok=True, skipped=why_not)
    else:
        te = ("--transformer-impl", "transformer_engine")
        ok, steps = sft_run(log, work, data, size, "bf16_fp8", *bf16, *te, "--fp8-format", "hybrid")
        first = plain[0]["loss"] if plain else math.nan
        rel = abs(steps[0]["loss"] - first) / first if steps and plain else math.inf
        result["fp8"] = dict(
            ok=ok and rel <= FP8_FIRST_LOSS_RTOL, first_loss=steps[0]["loss"] if steps else None,
            bf16_first_loss=first, relative_diff=rel, rtol=FP8_FIRST_LOSS_RTOL,
            fp8=_speed(steps), bf16=_speed(plain),
        )  # fmt: skip

    devices = 2 if cpu else torch.cuda.device_count()
    if devices < 2:
        reason = f"needs 2 GPUs (TP=2 / PP=2), this machine has {devices}"
        result["sequence_parallel"] = dict(ok=True, skipped=reason)
        result["virtual_pipeline"] = dict(ok=True, skipped=reason)
        result["context_parallel"] = dict(ok=True, skipped=reason)
    else:
        # fp32, so that only the order of the sums differs (bf16 would round them apart).
        two = dict(iters=2, processes=2)
        tp2 = ("--tensor-model-parallel-size", "2")
        ok_a, without = sft_run(log, work, data, size, "tp2", *tp2, **two)
        ok_b, with_sp = sft_run(log, work, data, size, "tp2_sp", *tp2, "--sequence-parallel", **two)
        ok_c, g_without, _ = grpo_run(log, work, data, size, "tp2", *tp2, processes=2)
        ok_d, g_with, _ = grpo_run(
            log, work, data, size, "tp2_sp", *tp2, "--sequence-parallel", processes=2
        )
        sft_diff = _loss_diff(with_sp, without, relative=True)
        grpo_diff = _loss_diff(g_with, g_without)
        result["sequence_parallel"] = dict(
            ok=all((ok_a, ok_b, ok_c, ok_d)) and sft_diff <= SCALE_LOSS_RTOL
            and grpo_diff <= SCALE_LOSS_RTOL,
            sft_max_loss_rel_diff=sft_diff, grpo_max_loss_diff=grpo_diff, tol=SCALE_LOSS_RTOL,
            grpo_losses=[m["loss"] for m in g_with],
            grpo_grad_norms=[m["grad_norm"] for m in g_with],
            with_sp=_speed(with_sp), without_sp=_speed(without),
        )  # fmt: skip
        pp2 = ("--pipeline-model-parallel-size", "2")
        chunks = ("--num-layers-per-virtual-pipeline-stage", str(size["layers"] // 4))
        ok_a, one_chunk = sft_run(log, work, data, size, "pp2", *pp2, **two)
        ok_b, two_chunks = sft_run(log, work, data, size, "pp2_vpp2", *pp2, *chunks, **two)
        # GRPO alike: the sampler walks the chunks in layer order, the passes interleave.
        ok_c, g_one, _ = grpo_run(log, work, data, size, "pp2", *pp2, processes=2)
        ok_d, g_two, _ = grpo_run(log, work, data, size, "pp2_vpp2", *pp2, *chunks, processes=2)
        diff = _loss_diff(two_chunks, one_chunk, relative=True)
        grpo_diff = _loss_diff(g_two, g_one)
        result["virtual_pipeline"] = dict(
            ok=all((ok_a, ok_b, ok_c, ok_d)) and diff <= SCALE_LOSS_RTOL
            and grpo_diff <= SCALE_LOSS_RTOL,
            max_loss_rel_diff=diff, grpo_max_loss_diff=grpo_diff, tol=SCALE_LOSS_RTOL,
            grpo_losses=[m["loss"] for m in g_two],
            grpo_grad_norms=[m["grad_norm"] for m in g_two],
            interleaved=_speed(two_chunks), one_chunk=_speed(one_chunk),
        )  # fmt: skip
        # CP=2 x DP=1 against DP=2, both on sdpa: each rank its two chunks of every row and
        # the gathered K / V (the masked kernel) vs whole rows (varlen flash on the GPU).
        sdpa = ("--transformer-impl", "sdpa")
        ok_a, rows = sft_run(log, work, data, size, "sdpa_dp2", *sdpa, **two)
        ok_b, split = sft_run(
            log, work, data, size, "sdpa_cp2", *sdpa, "--context-parallel-size", "2", **two
        )
        diff = _loss_diff(split, rows, relative=True)
        result["context_parallel"] = dict(
            ok=ok_a and ok_b and diff <= SCALE_LOSS_RTOL, max_loss_rel_diff=diff,
            tol=SCALE_LOSS_RTOL, cp2=_speed(split), dp2=_speed(rows),
        )  # fmt: skip
    return {**result, "ok": all(r["ok"] for r in result.values())}


def check_sft_gpu_bench(log: Log, size: dict) -> dict:
    cmd = [sys.executable, "bench/sft_gpu.py", *size["bench"]]
    ok, output, seconds = run(log, "sft_gpu_bench", cmd, timeout=300)
    result = dict(ok=ok, seconds=seconds)
    if ok:
        figures = json.loads(output.strip().splitlines()[-1])  # its last line is the JSON
        result.update(
            {k: figures[k] for k in ("device", "megatron_kaja", "hf_sdpa", "ratio") if k in figures}
        )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="folder for summary.json and the log")
    parser.add_argument("--cpu", action="store_true", help="small sizes on the CPU (CI)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here; --cpu runs the small CPU version")
        return 2
    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    size = SIZES["cpu" if args.cpu else "gpu"]
    started = time.perf_counter()
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if not args.cpu else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sizes": {k: v for k, v in size.items() if k != "bench"},
    }
    data = prepare(work, size)
    checks = {"gpu_tests": check_gpu_tests(log, work)}
    checks["convert_verify"] = check_convert_verify(log, work, data)
    if checks["convert_verify"].get("convert_seconds") is not None and (work / "mcore").exists():
        checks["sft_bf16"] = check_sft(log, work, data, size)
        checks["grpo"] = check_grpo(log, work, data, size)
    checks["sft_gpu_bench"] = check_sft_gpu_bench(log, size)
    if "sft_bf16" in checks:  # the scale flags' baselines are the runs above
        checks["scale"] = check_scale(log, work, data, size, args.cpu)
    summary.update(
        checks=checks,
        seconds=time.perf_counter() - started,
        ok=all(c["ok"] for c in checks.values()) and len(checks) == 6,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log.write(json.dumps({k: (v["ok"] if isinstance(v, dict) else v) for k, v in checks.items()}))
    log.write(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
