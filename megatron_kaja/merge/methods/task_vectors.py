"""Task-vector arithmetic shared by task_arithmetic, TIES and DARE.

A task vector is `delta_i = m_i - base` (Ilharco et al. 2023). Methods differ in how each
delta is sparsified (TIES trims by magnitude, DARE drops at random) and whether the
deltas vote on a sign per parameter before they are summed (TIES' sign election).
"""

from __future__ import annotations

import torch


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `max(1, int(density * n))` largest-magnitude entries (TIES "trim" step).

    Yadav et al. 2023, "TIES-Merging", sec. 3: reset all but the top-k% values by
    magnitude. The k-th largest magnitude is found with `kthvalue` (linear time, no full
    sort); entries equal to the threshold are kept in index order until k are kept.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    magnitude = delta.abs().flatten()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = torch.nonzero(magnitude == threshold).squeeze(1)[:missing]
        keep[at_threshold] = True
    return delta * keep.view_as(delta)


def dare_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool
) -> torch.Tensor:
    """Drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p).

    Yu et al. 2023, "Language Models are Super Mario" (DARE), eq. 2: the rescale keeps the
    expected value of the task vector unchanged.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=delta.dtype) < density
    out = delta * keep
    return out.div_(density) if rescale else out


def combine_task_vectors(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    elect_sign: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """base + scale * (sum_i w_i delta_i) / divisor, optionally with TIES' sign election.

    With `elect_sign` (Yadav et al. 2023, "elect" and "disjoint merge"), each parameter's
    sign is that of sum_i w_i delta_i, and only the weighted deltas agreeing with it are
    summed; `normalize` then divides by the sum of the weights of the agreeing (and not
    trimmed-away) entries, the disjoint mean. Without it, `normalize` divides by sum_i w_i.
    """
    weighted = [d.mul_(w) for d, w in zip(deltas, weights, strict=True)]
    if not elect_sign:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed.add_(d)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed = mixed / total
    else:
        total_delta = torch.zeros_like(base)
        for d in weighted:
            total_delta.add_(d)
        # Ties at zero vote positive, so that a zero sum still elects one sign.
        elected = torch.where(total_delta >= 0, 1.0, -1.0).to(base.dtype)
        del total_delta
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(weighted, weights, strict=True):
            agree = torch.sign(d) == elected
            mixed.add_(torch.where(agree, d, 0.0))
            divisor.add_(agree.to(base.dtype), alpha=w)
        if normalize:
            divisor[divisor == 0] = 1.0
            mixed.div_(divisor)
    if scale != 1:
        mixed = mixed * scale
    return base + mixed
