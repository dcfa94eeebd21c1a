#!/usr/bin/env python
"""The cost of strict devices: one training step of a tiny GPTModel under the plain CPU
bridge and under strict devices, alternated in one process (so machine load hits both alike).

    python bench/strict_devices.py            # prints the median step times and the ratio

The model is the test suite's size (hidden 64, 2 layers, seq 64, micro batch 4): per-op
overhead weighs most on small tensors, so this is the suite's worst case.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.parallel import cpu_bridge

ARCH = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=176,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=509,
    max_position_embeddings=128,
)


def step_seconds(strict: bool, repeats: int) -> list[float]:
    """Forward + backward + SGD update times with the bridge in the given mode."""
    from megatron.core import tensor_parallel

    from megatron_kaja.models.llama.model import build_gpt_model
    from megatron_kaja.parallel.distributed import compute_device

    cpu_bridge.deactivate()
    cpu_bridge.activate(strict=strict)
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # a new bridge has a new RNG tracker
    torch.manual_seed(0)
    model = build_gpt_model(ARCH)
    tokens = torch.randint(0, ARCH.vocab_size, (4, 64)).to(compute_device())
    positions = torch.arange(64, device=compute_device()).expand(4, 64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(tokens, positions, None, labels=tokens).float().mean().backward()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(param.grad, alpha=-1e-3)
        times.append(time.perf_counter() - start)
    return times[2:]  # warm-up


def main() -> None:
    from megatron_kaja.parallel.distributed import initialize_model_parallel

    torch.set_num_threads(1)
    initialize_model_parallel(1, 1, seed=0)
    plain, strict = [], []
    for _ in range(5):
        plain += step_seconds(False, 12)
        strict += step_seconds(True, 12)
    result = {
        "plain_ms": 1e3 * statistics.median(plain),
        "strict_ms": 1e3 * statistics.median(strict),
    }
    result["ratio"] = result["strict_ms"] / result["plain_ms"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
