"""A deterministic, resumable, data-parallel-aware sampler over packed rows.

For epoch e the row order is a permutation drawn from ``default_rng([seed, e])``. Global
batch j of an epoch is the slice ``[j*G, (j+1)*G)`` of that order; data-parallel rank r
takes the r-th contiguous 1/DP of it and walks it in micro-batches. So the union of what DP
ranks see in a step is exactly the global batch DP=1 sees, in the same micro-batch order.
An incomplete last global batch of an epoch is skipped (as Megatron does).

The state is one number, the rows consumed by all ranks (a multiple of G at step
boundaries): ``state_dict()`` after a step, ``load_state_dict()`` before iterating.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PackedRowSampler:
    """Yields lists of row indices, one micro-batch of this DP rank at a time, forever.

    Use it as a `torch.utils.data.DataLoader` `batch_sampler` (with ``num_workers=0``, or
    checkpoint ``{"consumed_rows": step * global_batch_size}`` yourself, since worker
    prefetching runs the sampler ahead of training).
    """

    def __init__(
        self,
        num_rows: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        seed: int = 0,
    ):
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise ValueError(
                f"--global-batch-size {global_batch_size} must be a multiple of "
                f"--micro-batch-size {micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})"
            )
        if num_rows < global_batch_size:
            raise ValueError(
                f"the data packs into {num_rows} rows, fewer than one global batch "
                f"({global_batch_size}); lower --global-batch-size or add data"
            )
        self.num_rows = num_rows
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.consumed_rows = 0

    @property
    def global_batches_per_epoch(self) -> int:
        """Full global batches in one pass over the rows (the remainder is skipped)."""
        return self.num_rows // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next global batch belongs to."""
        return self.consumed_rows // (self.global_batches_per_epoch * self.global_batch_size)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The row order of `epoch` (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def global_batch(self, index: int) -> np.ndarray:
        """Rows of global batch `index` (counted from the start of training, across epochs)."""
        epoch, j = divmod(index, self.global_batches_per_epoch)
        return self.epoch_permutation(epoch)[
            j * self.global_batch_size : (j + 1) * self.global_batch_size
        ]

    def __iter__(self) -> Iterator[list[int]]:
        local = self.global_batch_size // self.data_parallel_size
        while True:
            # Re-read the position at every global batch, so load_state_dict between
            # steps takes effect even on a live iterator.
            batch = self.global_batch(self.consumed_rows // self.global_batch_size)
            mine = batch[self.data_parallel_rank * local : (self.data_parallel_rank + 1) * local]
            starts = range(0, local, self.micro_batch_size)
            for k in starts:
                if k == starts[-1]:
                    self.consumed_rows += self.global_batch_size
                yield mine[k : k + self.micro_batch_size].tolist()

    def state_dict(self) -> dict:
        """Position of the sampler, plus what must match when it is loaded."""
        return {
            "consumed_rows": self.consumed_rows,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; refuses a state from different data or settings."""
        for key in ("seed", "num_rows", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}: "
                    "resume with the same data, seed and batch sizes"
                )
        if state["consumed_rows"] % self.global_batch_size:
            raise ValueError(
                f"consumed_rows {state['consumed_rows']} is not at a global-batch boundary"
            )
        self.consumed_rows = int(state["consumed_rows"])
