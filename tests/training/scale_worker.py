"""torchrun worker (4 processes): each scale setting against the run it must equal.

Every run starts from the same weights whatever its layout (each global tensor is drawn
from a generator seeded by its checkpoint key), trains on the same global batches and
reports its losses and the full (all shards gathered) updated weights. Rank 0 prints one
line `RESULT {json}` with the largest differences; the test asserts on them.
"""

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.parallel.distributed import destroy_model_parallel, initialize_model_parallel
from megatron_kaja.training import checkpointing
from megatron_kaja.training.setup import build_training_stack
from megatron_kaja.training.sft import run_global_batch

ARCH = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=128,
    head_dim=16,
)
SEQ, MICRO, GLOBAL, STEPS = 16, 2, 8, 2
PADDED_VOCAB = 256


def global_rows(step: int) -> list[dict]:
    """The step's global batch: rows of two packed samples each, the same for every layout."""
    rng = np.random.default_rng(100 + step)
    rows = []
    for _ in range(GLOBAL):
        cut = int(rng.integers(4, SEQ - 4))
        rows.append(
            {
                "tokens": rng.integers(0, ARCH.vocab_size, SEQ),
                "labels": rng.integers(0, ARCH.vocab_size, SEQ),
                "loss_mask": (rng.random(SEQ) < 0.7).astype(np.float32),
                "position_ids": np.concatenate([np.arange(cut), np.arange(SEQ - cut)]),
                "cu_seqlens": np.array([0, cut, SEQ]),
            }
        )
    return rows


def micro_batches(step: int) -> list[dict]:
    from megatron_kaja.data import collate_packed_rows

    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    mine = global_rows(step)[dp_rank::dp]
    return [collate_packed_rows(mine[i : i + MICRO]) for i in range(0, len(mine), MICRO)]


def _model_tensors(stack):
    """This rank's ShardedTensors of the model (views of its parameters): SwiGLU's fc1
    factory is built into its two halves, which reshard independently."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for chunk in stack.model_chunks:
        for sh in nested_values(chunk.sharded_state_dict()):
            if isinstance(sh, ShardedTensorFactory):
                yield from nested_values(sh.build())
            elif isinstance(sh, ShardedTensor):
                yield sh


def _local_shape(sh) -> tuple:
    """This shard's shape in the global tensor (layer axes prepended by the block count 1)."""
    return (1,) * sh.prepend_axis_num + tuple(sh.local_shape)


def _local_slice(sh):
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset, _local_shape(sh), strict=True))


@torch.no_grad()
def set_reference_weights(stack) -> None:
    """The same global weights in any layout: each global tensor drawn from a generator
    seeded by its key (norm weights around 1), this rank's slice copied in."""
    for sh in _model_tensors(stack):
        gen = torch.Generator().manual_seed(zlib.crc32(sh.key.encode()))
        full = torch.randn(sh.global_shape, generator=gen) * 0.05
        if "norm" in sh.key:
            full += 1.0
        sh.data.copy_(full[_local_slice(sh)].reshape(sh.data.shape))
    stack.optimizer.reload_model_params()


@torch.no_grad()
def full_weights(stack) -> dict[str, torch.Tensor]:
    """Every global tensor of the model, assembled from all ranks' shards."""
    stack.sync_params()
    mine = {}
    for sh in _model_tensors(stack):
        full = mine.setdefault(sh.key, torch.zeros(sh.global_shape))
        replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
        if all(r == 0 for r in replica):
            full[_local_slice(sh)] = sh.data.float().reshape(_local_shape(sh))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    total: dict[str, torch.Tensor] = {}
    for part in gathered:
        for key, tensor in part.items():
            total[key] = total[key] + tensor if key in total else tensor
    return total


def run(
    layout: dict,
    *,
    save: Path | None = None,
    load: Path | None = None,
    steps=STEPS,
    batches=micro_batches,
    seq_length=SEQ,
):
    """Train `steps` steps (from step 0, or resumed from `load`) in `layout` on the global
    batches `batches(step)` of rows of `seq_length`."""
    layout = dict(layout)
    tp, pp, cp = layout.pop("tp", 1), layout.pop("pp", 1), layout.pop("cp", 1)
    vpp = layout.pop("vpp", None)
    sharding = layout.pop("fully_reshardable", False)
    initialize_model_parallel(
        tp, pp, seed=1234, virtual_pipeline_parallel_size=vpp, context_parallel_size=cp
    )
    stack = build_training_stack(
        ARCH,
        lr=1e-3,
        min_lr=1e-3,
        train_iters=10,
        lr_decay_style="constant",
        padded_vocab_size=PADDED_VOCAB,  # one shape at every TP, as a loaded checkpoint's
        **layout,
    )
    set_reference_weights(stack)
    if layout.get("sequence_parallel"):  # on, and every norm weight marked for the TP sum
        for chunk in stack.model_chunks:
            assert chunk.config.sequence_parallel
            norms = [p for n, p in chunk.named_parameters() if "norm" in n]
            assert norms and all(p.sequence_parallel for p in norms)
    start = 0
    if load is not None:
        start = checkpointing.load_checkpoint(load, stack, "sft")["iteration"]
    losses = []
    for step in range(start, steps):
        stack.zero_grad_buffers()
        stack.optimizer.zero_grad()
        loss_sum, tokens = run_global_batch(
            stack, batches(step), seq_length, False, ARCH.vocab_size
        )
        stack.optimizer.step()
        stack.scheduler.step(increment=1)
        losses.append(loss_sum / tokens)
        if save is not None and step + 1 == 1:
            checkpointing.save_checkpoint(
                save,
                1,
                stack,
                arch=ARCH,
                sampler_state={},
                config={},
                optimizer_fully_reshardable=sharding,
            )
    weights = full_weights(stack)
    parallel_state.destroy_model_parallel()
    return losses, weights


