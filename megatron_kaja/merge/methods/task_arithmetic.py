"""Task arithmetic: base + lambda * sum_i w_i (m_i - base) (Ilharco et al. 2023)."""

from __future__ import annotations

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method
from megatron_kaja.merge.methods.task_vectors import combine_task_vectors, task_vectors


@register_merge_method(
    "task_arithmetic",
    needs_base=True,
    shared={"normalize": False, "lambda": 1.0},
    per_model={"weight": None},
)
def task_arithmetic(inputs: MergeInputs) -> torch.Tensor:
    """Add the weighted task vectors to the base (divided by sum w_i when `normalize`)."""
    return combine_task_vectors(
        inputs.base,
        task_vectors(inputs.tensors, inputs.base),
        [p["weight"] for p in inputs.per_model],
        elect_sign=False,
        normalize=inputs.shared["normalize"],
        scale=inputs.shared["lambda"],
    )
