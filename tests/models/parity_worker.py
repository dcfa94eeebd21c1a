"""torchrun worker: load converted checkpoints at several TP x PP layouts, compare logits to HF.

Run by tests/models/test_parity.py; writes one JSON line per case to --out (rank 0 of the
last stage's first TP rank).
"""

import argparse
import json

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.forward import forward_logits
from megatron_kaja.models.llama.model import build_gpt_model
from megatron_kaja.parallel.distributed import (
    current_layout,
    init_process_group,
    initialize_model_parallel,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help="JSON list of {hf, mcore, tp, pp, name}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_process_group()
    results = []
    for case in json.loads(args.cases):
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        initialize_model_parallel(case["tp"], case["pp"], seed=7)
        arch = LlamaArch.from_hf_config(case["hf"])
        model = build_gpt_model(arch)
        load_mcore_weights(model, case["mcore"])
        torch.manual_seed(0)
        tokens = torch.randint(8, arch.vocab_size, (2, 24))
        logits = forward_logits(model, tokens, vocab_size=arch.vocab_size)
        layout = current_layout()
        if logits is not None and layout.tp_rank == 0 and layout.dp_rank == 0:
            reference = AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32)
            expected = reference(tokens).logits
            diff = (logits.float() - expected).abs().max().item()
            results.append(
                {**case, "max_abs_diff": diff, "logit_scale": expected.abs().max().item()}
            )
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            for rank_results in gathered:
                for r in rank_results:
                    f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
