"""DARE-TIES: DARE's random drop + rescale, then TIES' sign election (Yu et al. 2023,
arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708)."""

from __future__ import annotations

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method
from megatron_kaja.merge.methods.task_vectors import dare_merge


@register_merge_method(
    "dare_ties",
    needs_base=True,
    shared={"normalize": False, "lambda": 1.0, "rescale": True},
    per_model={"weight": None, "density": 1.0},
)
def dare_ties(inputs: MergeInputs) -> torch.Tensor:
    """Drop with p = 1 - density (seeded per tensor and model), rescale, elect, sum."""
    return dare_merge(inputs, elect_sign=True)
