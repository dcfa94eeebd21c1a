"""DARE with a plain weighted sum of the task vectors (Yu et al. 2023, arXiv:2311.03099)."""

from __future__ import annotations

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method
from megatron_kaja.merge.methods.task_vectors import (
    combine_task_vectors,
    dare_drop,
    task_vectors,
)


@register_merge_method(
    "dare_linear",
    needs_base=True,
    shared={"normalize": False, "lambda": 1.0, "rescale": True},
    per_model={"weight": None, "density": 1.0},
)
def dare_linear(inputs: MergeInputs) -> torch.Tensor:
    """Drop with p = 1 - density (seeded per tensor and model), rescale, weighted sum."""
    rescale = inputs.shared["rescale"]
    deltas = [
        dare_drop(d, p["density"], inputs.generator(i), rescale)
        for i, (d, p) in enumerate(
            zip(task_vectors(inputs.tensors, inputs.base), inputs.per_model, strict=True)
        )
    ]
    return combine_task_vectors(
        inputs.base,
        deltas,
        [p["weight"] for p in inputs.per_model],
        elect_sign=False,
        normalize=inputs.shared["normalize"],
        scale=inputs.shared["lambda"],
    )
