"""Group-relative advantages for GRPO, and the zero-variance groups that dynamic sampling drops.

Rewards arrive as one group of G samples per prompt, laid out `[num_groups, G]`. A reward of
`None` (the judge could not score the answer) is *missing*: it takes no part in its group's
statistics, gets advantage 0 and is masked out of the loss; it is counted, never read as 0.

Estimators (registered by name, `compute_advantages(name, ...)`):

* `grpo`: A_i = (r_i - mean(r)) / (std(r) + eps), the group-normalized outcome advantage of
  DeepSeekMath (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning").
  `std` is the sample standard deviation (Bessel-corrected) over the group's valid rewards.
* `dr_grpo`: A_i = r_i - mean(r), without the std division, which Dr. GRPO (Liu et al. 2025,
  "Understanding R1-Zero-Like Training: A Critical Perspective") shows biases updates toward
  questions that are too easy or too hard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str):
    """Register `fn(rewards [n, G], valid [n, G], eps) -> advantages [n, G]` as `name`."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        _ESTIMATORS[name] = fn
        return fn

    return wrap


def advantage_names() -> list[str]:
    return sorted(_ESTIMATORS)


@dataclass(frozen=True)
class GroupedRewards:
    """Rewards of `num_groups` prompts x G samples; `valid` is False where a reward was None."""

    values: torch.Tensor  # [n, G] float64, 0.0 where missing
    valid: torch.Tensor  # [n, G] bool

    @property
    def num_missing(self) -> int:
        return int((~self.valid).sum())

    @classmethod
    def from_list(cls, rewards: Sequence[float | None], group_size: int) -> GroupedRewards:
        """Group a flat list (prompt-major: G samples of prompt 0, then of prompt 1, ...)."""
        if group_size < 1 or len(rewards) % group_size:
            raise ValueError(
                f"{len(rewards)} rewards do not split into groups of num_generations={group_size}"
            )
        valid = torch.tensor([r is not None for r in rewards], dtype=torch.bool)
        values = [0.0 if r is None else float(r) for r in rewards]
        values = torch.tensor(values, dtype=torch.float64)
        return cls(values.view(-1, group_size), valid.view(-1, group_size))


def _group_mean_std(rewards: torch.Tensor, valid: torch.Tensor):
    """Mean and sample std over the valid entries of each group (NaN where undefined)."""
    count = valid.sum(dim=1, keepdim=True).to(rewards.dtype)
    masked = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = masked.sum(dim=1, keepdim=True) / count
    squares = torch.where(valid, (rewards - mean) ** 2, torch.zeros_like(rewards))
    std = (squares.sum(dim=1, keepdim=True) / (count - 1)).sqrt()
    return mean, std


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    mean, std = _group_mean_std(rewards, valid)
    return (rewards - mean) / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    mean, _ = _group_mean_std(rewards, valid)
    return rewards - mean


def compute_advantages(name: str, rewards: GroupedRewards, eps: float = 1e-4) -> torch.Tensor:
    """Advantages `[n, G]` by the estimator `name`; 0 for missing rewards and for groups with
    fewer than two valid rewards (no baseline to compare against)."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {advantage_names()}")
    adv = _ESTIMATORS[name](rewards.values, rewards.valid, eps)
    enough = rewards.valid.sum(dim=1, keepdim=True) >= 2
    keep = rewards.valid & enough & torch.isfinite(adv)
    return torch.where(keep, adv, torch.zeros_like(adv))


def zero_variance_groups(rewards: GroupedRewards, tol: float = 1e-6) -> torch.Tensor:
    """`[n]` bool: groups whose valid rewards spread by at most `tol` (or that have fewer than
    two valid rewards). Their advantages are all ~0: they cost compute and teach nothing."""
    big = torch.finfo(rewards.values.dtype).max
    hi = torch.where(rewards.valid, rewards.values, torch.full_like(rewards.values, -big))
    lo = torch.where(rewards.valid, rewards.values, torch.full_like(rewards.values, big))
    spread = hi.max(dim=1).values - lo.min(dim=1).values
    return (rewards.valid.sum(dim=1) < 2) | (spread <= tol)


def filter_zero_variance(rewards: GroupedRewards, tol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Dynamic sampling (DAPO, Yu et al. 2025): the indices of the groups to keep, and the
    fraction of groups dropped for (near-)zero reward spread."""
    zero = zero_variance_groups(rewards, tol)
    keep = torch.nonzero(~zero).flatten()
    return keep, float(zero.float().mean()) if len(zero) else 0.0
