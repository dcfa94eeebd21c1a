"""torchrun worker: the SDPA spec at TP=2 on packed rows; rank 0 saves full logits and grads.

argv[1]: JSON {"cases": [{"name", "mcore"}], "out": DIR}. For each converted checkpoint it
loads the weights at TP=2, runs the packed batch of `tests.models.test_sdpa.packed_batch`
forward and backward, gathers the vocab-parallel logits and the TP-sharded gradients of the
attention projections, and writes `{name}.pt`.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.models.llama.model import build_gpt_model
from megatron_kaja.models.llama.sdpa import packed_seq_params
from megatron_kaja.parallel.distributed import destroy_model_parallel, initialize_model_parallel
from tests.models.test_sdpa import loss_of_logits, packed_batch


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    initialize_model_parallel(2, 1, seed=1)
    for case in spec["cases"]:
        arch = open_mcore_checkpoint(case["mcore"]).arch
        model = build_gpt_model(arch, transformer_impl="sdpa")
        load_mcore_weights(model, case["mcore"], "sdpa")
        tokens, positions, cu_seqlens = packed_batch(arch.vocab_size)
        logits = model(
            tokens,
            positions,
            None,
            packed_seq_params=packed_seq_params(cu_seqlens, tokens.shape[1]),
        )
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        full = full[..., : arch.vocab_size]
        loss_of_logits(full).backward()
        grads = {}
        for name, param in model.named_parameters():
            if "linear_qkv" in name or "linear_proj" in name:
                # column-parallel (qkv) shards dim 0; row-parallel (proj) shards dim 1
                dim = 0 if "linear_qkv" in name else 1
                parts = [torch.empty_like(param.grad) for _ in range(2)]
                torch.distributed.all_gather(
                    parts, param.grad, group=parallel_state.get_tensor_model_parallel_group()
                )
                grads[name] = torch.cat(parts, dim=dim)
        if torch.distributed.get_rank() == 0:
            torch.save(
                {"logits": full.detach(), "grads": grads},
                Path(spec["out"]) / f"{case['name']}.pt",
            )
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
