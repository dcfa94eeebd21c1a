"""Best-fit-decreasing packing of variable-length samples into fixed-length rows.

Samples are placed longest first, each into the open row whose remaining space is the
smallest that still fits it (best fit), opening a new row only when none fits. BFD uses at
most 11/9 OPT + 6/9 rows (Dosa 2007) and, on chat-length data, leaves well under 1% padding;
"Fewer Truncations Improve Language Modeling" (Ding et al. 2024) uses it for the same reason.

Speed: remaining capacities are integers in [1, seq_length], so open rows are kept in
buckets by capacity, with a sorted list of the non-empty capacities; a best-fit query is
one `bisect` over at most `seq_length` ints, and updates are C-level list inserts. This is
faster in CPython than a segment tree walked in Python.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np

OverlongPolicy = Literal["truncate", "drop"]


@dataclass(frozen=True)
class PackingPlan:
    """Row r holds the samples `sample_index[row_offsets[r]:row_offsets[r + 1]]`."""

    sample_index: np.ndarray  # int64 [num_packed_samples], indices into the `lengths` given
    row_offsets: np.ndarray  # int64 [num_rows + 1]
    seq_length: int

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row_samples(self, row: int) -> np.ndarray:
        """Indices of the samples packed into `row`, in their order inside the row."""
        return self.sample_index[self.row_offsets[row] : self.row_offsets[row + 1]]

    def utilization(self, lengths: np.ndarray) -> float:
        """Fraction of row positions that hold sample tokens (1 - padding fraction)."""
        used = int(np.asarray(lengths, dtype=np.int64)[self.sample_index].sum())
        return used / max(1, self.num_rows * self.seq_length)


def pack_sequences(lengths: np.ndarray, seq_length: int) -> PackingPlan:
    """Pack samples of the given lengths (each in [1, seq_length]) into rows, best fit decreasing.

    Deterministic: ties keep input order (stable sort) and bins of equal space are reused
    last-opened first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > seq_length):
        raise ValueError(
            f"sample lengths must lie in [1, {seq_length}] (got {lengths.min()}..{lengths.max()}); "
            "truncate or drop over-long samples first (fit_to_seq_length)"
        )
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    open_capacities: list[int] = []  # sorted, distinct remaining capacities of open rows
    rows_by_capacity: dict[int, list[int]] = {}
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        at = bisect_left(open_capacities, length)
        if at == len(open_capacities):
            row = len(rows)
            rows.append([index])
            capacity = seq_length - length
        else:
            capacity = open_capacities[at]
            bucket = rows_by_capacity[capacity]
            row = bucket.pop()
            if not bucket:
                del open_capacities[at]
                del rows_by_capacity[capacity]
            rows[row].append(index)
            capacity -= length
        if capacity:
            bucket = rows_by_capacity.get(capacity)
            if bucket is None:
                rows_by_capacity[capacity] = [row]
                insort(open_capacities, capacity)
            else:
                bucket.append(row)
    sample_index = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=len(lengths))
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    return PackingPlan(sample_index, row_offsets, seq_length)


@dataclass(frozen=True)
class OverlongResult:
    """Which samples survive the seq-length limit, and their lengths after truncation."""

    kept: np.ndarray  # int64 indices into the input
    lengths: np.ndarray  # int64, lengths of the kept samples, each <= seq_length
    original_lengths: np.ndarray  # int64, lengths of the kept samples before truncation
    truncated: int
    dropped: int


def fit_to_seq_length(
    lengths: np.ndarray, seq_length: int, overlong: OverlongPolicy
) -> OverlongResult:
    """Apply the over-long policy: `truncate` cuts samples to `seq_length`, `drop` drops them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = lengths > seq_length
    if overlong == "truncate":
        kept = np.arange(len(lengths), dtype=np.int64)
        truncated = np.minimum(lengths, seq_length)
        return OverlongResult(kept, truncated, lengths, int(too_long.sum()), 0)
    if overlong == "drop":
        kept = np.flatnonzero(~too_long).astype(np.int64)
        return OverlongResult(kept, lengths[kept], lengths[kept], 0, int(too_long.sum()))
    raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
