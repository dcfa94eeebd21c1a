"""Context parallelism for packed rows: each row split over the CP ranks in megatron's
load-balanced layout, and the key / value gather that attention over a split row needs.

A row of s tokens is cut into 2 x CP equal chunks and CP rank r keeps chunks r and
2 x CP - 1 - r (the layout of Megatron-LM's `get_batch_on_this_cp_rank`): under a causal
mask an early chunk has few keys and a late one many, so every rank gets the same attention
work. megatron-core's `RotaryEmbedding` picks the same chunks of its table for non-THD input
(`get_pos_emb_on_this_cp_rank`), so RoPE needs nothing from us beyond the full row length.

A loss that is not a sum over tokens (DPO's, of per-answer log-prob sums) needs the CP
group's total of each rank's part first: `sum_over_context_parallel`. GRPO's per-token
weights depend on whole rows; it gathers every rank's per-token log-probs into the whole
rows instead (`whole_rows`), each rank backpropagating through its own part only.
"""

from __future__ import annotations

import torch

from megatron_kaja.data.batch import TOKEN_FIELDS


def zigzag_positions(
    seq_length: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The positions (in a row of `seq_length`) that CP rank `cp_rank` holds, in its order:
    chunk `cp_rank`, then chunk `2 * cp_size - 1 - cp_rank`, of `2 * cp_size` chunks."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"context parallelism: row length {seq_length} is not divisible by 2 x {cp_size}"
        )
    chunk = seq_length // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat(
        [
            torch.arange(first, first + chunk, device=device),
            torch.arange(second, second + chunk, device=device),
        ]
    )


def gathered_positions(
    seq_length: int, cp_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The positions of an all-gather over the CP group of every rank's part of a row: rank
    0's chunks, then rank 1's, ... (not the row's order; a mask over them says which is which)."""
    return torch.cat([zigzag_positions(seq_length, cp_size, r, device) for r in range(cp_size)])


def split_batch_for_context_parallel(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a micro-batch of packed rows: its zigzag chunks of the per-token
    tensors (`TOKEN_FIELDS`: tokens, labels, loss_mask, position_ids and, in preference
    batches, sequence_ids; each `[b, s]`). `cu_seqlens` and the other entries describe the
    full rows (or the micro-batch) and stay as they are: attention builds its mask over the
    full rows from them."""
    seq_length = batch["tokens"].shape[1]
    index = zigzag_positions(seq_length, cp_size, cp_rank, batch["tokens"].device)
    return {k: v.index_select(1, index) if k in TOKEN_FIELDS else v for k, v in batch.items()}


def sum_over_context_parallel(partial_sums: torch.Tensor, group) -> torch.Tensor:
    """The CP `group`'s total of each rank's `partial_sums` (e.g. an answer's log-prob summed
    over the rank's tokens), for a loss every CP rank then computes alike from the totals.

    Backward passes the total's gradient to the local part unchanged: each rank backpropagates
    the same loss through its own tokens only, so the ranks' parameter gradients, summed by
    DDP over DP x CP, hold every token's contribution once. (torch.distributed.nn's
    all_reduce sums the gradients in backward too, which would count them CP times.)
    megatron-core's tensor-parallel reduce is this function for any group; it returns the
    input itself (no collective) for a group of one."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    # (contiguous: megatron-core reduces in place a contiguous copy of what it is given)
    return reduce_from_tensor_model_parallel_region(partial_sums.contiguous(), group=group)


def gather_sequence(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather `[s_local, ...]` over the CP `group` along the first dimension, in rank
    order. Every rank's queries attend to the gathered keys and values, so the gradient of a
    rank's part is the sum of all ranks' gradients for it: the backward reduce-scatters
    (megatron-core's sequence-parallel gather with `tensor_parallel_output_grad=True`)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(
        tensor, tensor_parallel_output_grad=True, group=group
    )


def whole_rows(local: torch.Tensor, seq_length: int, group) -> torch.Tensor:
    """The whole rows `[b, seq_length]` of a per-token value of which this CP rank holds its
    zigzag part `local` `[b, seq_length / CP]`, the same on every rank of the CP `group`.

    Only the rank's own part carries a gradient: every CP rank computes the same loss from the
    whole rows and backpropagates it through its own tokens, so the ranks' parameter
    gradients, summed by DDP over DP x CP, hold every token's contribution once (as
    `sum_over_context_parallel`'s)."""
    import torch.distributed as dist

    cp, rank = group.size(), group.rank()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    whole = torch.empty(local.size(0), seq_length, dtype=local.dtype, device=local.device)
    order = gathered_positions(seq_length, cp, local.device)
    whole = whole.index_copy(1, order, torch.cat(parts, dim=1))
    return whole.index_copy(1, zigzag_positions(seq_length, cp, rank, local.device), local)
