"""Linear merge: a weighted mean of the models ("model soups", Wortsman et al. 2022)."""

from __future__ import annotations

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method


@register_merge_method(
    "linear", needs_base=False, shared={"normalize": True}, per_model={"weight": None}
)
def linear(inputs: MergeInputs) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize` (the default)."""
    weights = [p["weight"] for p in inputs.per_model]
    out = inputs.tensors[0].mul_(weights[0])  # in place: the merge owns its inputs
    for w, x in zip(weights[1:], inputs.tensors[1:], strict=True):
        out.add_(x, alpha=w)
    if inputs.shared["normalize"]:
        out.div_(sum(weights))
    return out
