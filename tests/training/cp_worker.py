"""torchrun worker (4 processes): context parallelism on the sdpa backend against the same
run without it, in losses and updated weights (scale_worker.py's runs and comparisons).

Rows of 32 tokens hold three packed samples whose boundaries fall inside the 8-token chunks
CP=2 cuts them into, so attention must follow the samples across the ranks' chunks. Rank 0
prints one line `RESULT {json}`; the test asserts on it.
"""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kaja.data import collate_packed_rows
from megatron_kaja.parallel.distributed import destroy_model_parallel
from tests.training.scale_worker import ARCH, GLOBAL, MICRO, compare, run

SEQ = 32
SDPA = {"transformer_impl": "sdpa"}


def global_rows(step: int) -> list[dict]:
    """The step's global batch: rows of three packed samples, the same for every layout."""
    rng = np.random.default_rng(200 + step)
    rows = []
    for _ in range(GLOBAL):
        cuts = sorted(rng.choice([c for c in range(3, SEQ - 3) if c % 8], 2, replace=False))
        bounds = [0, *cuts, SEQ]
        rows.append(
            {
                "tokens": rng.integers(0, ARCH.vocab_size, SEQ),
                "labels": rng.integers(0, ARCH.vocab_size, SEQ),
                "loss_mask": (rng.random(SEQ) < 0.7).astype(np.float32),
                "position_ids": np.concatenate(
                    [np.arange(b - a) for a, b in itertools.pairwise(bounds)]
                ),
                "cu_seqlens": np.array(bounds),
            }
        )
    return rows


def micro_batches(step: int) -> list[dict]:
    """This data-parallel rank's micro-batches: the CP ranks of one DP rank read the same rows
    (megatron's DP rank without CP, what the trainers' sampler takes)."""
    dp = parallel_state.get_data_parallel_world_size()
    mine = global_rows(step)[parallel_state.get_data_parallel_rank() :: dp]
    return [collate_packed_rows(mine[i : i + MICRO]) for i in range(0, len(mine), MICRO)]


def cp_run(layout: dict, **kwargs):
    return run({**SDPA, **layout}, batches=micro_batches, seq_length=SEQ, **kwargs)


def main(tmp: str) -> None:
    tmp = Path(tmp)
    results = {}
    # CP=2 x DP=2 against DP=4, both with the distributed optimizer (sharded over DP x CP),
    # saved after step 1 for the resume below.
    dist_opt = {"use_distributed_optimizer": True}
    dp4 = cp_run(dist_opt)
    cp2 = cp_run({**dist_opt, "cp": 2}, save=tmp / "cp2")
    results["cp2_dp2_vs_dp4"] = compare(dp4, cp2)
    # CP=2 x TP=2 with sequence parallelism against TP=2 (x DP=2).
    results["cp2_tp2_sp_vs_tp2"] = compare(
        cp_run({"tp": 2}), cp_run({"tp": 2, "cp": 2, "sequence_parallel": True})
    )
    # CP=2 x PP=2 against PP=2 (x DP=2): the stages pass [s / CP, b, h] activations.
    results["cp2_pp2_vs_pp2"] = compare(cp_run({"pp": 2}), cp_run({"pp": 2, "cp": 2}))
    # The CP=2 checkpoint resumes at CP=1 (DP=4): the same second step.
    results["resume_cp2_to_cp1"] = compare(cp2, cp_run(dist_opt, load=tmp / "cp2"))
    results["training_moved_weights"] = max(
        (cp_run({}, steps=0)[1][k] - dp4[1][k]).abs().max().item() for k in dp4[1]
    )
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])  # a folder every rank sees (the checkpoint of the resume case)
