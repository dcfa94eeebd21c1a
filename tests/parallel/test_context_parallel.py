"""Context parallelism's pieces in one process: the zigzag split of packed rows, and
attention of each rank's query chunks over the gathered keys under the CP mask equal to the
full rows' causal, per-sample attention (both ranks computed here, no process group)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_kaja.data.batch import build_attention_mask
from megatron_kaja.parallel.context_parallel import (
    gathered_positions,
    split_batch_for_context_parallel,
    zigzag_positions,
)

S, B, HEADS, D = 16, 2, 2, 4
# Row 0: samples [0, 3), [3, 10), [10, 16); row 1: [0, 5), [5, 16) (offset 16 in the
# flattened micro-batch). Every boundary but 0 and 16 falls inside a 4-token chunk of CP=2.
CU_SEQLENS = torch.tensor([0, 3, 10, 16, 21, 32], dtype=torch.int32)


def test_zigzag_positions_are_megatrons_load_balanced_chunks():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert zigzag_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    assert gathered_positions(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by 2 x 2"):
        zigzag_positions(10, 2, 0)


def test_split_keeps_each_ranks_chunks_and_the_full_rows_boundaries():
    batch = {
        "tokens": torch.arange(B * S).view(B, S),
        "labels": torch.arange(B * S).view(B, S) + 100,
        "loss_mask": torch.ones(B, S),
        "position_ids": torch.arange(S).repeat(B, 1),
        "cu_seqlens": CU_SEQLENS,
        "max_seqlen": torch.tensor(11),
    }
    parts = [split_batch_for_context_parallel(batch, 2, r) for r in range(2)]
    assert parts[0]["tokens"][1].tolist() == [16, 17, 18, 19, 28, 29, 30, 31]
    assert parts[1]["labels"][0].tolist() == [104, 105, 106, 107, 108, 109, 110, 111]
    assert parts[1]["position_ids"].shape == (B, S // 2)
    assert parts[0]["cu_seqlens"] is CU_SEQLENS and parts[1]["max_seqlen"] is batch["max_seqlen"]
    # The ranks' parts together are the rows, each token once.
    both = torch.cat([p["tokens"] for p in parts], dim=1).sort(dim=1).values
    assert torch.equal(both, batch["tokens"])


def _attend(q, k, v, mask):  # [b, heads, s, d]; mask True = masked out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_over_gathered_keys_equals_full_rows_attention(cp):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, S, D, generator=gen) for _ in range(3))
    full = _attend(q, k, v, build_attention_mask(CU_SEQLENS, B, S))
    keys = gathered_positions(S, cp)  # what the all-gather of the ranks' parts holds
    k_gathered, v_gathered = k[:, :, keys], v[:, :, keys]
    for rank in range(cp):
        mine = zigzag_positions(S, cp, rank)
        mask = build_attention_mask(CU_SEQLENS, B, S, query_positions=mine, key_positions=keys)
        assert mask.shape == (B, 1, S // cp, S)
        out = _attend(q[:, :, mine], k_gathered, v_gathered, mask)
        torch.testing.assert_close(out, full[:, :, mine], rtol=1e-6, atol=1e-6)
    # The mask must follow the gathered order: read in the row's order it attends elsewhere.
    wrong = build_attention_mask(CU_SEQLENS, B, S, query_positions=mine)
    out = _attend(q[:, :, mine], k_gathered, v_gathered, wrong)
    assert not torch.allclose(out, full[:, :, mine])


def test_default_mask_is_the_full_rows_per_sample_causal_mask():
    mask = build_attention_mask(CU_SEQLENS, B, S)[:, 0]
    allowed = ~mask
    assert allowed[0, 4, 3] and not allowed[0, 3, 2]  # same sample; across a boundary
    assert not allowed[0, 4, 5]  # the future
    assert allowed[1].sum() == 5 * 6 // 2 + 11 * 12 // 2
