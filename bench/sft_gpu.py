#!/usr/bin/env python
"""SFT training speed on one GPU: megatron_kaja's SFT step vs `transformers` + torch AdamW.

    python bench/sft_gpu.py                 # llm-jp-3-1.8b shape, bf16, seq 4096 (GPU)
    python bench/sft_gpu.py --layers 12     # fewer layers (printed in the output)
    python bench/sft_gpu.py --tiny          # tiny shapes, a few steps: CPU smoke test

Both sides train on the same packed synthetic rows (chat-like log-normal sample lengths,
random token ids, the second half of each sample as the answer), micro-batch by micro-batch:
(a) megatron_kaja: `build_training_stack` (megatron DDP, distributed optimizer, bf16 with fp32
    main weights) and `run_global_batch`, the SFT loop's step, with `--transformer-impl`
    (default sdpa: cu_seqlens -> torch's varlen flash kernel);
(b) `transformers` LlamaForCausalLM with `attn_implementation="sdpa"`, the packed rows' 4D
    block-causal mask, bf16 weights and torch AdamW (fused on GPU).
Both clip the gradient norm at 1.0. tokens/s counts every row position (padding included).
MFU = tokens/s x (6N + 12 L H s) / the bf16 matmul rate measured in this run (an n^3 product;
fp32 on CPU, where the figures only show that the script runs).
The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.packing import chat_like_lengths
from megatron_kaja.data import collate_packed_rows
from megatron_kaja.data.cache import TokenizedSamples
from megatron_kaja.data.dataset import PackedSFTDataset, PackingStats
from megatron_kaja.data.packing import pack_sequences
from megatron_kaja.models.llama.config import PRESETS, LlamaArch
from megatron_kaja.training.metrics import training_flops_per_token

TINY = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=4,
    vocab_size=256,
)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Rate of an n x n x n matrix product on this device (mean of `repeats`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def packed_micro_batches(arch: LlamaArch, args) -> list[list[dict]]:
    """`steps` global batches of `micro-batch-size` x `seq-length` packed rows."""
    rows_needed = args.steps * args.global_batch_size
    lengths = chat_like_lengths(rows_needed * args.seq_length // 64, args.seq_length, seed=0)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=offsets[1:])  # a sample of n positions holds n + 1 tokens
    rng = np.random.default_rng(1)
    tokens = rng.integers(8, arch.vocab_size, int(offsets[-1]), dtype=np.int32)
    answer = np.zeros_like(tokens, dtype=np.uint8)
    for start, end in itertools.pairwise(offsets):
        answer[(start + end) // 2 : end] = 1
    store = TokenizedSamples(tokens, answer, offsets)
    plan = pack_sequences(lengths, args.seq_length)
    if plan.num_rows < rows_needed:
        raise RuntimeError(f"packed {plan.num_rows} rows, need {rows_needed}")
    stats = PackingStats(len(lengths), plan.num_rows, int(lengths.sum()), 0.0, 0, 0)
    ids = np.arange(len(lengths), dtype=np.int64)
    dataset = PackedSFTDataset([store], np.zeros_like(ids), ids, lengths, plan, 4, stats)
    micro = args.micro_batch_size
    per_step = args.global_batch_size // micro
    batches = [
        collate_packed_rows([dataset[r] for r in range(i * micro, (i + 1) * micro)])
        for i in range(args.steps * per_step)
    ]
    return [batches[i * per_step : (i + 1) * per_step] for i in range(args.steps)]


def timed_steps(step_fn, global_batches, warmup: int) -> float:
    """Seconds per step over the batches after the first `warmup` (which compile / allocate)."""
    for batch in global_batches[:warmup]:
        step_fn(batch)
    _sync()
    start = time.perf_counter()
    for batch in global_batches[warmup:]:
        step_fn(batch)
    _sync()
    return (time.perf_counter() - start) / (len(global_batches) - warmup)


def bench_megatron(arch: LlamaArch, global_batches, args, bf16: bool) -> dict:
    from megatron_kaja.parallel.distributed import (
        destroy_model_parallel,
        initialize_model_parallel,
    )
    from megatron_kaja.training.setup import build_training_stack
    from megatron_kaja.training.sft import run_global_batch

    initialize_model_parallel(1, 1, seed=1)
    stack = build_training_stack(
        arch,
        lr=1e-5,
        min_lr=1e-6,
        train_iters=args.steps,
        clip_grad=1.0,
        bf16=bf16,
        use_distributed_optimizer=True,
        transformer_impl=args.transformer_impl,
    )
    losses = []

    def step(micro_batches):
        stack.ddp.zero_grad_buffer()
        stack.optimizer.zero_grad()
        loss, tokens = run_global_batch(
            stack, micro_batches, args.seq_length, False, arch.vocab_size
        )
        stack.optimizer.step()
        stack.scheduler.step(increment=1)
        losses.append(loss / tokens)

    seconds = timed_steps(step, global_batches, args.warmup)
    destroy_model_parallel()
    return {
        "impl": stack.transformer_impl,
        "step_s": seconds,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def bench_hf(arch: LlamaArch, global_batches, args, bf16: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_kaja.data import build_attention_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = LlamaConfig(**arch.to_hf_config("bfloat16" if bf16 else "float32"))
    config._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=device == "cuda"
    )
    losses = []

    def step(micro_batches):
        optimizer.zero_grad(set_to_none=True)
        total_tokens = sum(mb["loss_mask"].sum() for mb in micro_batches).item()
        loss_sum = 0.0
        for mb in micro_batches:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            b, s = mb["tokens"].shape
            # SDPA's bool convention: True = may attend (the inverse of megatron's mask)
            allowed = ~build_attention_mask(mb["cu_seqlens"], b, s)
            logits = model(
                mb["tokens"], attention_mask=allowed, position_ids=mb["position_ids"]
            ).logits
            token_loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="none"
            )
            loss = (token_loss * mb["loss_mask"].flatten()).sum()
            (loss / total_tokens).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss_sum) / total_tokens)

    seconds = timed_steps(step, global_batches, args.warmup)
    return {"step_s": seconds, "first_loss": losses[0], "last_loss": losses[-1]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 3 steps (CPU smoke)")
    parser.add_argument("--preset", default="llm-jp-3-1.8b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, help="fewer layers than the preset's")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps + warm-up steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--transformer-impl", default="sdpa")
    parser.add_argument("--matmul-size", type=int, default=8192)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_length, args.micro_batch_size, args.global_batch_size = 128, 2, 4
        args.steps, args.warmup, args.matmul_size = 3, 1, 256
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if args.global_batch_size % args.micro_batch_size:
        parser.error("--global-batch-size must be a multiple of --micro-batch-size")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    arch = TINY if args.tiny else PRESETS[args.preset]
    full_layers = arch.num_layers
    if args.layers:
        arch = dataclasses.replace(arch, num_layers=args.layers)
    bf16 = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    global_batches = packed_micro_batches(arch, args)
    # The rate of the dtype the models compute in: bf16 on GPU, fp32 on CPU (smoke test only).
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_tflops(args.matmul_size, dtype)
    tokens_per_step = args.global_batch_size * args.seq_length
    flops_per_token = training_flops_per_token(arch, args.seq_length)
    shape = "tiny" if args.tiny else args.preset
    print(f"device: {device}")
    print(
        f"model: {shape} shape, {arch.num_layers} of {full_layers} layers, seq {args.seq_length}, "
        f"micro batch {args.micro_batch_size}, global batch {args.global_batch_size}, "
        f"{'bf16' if bf16 else 'fp32 (no GPU)'}, {args.steps - args.warmup} timed steps"
    )
    print(f"matmul_tflops: {peak:.3f} ({dtype} {args.matmul_size}^3, measured)")
    results = {}
    for name, fn in (("megatron_kaja", bench_megatron), ("hf_sdpa", bench_hf)):
        results[name] = fn(arch, global_batches, args, bf16)
        gc.collect()  # the model and optimizer of this side go before the next one's
        if torch.cuda.is_available():
            results[name]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        r = results[name]
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token / (peak * 1e12)
        print(
            f"{name}: tokens_per_s {r['tokens_per_s']:.0f} | mfu {100 * r['mfu']:.1f}% | "
            f"step {r['step_s']:.3f} s | loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
        )
    ratio = results["megatron_kaja"]["tokens_per_s"] / results["hf_sdpa"]["tokens_per_s"]
    print(f"ratio megatron_kaja / hf_sdpa: {ratio:.2f}x")
    summary = {
        "device": device,
        "shape": shape,
        "layers": arch.num_layers,
        "full_layers": full_layers,
        "seq_length": args.seq_length,
        "bf16": bf16,
        "matmul_tflops": peak,
        **results,
        "ratio": ratio,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
