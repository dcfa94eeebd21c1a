"""The packed-row sampler: deterministic, resumable, and DP=2 sees DP=1's global batches."""

from __future__ import annotations

import itertools

import pytest

from megatron_kaja.data import PackedRowSampler


def take(sampler: PackedRowSampler, micro_batches: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), micro_batches))


def test_deterministic_and_covers_each_epoch():
    a = PackedRowSampler(50, micro_batch_size=2, global_batch_size=8, seed=3)
    b = PackedRowSampler(50, micro_batch_size=2, global_batch_size=8, seed=3)
    assert a.global_batches_per_epoch == 6
    first, second = take(a, 4 * 12), take(b, 4 * 12)
    assert first == second
    epoch0 = [r for mb in first[:24] for r in mb]
    epoch1 = [r for mb in first[24:] for r in mb]
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48  # 2 rows left over each epoch
    assert epoch0 != epoch1  # a new permutation per epoch
    assert a.epoch == 2 and a.consumed_rows == 96
    other = PackedRowSampler(50, micro_batch_size=2, global_batch_size=8, seed=4)
    assert take(other, 4) != first[:4]


def test_resume_mid_epoch_continues_exactly():
    uninterrupted = PackedRowSampler(40, micro_batch_size=1, global_batch_size=4, seed=0)
    expected = take(uninterrupted, 4 * 15)
    run = PackedRowSampler(40, micro_batch_size=1, global_batch_size=4, seed=0)
    before = take(run, 4 * 7)  # 7 steps, mid-epoch (10 global batches per epoch)
    state = run.state_dict()
    assert state["consumed_rows"] == 28
    resumed = PackedRowSampler(40, micro_batch_size=1, global_batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert before + take(resumed, 4 * 8) == expected


@pytest.mark.parametrize("dp", [2, 4])
def test_data_parallel_ranks_split_each_global_batch(dp):
    single = PackedRowSampler(64, micro_batch_size=2, global_batch_size=16, seed=1)
    ranks = [
        PackedRowSampler(64, 2, 16, data_parallel_rank=r, data_parallel_size=dp, seed=1)
        for r in range(dp)
    ]
    steps = 6  # crosses an epoch boundary (4 global batches per epoch)
    reference = take(single, 8 * steps)
    per_rank = [take(sampler, 8 // dp * steps) for sampler in ranks]
    for step in range(steps):
        global_batch = reference[step * 8 : (step + 1) * 8]
        union = []
        for rank_batches in per_rank:
            union += rank_batches[step * 8 // dp : (step + 1) * 8 // dp]
        assert union == global_batch  # same rows, same micro-batch order
    assert {s.consumed_rows for s in ranks} == {single.consumed_rows}


def test_bad_settings_and_foreign_state():
    with pytest.raises(ValueError, match="multiple of --micro-batch-size 4"):
        PackedRowSampler(100, micro_batch_size=4, global_batch_size=10)
    with pytest.raises(ValueError, match="multiple of"):
        PackedRowSampler(100, 2, 8, data_parallel_rank=0, data_parallel_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedRowSampler(7, 1, 8)
    sampler = PackedRowSampler(30, 1, 4, seed=0)
    with pytest.raises(ValueError, match="num_rows=31"):
        sampler.load_state_dict({"consumed_rows": 4, "seed": 0, "num_rows": 31})
    with pytest.raises(ValueError, match="global-batch boundary"):
        sampler.load_state_dict({"consumed_rows": 5})
