"""SLERP between the base and one other model (Shoemake 1985, as used for LLM merges).

Each tensor is treated as one flat vector. Directions are interpolated on the sphere:
    x = sin((1-t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,
    cos(theta) = <a/|a|, b/|b|>,
with `t = 0` giving the base. Near-parallel (or anti-parallel) vectors make sin(theta)
vanish, so beyond |cos(theta)| > 0.9995 the formula falls back to lerp.
"""

from __future__ import annotations

import math

import torch

from megatron_kaja.merge.methods import MergeInputs, register_merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


CHUNK = 1 << 22  # elements per chunk of the dot product's scratch


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), lerp when nearly collinear.

    Computes in place in `a`.
    """
    norm_a = torch.linalg.vector_norm(a).item()
    norm_b = torch.linalg.vector_norm(b).item()
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    # Normalise before multiplying so that the dot product cannot overflow; in chunks so
    # that the scratch stays small next to a 400 MB embedding matrix.
    flat_a, flat_b = a.view(-1), b.view(-1)
    dot = sum(
        torch.dot(x / norm_a, y / norm_b).item()
        for x, y in zip(flat_a.split(CHUNK), flat_b.split(CHUNK), strict=True)
    )
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef_a = math.sin((1 - t) * theta) / sin_theta
        coef_b = math.sin(t * theta) / sin_theta
    return a.mul_(coef_a).add_(b, alpha=coef_b)


@register_merge_method("slerp", needs_base=True, exact_inputs=2, shared={"t": None})
def slerp(inputs: MergeInputs) -> torch.Tensor:
    """SLERP from the base (t=0) to the other model (t=1)."""
    return slerp_tensors(float(inputs.shared["t"]), inputs.base, inputs.tensors[0])
