"""torchrun worker: save a GPTModel run at TP=2 x PP=2 the way Megatron-LM's save_checkpoint
lays it out (megatron/training/checkpointing.py at core_v0.16.1), in both formats.

    torchrun --nproc-per-node 4 tests/checkpoint/megatron_lm_writer.py HF MCORE OUT

Weights come from MCORE (this project's conversion of HF), so readers can be checked
bitwise against HF. Each format gets what Megatron-LM writes beside the model: the `args`
Namespace (with the megatron enums and `signal.Signals` it pickles, and no unpadded
vocabulary size, as with its HuggingFaceTokenizer), `checkpoint_version` 3.0, `iteration`,
the optimizer and scheduler state, the rerun state machine's state and RNG state.

    OUT/legacy/latest_checkpointed_iteration.txt    "7"
    OUT/legacy/iter_0000007/mp_rank_0T_00P/model_optim_rng.pt
    OUT/torch_dist/latest_checkpointed_iteration.txt
    OUT/torch_dist/iter_0000007/{metadata.json,.metadata,common.pt,__*.distcp}
"""

from __future__ import annotations

import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ITERATION = 7


def megatron_lm_style_args(arch, padded_vocab: int, ckpt_format: str):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    from megatron_kaja.checkpoint.megatron_args import megatron_lm_args

    args = megatron_lm_args(
        arch,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        padded_vocab=padded_vocab,
        dtype=torch.float32,
        ckpt_format=ckpt_format,
        iteration=ITERATION,
    )
    args.vocab_size = None  # Megatron-LM with an HF tokenizer stores no unpadded size
    args.attention_backend = AttnBackend.auto
    args.model_type = ModelType.encoder_or_decoder
    args.exit_signal = signal.SIGTERM
    return args


def rng_state() -> dict:
    """Megatron-LM's get_rng_state keys (the CUDA generator's state is a byte tensor too)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_cuda_rng_tracker().get_states(),
    }


def rerun_state() -> dict:
    from megatron.core.rerun_state_machine import RerunDiagnostic, RerunMode, RerunState

    return {
        "mode": RerunMode.DISABLED,
        "state": RerunState.NOT_RUNNING_YET,
        "diagnostic": RerunDiagnostic.CORRECT_RESULT,
    }


def main(hf_dir: str, mcore_dir: str, out: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.parallel.distributed import (
        destroy_model_parallel,
        init_process_group,
        initialize_model_parallel,
    )
    from megatron_kaja.training import checkpointing
    from megatron_kaja.training.setup import build_training_stack

    init_process_group()
    initialize_model_parallel(2, 2, seed=3)
    arch = LlamaArch.from_hf_config(hf_dir)
    stack = build_training_stack(arch, lr=1e-4, min_lr=1e-5, train_iters=10)
    load_mcore_weights(stack.model, mcore_dir)
    stack.optimizer.reload_model_params()
    checkpointing._materialize_optimizer_state(stack.optimizer)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    out = Path(out)
    extra = {
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "num_floating_point_operations_so_far": 1234.0,
        "opt_param_scheduler": stack.scheduler.state_dict(),
        "rerun_state_machine": rerun_state(),
    }

    # legacy ("torch"): one file per model-parallel rank, written by data-parallel rank 0
    legacy = out / "legacy" / f"iter_{ITERATION:07d}" / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    legacy.mkdir(parents=True, exist_ok=True)
    state = {
        "args": megatron_lm_style_args(arch, stack.model.vocab_size, "torch"),
        "model": stack.model.state_dict_for_save_checkpoint(),
        "optimizer": stack.optimizer.state_dict(),
        "rng_state": [rng_state()],
        **extra,
    }
    torch.save(state, legacy / "model_optim_rng.pt")

    # torch_dist: one DCP folder; non-sharded entries go to common.pt
    ckpt = out / "torch_dist" / f"iter_{ITERATION:07d}"
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sharded = checkpointing._state_template(stack, False, "dp_reshardable")
    sharded["args"] = megatron_lm_style_args(arch, stack.model.vocab_size, "torch_dist")
    sharded["rng_state"] = ShardedObject(
        "rng_state", [rng_state()], (2, 2), (pp_rank, tp_rank), replica_id=0
    )
    sharded.update(extra)
    dist_checkpointing.save(sharded, str(ckpt), content_metadata={"singleton_local_shards": False})
    dist.barrier()
    if dist.get_rank() == 0:
        for fmt in ("legacy", "torch_dist"):
            (out / fmt / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    destroy_model_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
