"""Check a converted megatron checkpoint against its HF original: logits at a TP x PP layout.

    torchrun --nproc-per-node 2 -m megatron_kaja.checkpoint.verify --hf HF --mcore MC --tp 2

Loads the megatron checkpoint into a GPTModel at the given layout (megatron-core, CPU + gloo
or GPU + NCCL), runs the same random tokens through it and through `transformers`
LlamaForCausalLM, and reports the largest absolute logit difference (fp32). `--cases` runs
several layouts in one launch (JSON list of {hf, mcore, tp, pp, name}), as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def compare_case(case: dict, num_tokens: int = 24) -> dict | None:
    """Run one case; the result on the rank that holds the full logits, else None."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.models.llama.forward import forward_logits
    from megatron_kaja.models.llama.model import build_gpt_model
    from megatron_kaja.parallel.distributed import (
        compute_device,
        current_layout,
        initialize_model_parallel,
    )

    parallel_state.destroy_model_parallel()
    initialize_model_parallel(case["tp"], case["pp"], seed=7)
    arch = LlamaArch.from_hf_config(case["hf"])
    model = build_gpt_model(arch)
    load_mcore_weights(model, case["mcore"])
    tokens = torch.randint(
        8, arch.vocab_size, (2, num_tokens), generator=torch.Generator().manual_seed(0)
    )
    logits = forward_logits(model, tokens.to(compute_device()), vocab_size=arch.vocab_size)
    layout = current_layout()
    if logits is None or layout.tp_rank != 0 or layout.dp_rank != 0:
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one result line per case, not a loading bar
    reference = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32)
    expected = reference(tokens).logits
    return {
        **case,
        # The reference runs on the host: no second copy of the weights on the device.
        "max_abs_diff": (logits.float().cpu() - expected).abs().max().item(),
        "logit_scale": expected.abs().max().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf")
    parser.add_argument("--mcore")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cases", help="JSON list of {hf, mcore, tp, pp, name}")
    parser.add_argument("--out", help="write one JSON line per case here (rank 0)")
    args = parser.parse_args(argv)
    if args.cases:
        cases = json.loads(args.cases)
    elif args.hf and args.mcore:
        cases = [dict(hf=args.hf, mcore=args.mcore, tp=args.tp, pp=args.pp, name="check")]
    else:
        parser.error("give --hf and --mcore, or --cases")
    from megatron_kaja.checkpoint import CheckpointError
    from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
    from megatron_kaja.parallel.distributed import destroy_model_parallel, init_process_group

    try:  # every checkpoint opened (and vetted) before any process group or model exists
        for case in cases:
            open_mcore_checkpoint(case["mcore"])
    except CheckpointError as exc:
        if os.environ.get("RANK", "0") == "0":  # one line from rank 0; the others exit quietly
            print(f"error: {exc}", file=sys.stderr)
        return 2
    init_process_group()
    results = []
    for case in cases:
        result = compare_case(case)
        if result is not None:
            results.append(result)
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        flat = [r for rank_results in gathered for r in rank_results]
        for r in flat:
            print(
                f"{r['name']}: TP={r['tp']} PP={r['pp']} max |logit diff| vs transformers = "
                f"{r['max_abs_diff']:.2e} (logits up to {r['logit_scale']:.2f})"
            )
        if args.out:
            with open(args.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in flat)
    destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
