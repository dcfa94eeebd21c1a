#!/usr/bin/env python
"""Benchmark GRPO on megatron-core, in one run:
(a) one GRPO step broken into phases (sync, rollout, reward, logprob, update) with each
    rollout engine that runs here (`builtin`, and `hf`, which receives the trainer's weights
    before each step: t_sync), torch AdamW on the GPTModel (the trainer uses the megatron
    optimizer; this isolates the algorithm);
(b) the builtin sampler's generated tokens/s with megatron-core's KV cache, without it, and
    `transformers` `generate` (KV cache) on the same weights and prompts (greedy, so every
    engine does the same work).

    python bench/grpo_step.py                                  # tiny llm-jp-shaped model, CPU
    python bench/grpo_step.py --hidden 2048 --ffn 7168 --layers 24 --heads 16 \
        --vocab 99584 --dtype bfloat16 --max-new-tokens 256     # llm-jp-3-1.8b shape, GPU

Weights are random (the reward is a rule on token ids), so answers rarely stop at EOS:
the sampler figures are for full-length responses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.model import build_gpt_model
from megatron_kaja.parallel.distributed import destroy_model_parallel, initialize_model_parallel
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.engines import HFEngine
from megatron_kaja.rl.rollout import PromptRecord
from megatron_kaja.rl.sampler import SamplingParams, generate
from megatron_kaja.rl.step import grpo_step
from megatron_kaja.tiny import TinyLlamaShape, build_tiny_hf_model

PAD = 4


def even_share(prompts, completions, **columns):
    """A rule reward on the decoded ids: the share of even token ids in the answer."""
    out = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


def sampler_tokens_per_s(model, hf, prompts, args, device) -> list[dict]:
    params = SamplingParams(args.max_new_tokens, temperature=0.0)
    kw = dict(eos_token_id=2, pad_token_id=PAD, vocab_size=hf.config.vocab_size)
    rows, outputs = [], {}

    def timed(name, fn):
        fn(2)  # warm-up with a short run
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = float("inf")
        for _ in range(args.repeats):  # best of N: the machine may be shared
            start = time.perf_counter()
            tokens, outputs[name] = fn(args.max_new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = min(seconds, time.perf_counter() - start)
        rows.append(
            {"engine": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
        )

    def ours(cache):
        def run(n):
            p = SamplingParams(n, params.temperature)
            out = generate(model, prompts, p, use_kv_cache=cache, **kw)
            return int(out.response_mask.sum()), out.responses()

        return run

    def transformers_generate(n):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=n,
                eos_token_id=2,
                pad_token_id=PAD,
            )[:, width:]
        # Tokens up to and including each row's EOS, as ours counts them.
        ended = (out == 2).cumsum(dim=1)
        keep = (ended == 0) | ((ended == 1) & (out == 2))
        return int(keep.sum()), [
            row[k].tolist() for row, k in zip(out.cpu(), keep.cpu(), strict=True)
        ]

    timed("builtin (KV cache)", ours(True))
    if not args.skip_no_cache:
        timed("builtin (no cache, recompute)", ours(False))
    timed("transformers generate", transformers_generate)
    reference = outputs["transformers generate"]
    identical = {name: out == reference for name, out in outputs.items()}
    return rows, identical


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompts", type=int, default=4, help="prompts per GRPO step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--skip-no-cache", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="sampler runs per engine (best of)")
    p.add_argument("--out", help="append the results as JSON lines here")
    args = p.parse_args(argv)

    initialize_model_parallel(1, 1, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(True)
    shape = TinyLlamaShape(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(256, args.prompt_len + args.max_new_tokens),
    )
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tiny_hf_model(Path(tmp) / "hf", shape, dtype=args.dtype, max_shard_size="2GB")
        hf_to_mcore(Path(tmp) / "hf", Path(tmp) / "mc", progress=False)
        arch = LlamaArch.from_hf_config(Path(tmp) / "hf")
        bf16 = args.dtype == "bfloat16"
        model, ref = (build_gpt_model(arch, bf16=bf16) for _ in range(2))
        for m in (model, ref):
            load_mcore_weights(m, Path(tmp) / "mc")
    hf = hf.to(device).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6

    gen = torch.Generator().manual_seed(0)
    prompt_ids = [
        [1, *torch.randint(8, args.vocab, (args.prompt_len - 1,), generator=gen).tolist()]
        for _ in range(args.prompts)
    ]
    # The sampler first, on the converted weights (before any update changes them).
    sampler_prompts = [ids for ids in prompt_ids for _ in range(args.num_generations)]
    rows, identical = sampler_tokens_per_s(model, hf, sampler_prompts, args, device)
    records = [PromptRecord(f"p{i}", ids, {"kind": "helpful"}) for i, ids in enumerate(prompt_ids)]
    config = GRPOConfig(
        max_new_tokens=args.max_new_tokens,
        num_generations=args.num_generations,
        global_batch_size=args.prompts * args.num_generations,
        micro_batch_size=args.micro_batch_size,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step_kw = dict(
        decode=lambda ids: " ".join(map(str, ids)),
        eos_token_id=2,
        pad_token_id=PAD,
        vocab_size=arch.vocab_size,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    source = itertools.cycle(records)
    del hf  # the hf engine builds its own copy, fed from the GPTModel
    engines = {
        "builtin": None,
        "hf": HFEngine(
            arch, eos_token_id=2, pad_token_id=PAD, dtype=model.config.params_dtype,
            device=device,
        ),
    }  # fmt: skip
    phases, lengths = {}, {}
    for name, engine in engines.items():
        for _ in range(2):  # a warm-up step, then the measured one
            start = time.perf_counter()
            if engine is not None:
                engine.load_weights(model)
            synced = time.perf_counter() - start
            metrics = grpo_step(
                model, ref, opt, source, even_share, config, engine=engine, **step_kw
            )
        phases[name] = {"t_sync": synced + metrics.get("t_sync", 0.0)}
        phases[name].update(
            {k: metrics[k] for k in ("t_rollout", "t_reward", "t_logprob", "t_update")}
        )
        lengths[name] = metrics["response_len_mean"]

    print(
        f"model: {params_m:.1f} M params ({args.layers} layers, hidden {args.hidden}, vocab "
        f"{args.vocab}, {args.dtype}) on {device}; {args.prompts} prompts x "
        f"{args.num_generations} generations, prompt {args.prompt_len} + {args.max_new_tokens} "
        f"new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    names = list(phases)
    print(f"{'GRPO step phase':16}" + "".join(f" {n + ' s':>10} {'share':>6}" for n in names))
    totals = {n: sum(phases[n].values()) for n in names}
    for phase in phases[names[0]]:
        cells = "".join(
            f" {phases[n][phase]:10.3f} {phases[n][phase] / totals[n]:6.1%}" for n in names
        )
        print(f"{phase:16}{cells}")
    print(f"{'total':16}" + "".join(f" {totals[n]:10.3f} {'':6}" for n in names))
    print(f"{'response_len':16}" + "".join(f" {lengths[n]:10.1f} {'':6}" for n in names))
    title = f"sampler (greedy, batch {len(sampler_prompts)}, best of {args.repeats})"
    print(f"\n{title:40} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for r in rows:
        same = "identical" if identical[r["engine"]] else "DIFFERENT tokens"
        figures = f"{r['tokens']:7d} {r['seconds']:8.3f} {r['tokens_per_s']:9.1f}"
        print(f"{r['engine']:40} {figures}  {same}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {"args": vars(args), "phases": phases, "sampler": rows, "identical": identical}
                )
                + "\n"
            )
    destroy_model_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
