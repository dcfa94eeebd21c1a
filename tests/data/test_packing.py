"""Best-fit-decreasing packing: exact BFD semantics, utilization, over-long policy."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_kaja.data import fit_to_seq_length, pack_sequences


def reference_best_fit_decreasing(lengths: np.ndarray, seq_length: int) -> list[int]:
    """Textbook O(n * rows) BFD, returning the row load of each row opened."""
    loads: list[int] = []
    for length in sorted(lengths.tolist(), reverse=True):
        fitting = [r for r, load in enumerate(loads) if load + length <= seq_length]
        if fitting:
            loads[max(fitting, key=lambda r: loads[r])] += length
        else:
            loads.append(length)
    return loads


def first_fit_in_order(lengths: np.ndarray, seq_length: int) -> int:
    """Rows used by first fit in data order, no sorting (a common naive packer)."""
    loads: list[int] = []
    for length in lengths.tolist():
        for r, load in enumerate(loads):
            if load + length <= seq_length:
                loads[r] += length
                break
        else:
            loads.append(length)
    return len(loads)


def skewed_lengths(n: int, seq_length: int, seed: int = 0) -> np.ndarray:
    """Chat-like: many short samples, a long tail of long ones."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(seq_length / 8), 0.9, n).astype(np.int64), 1, seq_length)


def test_every_sample_packed_once_and_rows_fit():
    lengths = skewed_lengths(3000, 512)
    plan = pack_sequences(lengths, 512)
    assert sorted(plan.sample_index.tolist()) == list(range(len(lengths)))
    loads = np.add.reduceat(lengths[plan.sample_index], plan.row_offsets[:-1])
    assert loads.max() <= 512 and loads.min() > 0
    assert plan.row_offsets[-1] == len(lengths)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_textbook_best_fit_decreasing(seed):
    lengths = skewed_lengths(600, 256, seed)
    plan = pack_sequences(lengths, 256)
    loads = np.add.reduceat(lengths[plan.sample_index], plan.row_offsets[:-1])
    assert sorted(loads.tolist()) == sorted(reference_best_fit_decreasing(lengths, 256))


def test_bfd_beats_first_fit_in_order_on_skewed_data():
    lengths = skewed_lengths(2000, 512, seed=3)
    plan = pack_sequences(lengths, 512)
    lower_bound = -(-int(lengths.sum()) // 512)
    assert plan.num_rows < first_fit_in_order(lengths, 512)
    assert plan.num_rows <= lower_bound * 1.01 + 1
    assert plan.utilization(lengths) > 0.98


def test_deterministic():
    lengths = skewed_lengths(1000, 128, seed=4)
    a, b = pack_sequences(lengths, 128), pack_sequences(lengths.copy(), 128)
    assert np.array_equal(a.sample_index, b.sample_index)
    assert np.array_equal(a.row_offsets, b.row_offsets)


def test_rejects_lengths_out_of_range():
    with pytest.raises(ValueError, match="fit_to_seq_length"):
        pack_sequences(np.array([3, 9]), 8)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        pack_sequences(np.array([0, 3]), 8)


def test_overlong_truncate_and_drop_are_counted():
    lengths = np.array([5, 12, 8, 30])
    truncated = fit_to_seq_length(lengths, 8, "truncate")
    assert truncated.kept.tolist() == [0, 1, 2, 3]
    assert truncated.lengths.tolist() == [5, 8, 8, 8]
    assert (truncated.truncated, truncated.dropped) == (2, 0)
    dropped = fit_to_seq_length(lengths, 8, "drop")
    assert dropped.kept.tolist() == [0, 2]
    assert (dropped.truncated, dropped.dropped) == (0, 2)
    with pytest.raises(ValueError, match="truncate' or 'drop"):
        fit_to_seq_length(lengths, 8, "split")