def compare(a, b) -> dict:
    """Largest loss and weight differences; a resumed run `b` is compared on its steps."""
    (losses_a, weights_a), (losses_b, weights_b) = a, b
    losses_a = losses_a[len(losses_a) - len(losses_b) :]
    assert weights_a.keys() == weights_b.keys(), sorted(weights_a.keys() ^ weights_b.keys())
    diffs = {k: (weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a}
    worst = max(diffs, key=diffs.get)
    return {
        "loss": max(abs(x - y) for x, y in zip(losses_a, losses_b, strict=True)),
        "weights": diffs[worst],
        "worst": worst,
        "steps": len(losses_a),
    }


def changed(before, after) -> float:
    return max((before[1][k] - after[1][k]).abs().max().item() for k in before[1])


def main(tmp: str) -> None:
    tmp = Path(tmp)
    results = {}
    dist_opt = {"tp": 2, "use_distributed_optimizer": True}
    # Sequence parallelism: TP=2 x PP=2; TP=2 x DP=2 with the distributed optimizer.
    tp_pp = run({"tp": 2, "pp": 2})
    tp_pp_sp = run({"tp": 2, "pp": 2, "sequence_parallel": True}, save=tmp / "tp2pp2sp")
    results["sp_tp2_pp2"] = compare(tp_pp, tp_pp_sp)
    tp_dp = run(dist_opt)
    # Saved in the distributed optimizer's fully reshardable format, resumed below.
    sp_fully = {**dist_opt, "sequence_parallel": True, "fully_reshardable": True}
    tp_dp_sp = run(sp_fully, save=tmp / "distopt_sp")
    results["sp_tp2_dp2_distopt"] = compare(tp_dp, tp_dp_sp)
    # Overlapped communication, in buckets of 2000 elements (several per chunk).
    overlapped = {
        **dist_opt,
        "sequence_parallel": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "ddp_bucket_size": 2000,
    }
    results["overlap_tp2_dp2_distopt"] = compare(tp_dp_sp, run(overlapped))
    # Interleaved pipeline: PP=2 x 2 virtual stages x DP=2 against PP=1 x DP=4.
    pp1 = run({})
    vpp = run({"pp": 2, "vpp": 2})
    results["vpp_pp2x2_vs_pp1"] = compare(pp1, vpp)
    results["vpp_pp2x2_vs_pp2"] = compare(run({"pp": 2}), vpp)
    # More micro-batches than stages (DP=1: 4 per step), with TP=2 and SP: the interleaved
    # schedule's steady state, where sends to the next and previous stage meet.
    tp_vpp_sp = run({"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True})
    results["vpp_tp2_pp2x2_sp_4_micro_vs_pp1"] = compare(pp1, tp_vpp_sp)
    # Each recompute setting against none (TP=2 x DP=2 with the distributed optimizer).
    for name, setting in {
        "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform"},
        "full_block": {"recompute_granularity": "full", "recompute_method": "block"},
        "full_block_1": {
            "recompute_granularity": "full",
            "recompute_method": "block",
            "recompute_num_layers": 1,
        },
        "selective": {"recompute_granularity": "selective"},
    }.items():
        results[f"recompute_{name}"] = compare(tp_dp, run({**dist_opt, **setting}))
    # Resume in another layout: TP=2 x PP=2 with SP -> TP=1 x PP=2 x 2 virtual stages; the
    # distributed optimizer's TP=2 x DP=2 with SP -> PP=2 x 2 virtual stages x DP=2 with
    # overlapped communication (its fully reshardable state; megatron-core reshards the
    # default dp_reshardable one over DP only).
    results["resume_tp2pp2sp_to_tp1pp2vpp2"] = compare(
        tp_pp_sp, run({"pp": 2, "vpp": 2}, load=tmp / "tp2pp2sp")
    )
    to_vpp_overlapped = {
        "pp": 2,
        "vpp": 2,
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
    }
    results["resume_distopt_sp_to_pp2vpp2_overlap"] = compare(
        tp_dp_sp, run(to_vpp_overlapped, load=tmp / "distopt_sp")
    )
    results["training_moved_weights"] = changed(run({}, steps=0), pp1)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])  # a folder every rank sees (the checkpoints of the resume cases)
