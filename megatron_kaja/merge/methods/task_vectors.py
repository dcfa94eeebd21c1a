"""Task-vector arithmetic shared by task_arithmetic, TIES and DARE.

A task vector is `delta_i = m_i - base` (Ilharco et al. 2023). Methods differ in how each
delta is sparsified (TIES trims by magnitude, DARE drops at random) and whether the
deltas vote on a sign per parameter before they are summed (TIES' sign election).

Every function here works in place on the deltas it is given (the merge owns them), so a
merge of N models holds about N + 2 full-size float tensors at its peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_kaja.merge.methods import MergeInputs


def task_vectors(models: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """m_i - base for each model, computed in place in the models' own buffers."""
    return [x.sub_(base) for x in models]


# Above this many entries the k-th largest is found through a sampled band (see below).
_SELECT_DIRECTLY = 1 << 20
_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor of non-negative floats, exactly.

    A full sort (or `torch.kthvalue`, which copies the values plus an int64 index per
    entry) costs 16+ bytes of scratch per entry: 8 GB for llm-jp-3-13b's embedding matrix.
    Instead, a fixed-seed sample brackets the answer in a narrow band [lo, hi]; one pass
    counts the entries above the band and one gathers the band (a few % of the entries),
    whose exact order statistic is then cheap. If the bracket misses (vanishingly rare),
    a binary search on the bit patterns (non-negative floats order like their bits as
    integers) finds the answer with one bool per entry of scratch.
    """
    n = values.numel()
    if n <= _SELECT_DIRECTLY:
        return torch.kthvalue(values, n - k + 1).values
    gen = torch.Generator().manual_seed(0)
    sample = values[torch.randint(n, (_SAMPLE,), generator=gen)].sort().values
    q = (n - k) / n  # the answer's quantile, ascending
    margin = 6 * (q * (1 - q) / _SAMPLE) ** 0.5 + 2 / _SAMPLE
    lo = sample[max(0, int((q - margin) * _SAMPLE))]
    hi = sample[min(_SAMPLE - 1, int((q + margin) * _SAMPLE) + 1)]
    above = int((values > hi).sum())
    rank = k - above  # the answer's rank (largest first) inside the band
    band = values[(values >= lo) & (values <= hi)]
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return kth_largest_by_bisection(values, k)


def kth_largest_by_bisection(values: torch.Tensor, k: int) -> torch.Tensor:
    """`kth_largest` by a binary search on the bit patterns (up to 64 counting passes)."""
    bits = values.view(torch.int32 if values.dtype == torch.float32 else torch.int64)
    low, high = int(bits.min()), int(bits.max())
    while low < high:
        mid = (low + high + 1) // 2
        if int((bits >= mid).sum()) >= k:
            low = mid
        else:
            high = mid - 1
    return torch.tensor(low, dtype=bits.dtype).view(values.dtype)


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `max(1, int(density * n))` largest-magnitude entries (TIES "trim" step).

    Yadav et al. 2023, "TIES-Merging", sec. 3: reset all but the top-k% values by
    magnitude. Entries equal to the k-th largest magnitude are kept in index order until
    k are kept. Works in place.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return delta.zero_()
    k = max(1, int(density * n))
    magnitude = delta.abs().view(-1)
    threshold = kth_largest(magnitude, k)
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = torch.nonzero(magnitude == threshold).squeeze(1)[:missing]
        keep[at_threshold] = True
    del magnitude
    return delta.masked_fill_(~keep.view_as(delta), 0.0)


def dare_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool
) -> torch.Tensor:
    """Drop each entry with probability p = 1 - density, rescale survivors by 1 / (1 - p).

    Yu et al. 2023, "Language Models are Super Mario" (DARE), eq. 2: the rescale keeps the
    expected value of the task vector unchanged. Works in place.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    drop = torch.rand(delta.shape, generator=generator, dtype=delta.dtype) >= density
    delta.masked_fill_(drop, 0.0)
    return delta.div_(density) if rescale else delta


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
    sign is that of sum_i w_i delta_i (zero counts as positive), and only the weighted
    deltas agreeing with it are summed; `normalize` then divides by the sum of the weights
    of the agreeing (and not trimmed-away) entries, the disjoint mean. Without it,
    `normalize` divides by sum_i w_i. Overwrites `deltas` (the result lives in the first).
    """
    for d, w in zip(deltas, weights, strict=True):
        d.mul_(w)
    mixed = deltas[0]
    if not elect_sign:
        for d in deltas[1:]:
            mixed.add_(d)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    else:
        total_delta = deltas[0].clone() if len(deltas) > 1 else deltas[0]
        for d in deltas[1:]:
            total_delta.add_(d)
        positive = total_delta >= 0
        del total_delta
        divisor = torch.zeros_like(base) if normalize else None
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
            agree = torch.where(positive, d > 0, d < 0)
            d.masked_fill_(~agree, 0.0)
            if i > 0:
                mixed.add_(d)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            mixed.div_(divisor)
    if scale != 1:
        mixed.mul_(scale)
    return mixed.add_(base)


def dare_merge(inputs: MergeInputs, *, elect_sign: bool) -> torch.Tensor:
    """DARE (dare_linear, or dare_ties with `elect_sign`): drop each task vector's entries
    with p = 1 - density (seeded per tensor and model), rescale, then combine."""
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
        elect_sign=elect_sign,
        normalize=inputs.shared["normalize"],
        scale=inputs.shared["lambda"],
    )
