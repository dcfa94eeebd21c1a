"""Deterministic weighted mixing of several tokenized sources into one sample list.

Weights are shares of the mixed set, in samples (Megatron's blended-dataset convention):
with N samples in total (by default the sum of the sources' sizes), source i contributes
round(N * w_i / sum(w)) samples - every sample of it once per full pass, then a random subset
without replacement for the remainder. A source with a large weight is thus up-sampled,
one with a small weight down-sampled, and a single source is used exactly once.
"""

from __future__ import annotations

import numpy as np


def mixture_counts(sizes: list[int], weights: list[float], num_samples: int) -> np.ndarray:
    """Samples drawn from each source: shares of `num_samples`, rounded by largest remainder."""
    weights_arr = np.asarray(weights, dtype=np.float64)
    if len(sizes) != len(weights_arr) or (weights_arr <= 0).any():
        raise ValueError(f"need one positive weight per source, got {weights} for {sizes}")
    exact = num_samples * weights_arr / weights_arr.sum()
    counts = np.floor(exact).astype(np.int64)
    # Largest-remainder rounding: the total is exactly num_samples, ties go to earlier sources.
    remainder = num_samples - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def mix_samples(
    sizes: list[int], weights: list[float], seed: int, num_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Choose the mixed set: returns `(source_ids, sample_ids)`, both int64, same length.

    Deterministic for `seed`; order is by source (the packer and sampler reorder anyway).
    """
    total = int(sum(sizes)) if num_samples is None else num_samples
    counts = mixture_counts(sizes, weights, total)
    source_ids, sample_ids = [], []
    for source, (size, count) in enumerate(zip(sizes, counts.tolist(), strict=True)):
        rng = np.random.default_rng([seed, source])
        full_passes, rest = divmod(count, size)
        chosen = np.concatenate(
            [
                np.tile(np.arange(size, dtype=np.int64), full_passes),
                np.sort(rng.permutation(size)[:rest]),
            ]
        )
        sample_ids.append(chosen)
        source_ids.append(np.full(len(chosen), source, dtype=np.int64))
    return np.concatenate(source_ids), np.concatenate(sample_ids)
