"""Micro-batches of packed rows as torch tensors, and the attention masks they need.

Two ways to keep samples of one row from attending to each other:
- local / SDPA spec: `build_attention_mask` makes megatron-core's `[b, 1, s, s]` bool mask
  (True = masked out): causal within a sample, nothing across samples;
- transformer-engine THD: `cu_seqlens` / `max_seqlen` from `collate_packed_rows` are the
  `PackedSeqParams(qkv_format="thd", cu_seqlens_q=..., cu_seqlens_kv=..., ...)` of the
  micro-batch flattened to one sequence of b*s tokens.
"""

from __future__ import annotations

import numpy as np
import torch

ROW_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
# Every per-token tensor (`[b, s]`) a micro-batch may carry: a packed row's fields, and in
# preference batches the answer each position belongs to (`preference/data.py`). What feeds
# a model in another token layout (THD, a context-parallel rank's chunks) lays out all of them.
TOKEN_FIELDS = (*ROW_FIELDS, "sequence_ids")


def collate_packed_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows into a micro-batch.

    Returns tokens / labels / position_ids (int64 [b, s]), loss_mask (float32 [b, s]),
    cu_seqlens (int32 [segments + 1]: boundaries in the flattened b*s tokens, row r's
    offset r*s) and max_seqlen (int32 scalar: the longest segment).
    """
    batch = {name: torch.from_numpy(np.stack([row[name] for row in rows])) for name in ROW_FIELDS}
    seq_length = batch["tokens"].shape[1]
    cu = [np.zeros(1, dtype=np.int64)]
    for r, row in enumerate(rows):
        cu.append(np.asarray(row["cu_seqlens"][1:], dtype=np.int64) + r * seq_length)
    cu_seqlens = torch.from_numpy(np.concatenate(cu).astype(np.int32))
    batch["cu_seqlens"] = cu_seqlens
    batch["max_seqlen"] = (cu_seqlens[1:] - cu_seqlens[:-1]).max().to(torch.int32)
    return batch


def build_attention_mask(
    cu_seqlens: torch.Tensor,
    batch_size: int,
    seq_length: int,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Megatron-core's bool attention mask from a micro-batch's `cu_seqlens`: True where a
    query must NOT attend a key, i.e. the key comes later in the row or is in another sample.

    By default every position of the rows is a query and a key (`[b, 1, s, s]`). Context
    parallelism gives the positions (in the full rows of `seq_length`) of the queries a rank
    holds and of the keys in the order it gathered them: `[b, 1, len(query), len(key)]`.
    """
    device = cu_seqlens.device
    positions = torch.arange(batch_size * seq_length, device=device)
    segment = torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True)
    segment = segment.view(batch_size, seq_length)
    every = torch.arange(seq_length, device=device)
    q = every if query_positions is None else query_positions
    k = every if key_positions is None else key_positions
    same_sample = segment[:, q, None] == segment[:, None, k]
    causal = k[None, :] <= q[:, None]
    return (~(same_sample & causal)).unsqueeze(1)
