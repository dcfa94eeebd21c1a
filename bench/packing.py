"""Packing benchmark: our best-fit-decreasing packer vs TRL's, on chat-shaped lengths.

    python bench/packing.py [--num-samples 50000] [--seq-length 4096] [--repeats 3]

Prints, for each packer: rows, token utilization (1 - padding fraction of rows x seq_length)
and throughput (samples/s, best of --repeats). Samples are synthetic token-id lists with a
log-normal length spread like chat SFT data (median ~350 tokens, a long tail cut at
seq_length). TRL's `pack_dataset(..., strategy="bfd")` runs BFD inside each `datasets.map`
batch (1000 samples by default); it is also run with one batch holding the whole set.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron_kaja.data.cache import TokenizedSamples
from megatron_kaja.data.dataset import PackedSFTDataset, PackingStats
from megatron_kaja.data.packing import pack_sequences


def chat_like_lengths(num_samples: int, seq_length: int, seed: int = 0) -> np.ndarray:
    """Tokens per sample: log-normal (median 350, sigma 0.85), within [16, seq_length]."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=np.log(350), sigma=0.85, size=num_samples)
    return np.clip(lengths.astype(np.int64), 16, seq_length)


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_ours(lengths: np.ndarray, seq_length: int, repeats: int):
    """Plan only, and plan + materializing every row as the trainer reads it."""
    plan_time, plan = best_of(repeats, lambda: pack_sequences(lengths, seq_length))
    # A store holding n+1 tokens per sample: a sample fills n row positions (inputs/labels).
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=offsets[1:])
    rng = np.random.default_rng(1)
    tokens = rng.integers(8, 99_000, int(offsets[-1]), dtype=np.int32)
    store = TokenizedSamples(tokens, np.ones_like(tokens, dtype=np.uint8), offsets)
    sample_ids = np.arange(len(lengths), dtype=np.int64)

    def plan_and_rows():
        p = pack_sequences(lengths, seq_length)
        stats = PackingStats(len(lengths), p.num_rows, int(lengths.sum()), 0.0, 0, 0)
        dataset = PackedSFTDataset(
            [store], np.zeros_like(sample_ids), sample_ids, lengths, p, 4, stats
        )
        return sum(int(dataset[r]["loss_mask"].sum()) for r in range(len(dataset)))

    rows_time, learned = best_of(repeats, plan_and_rows)
    assert learned == lengths.sum(), "rows lost tokens"
    return plan.num_rows, plan.utilization(lengths), plan_time, rows_time


def bench_trl(lengths: np.ndarray, seq_length: int, repeats: int, batch_size: int | None):
    import datasets
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    rng = np.random.default_rng(1)
    ids = [rng.integers(8, 99_000, int(n)).tolist() for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": ids})
    map_kwargs = {"batch_size": batch_size} if batch_size else {}
    elapsed, packed = best_of(
        repeats, lambda: pack_dataset(dataset, seq_length, strategy="bfd", map_kwargs=map_kwargs)
    )
    row_tokens = np.asarray([len(r) for r in packed.with_format("arrow")["input_ids"].to_pylist()])
    assert row_tokens.sum() == lengths.sum() and row_tokens.max() <= seq_length
    return len(packed), row_tokens.sum() / (len(packed) * seq_length), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, s = args.num_samples, args.seq_length
    lengths = chat_like_lengths(n, s)
    lower_bound = -(-int(lengths.sum()) // s)
    print(
        f"{n} samples, {int(lengths.sum())} tokens, median {int(np.median(lengths))}, "
        f"p99 {int(np.percentile(lengths, 99))}, seq_length {s}, rows >= {lower_bound}"
    )
    print(f"{'packer':<44} {'rows':>6} {'util':>8} {'seconds':>8} {'samples/s':>11}")

    def line(name, rows, util, seconds):
        print(f"{name:<44} {rows:>6} {util:>8.4%} {seconds:>8.3f} {n / seconds:>11,.0f}")

    rows, util, plan_time, rows_time = bench_ours(lengths, s, args.repeats)
    line("megatron_kaja pack_sequences (plan)", rows, util, plan_time)
    line("megatron_kaja plan + materialize all rows", rows, util, rows_time)
    try:
        import trl
    except ImportError:
        print("trl is not installed (pip install trl): TRL comparison skipped")
        return
    for name, batch_size in (
        (f"trl {trl.__version__} bfd (map batch 1000)", None),
        (f"trl {trl.__version__} bfd (one batch)", n),
    ):
        line(name, *bench_trl(lengths, s, args.repeats, batch_size))


if __name__ == "__main__":
    main()
