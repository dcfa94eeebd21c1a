"""Resolve a parameter setting for one tensor: name filters and per-layer gradients.

Same rules as mergekit, so that its recipes mean the same thing here:
- a list of conditional values is scanned in order; the first whose `filter` is a
  substring of the tensor name (or is None / `*`) gives the value;
- a list of numbers is a gradient: anchor points spread evenly from the first layer
  (t=0) to the last (t=1), linearly interpolated; a list of booleans is stepped;
- tensors outside the decoder layers (embeddings, final norm, lm_head) sit at t=0.
"""

from __future__ import annotations

import re

from megatron_kaja.merge.config import ConditionalParameter, ParameterSetting

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.7.mlp...` -> 7), else None."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Where a tensor sits along a gradient: layer i of L at i / (L - 1), others at 0."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float):
    """The value of `setting` for `tensor_name` at gradient position `t`; None if no filter
    matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(c, ConditionalParameter) for c in setting):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    if any(isinstance(v, bool) for v in setting):
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    lo = int(scaled)
    hi = min(len(setting) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * setting[lo] + frac * setting[hi]


def resolve_parameter(
    name: str,
    default,
    scopes: list[dict[str, ParameterSetting]],
    tensor_name: str,
    t: float,
    who: str,
):
    """First non-None value of `name` across `scopes` (most specific first), else `default`.

    Raises ValueError naming the parameter, the tensor and `who` when a required
    parameter (default None) resolves to nothing, e.g. because no filter matched.
    """
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    if default is None:
        raise ValueError(f"parameter {name} has no value for tensor {tensor_name} of {who}")
    return default
