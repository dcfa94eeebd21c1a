"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023, arXiv:2306.01708).

Each task vector keeps its `density` fraction of largest-magnitude entries; each parameter
takes the sign with the larger total weighted mass; the agreeing entries are averaged.
"""

from __future__ import annotations

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method
from megatron_kaja.merge.methods.task_vectors import (
    combine_task_vectors,
    task_vectors,
    trim_to_density,
)


@register_merge_method(
    "ties",
    needs_base=True,
    shared={"normalize": True, "lambda": 1.0},
    per_model={"weight": None, "density": 1.0},
)
def ties(inputs: MergeInputs) -> torch.Tensor:
    """TIES with per-model weights and densities."""
    deltas = [
        trim_to_density(d, p["density"])
        for d, p in zip(task_vectors(inputs.tensors, inputs.base), inputs.per_model, strict=True)
    ]
    return combine_task_vectors(
        inputs.base,
        deltas,
        [p["weight"] for p in inputs.per_model],
        elect_sign=True,
        normalize=inputs.shared["normalize"],
        scale=inputs.shared["lambda"],
    )
