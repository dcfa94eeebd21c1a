"""GRPO's loss terms: per-token log-probs from vocab-parallel logits, the clipped surrogate,
the KL estimators and the ways per-token losses are aggregated into one number.

Log-probs never gather the vocabulary: logits stay split across tensor-parallel ranks
(`[..., vocab / TP]` per rank) and megatron-core's vocab-parallel cross entropy combines
them with an all-reduce of the max and of the sum of exponentials (and of the target's
logit). Megatron pads the vocabulary to a multiple of 128 x TP; the padded ids are not
tokens, so they are masked out of the softmax before anything else.

KL estimators (`--kl-estimator`, registered by name) and loss aggregations
(`--loss-aggregation`, registered by name) are small units, each tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def vocab_partition(logits: torch.Tensor, tp_rank: int) -> tuple[int, int]:
    """`[start, end)` global vocabulary ids held by this rank's slice of `logits`."""
    width = logits.size(-1)
    return tp_rank * width, (tp_rank + 1) * width


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int | None, tp_rank: int) -> torch.Tensor:
    """A copy of this rank's vocab-parallel `logits` with Megatron's padding ids set to -inf."""
    logits = logits.float().clone()
    if vocab_size is None:
        return logits
    start, end = vocab_partition(logits, tp_rank)
    if end > vocab_size:
        logits[..., max(0, vocab_size - start) :] = float("-inf")
    return logits


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, from this rank's vocab-parallel slice.

    `logits` `[..., vocab / TP]` (as GPTModel returns them), `targets` `[...]` global ids.
    Differentiable (megatron-core's vocab-parallel cross entropy); needs megatron's parallel
    state. The temperature matches the sampler's, so ratios start at 1 (Ref: the policy that
    sampled at temperature T is softmax(logits / T)).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = mask_padded_vocab(logits, vocab_size, ps.get_tensor_model_parallel_rank())
    if temperature != 1.0:
        scaled = scaled / temperature
    # The cross entropy works in place on its input: `scaled` is our own copy.
    return -vocab_parallel_cross_entropy(scaled, targets)


# --- KL estimators -----------------------------------------------------------------------
# Per-token estimates of KL(pi || pi_ref) from tokens sampled by the rollout policy, with
# d = log pi_ref - log pi (Schulman, "Approximating KL Divergence", 2020). As loss terms their
# gradients differ (on-policy, E over tokens from pi; derivations in the project's
# docs/grpo-loss.md): k1's is grad log pi, zero in expectation; k2's and k3_is's are the
# reverse-KL gradient E[log(pi / pi_ref) grad log pi]; k3's is the forward KL(pi_ref || pi)'s.

KLEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl_estimator(name: str):
    """Register `fn(logprobs, ref_logprobs, old_logprobs) -> per-token KL` as `name`."""

    def wrap(fn: KLEstimator) -> KLEstimator:
        _KL_ESTIMATORS[name] = fn
        return fn

    return wrap


def kl_estimator_names() -> list[str]:
    return sorted(_KL_ESTIMATORS)


def kl_estimate(
    name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, old_logprobs: torch.Tensor
) -> torch.Tensor:
    """Per-token KL estimate by the estimator `name` (differentiable in `logprobs`)."""
    if name not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {kl_estimator_names()}")
    return _KL_ESTIMATORS[name](logprobs, ref_logprobs, old_logprobs)


@register_kl_estimator("k1")
def kl_k1(logprobs, ref_logprobs, old_logprobs=None) -> torch.Tensor:
    """k1 = log pi - log pi_ref: unbiased, negative for some tokens, high variance."""
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs, ref_logprobs, old_logprobs=None) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2: biased, >= 0, low variance."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register_kl_estimator("k3")
def kl_k3(logprobs, ref_logprobs, old_logprobs=None) -> torch.Tensor:
    """k3 = exp(d) - d - 1 with d = log pi_ref - log pi: unbiased and always >= 0 (the form
    DeepSeekMath's GRPO uses)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


@register_kl_estimator("k3_is")
def kl_k3_importance_sampled(logprobs, ref_logprobs, old_logprobs) -> torch.Tensor:
    """k3 x pi / pi_old: k3 weighted by the (differentiable) importance ratio of the policy to
    the policy that sampled the tokens, which makes its gradient the unbiased reverse-KL
    gradient, on- and off-policy (DeepSeek-V3.2, 2025; TRL's `use_bias_correction_kl`)."""
    return kl_k3(logprobs, ref_logprobs) * torch.exp(logprobs - old_logprobs)


# --- loss aggregation --------------------------------------------------------------------


@dataclass(frozen=True)
class LossAggregation:
    """How per-token losses become the loss: `total(per_token, mask)` summed over the whole
    step's batch (every micro-batch and data-parallel rank), divided by `count(mask,
    max_length)` summed the same way. Both sums being global, the loss does not depend on
    how the batch is split."""

    name: str
    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor, int | None], float]


_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_aggregation(name: str, count: Callable[[torch.Tensor, int | None], float]):
    """Register `total(per_token [b, n], mask [b, n]) -> scalar` as `name`, normalized by the
    sum of `count(mask, max_length)` over the batch."""

    def wrap(fn):
        _AGGREGATIONS[name] = LossAggregation(name, fn, count)
        return fn

    return wrap


def loss_aggregation_names() -> list[str]:
    return sorted(_AGGREGATIONS)


def loss_aggregation(name: str) -> LossAggregation:
    if name not in _AGGREGATIONS:
        raise ValueError(f"loss aggregation {name!r}: use one of {loss_aggregation_names()}")
    return _AGGREGATIONS[name]


def _max_length_count(mask: torch.Tensor, max_length: int | None) -> float:
    if max_length is None:
        raise ValueError("the dr_grpo loss aggregation needs max_length (max_new_tokens)")
    return float(mask.size(0) * max_length)


@register_loss_aggregation("token", count=lambda mask, max_length: float(mask.sum()))
def token_total(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DAPO's token-level loss (Yu et al. 2025; TRL's `dapo`): the mean over every response
    token of the step, so long answers weigh per token, not per answer."""
    return (per_token * mask).sum()


@register_loss_aggregation("sequence", count=lambda mask, max_length: float(mask.size(0)))
def sequence_total(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original GRPO (DeepSeekMath; TRL's `grpo`): each sequence averaged over its own
    tokens, then the mean over sequences."""
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()


@register_loss_aggregation("dr_grpo", count=_max_length_count)
def constant_length_total(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): the token sum divided by a constant, max completion length
    x number of sequences, so neither the answer's length nor the batch's token count scales a
    token's gradient (TRL's `dr_grpo`)."""
    return (per_token * mask).sum()


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    clip_frac: torch.Tensor  # share of response tokens whose ratio the clip held back
    kl: torch.Tensor  # mean per-token KL estimate to the reference (0 when beta == 0)
    ratio_mean: torch.Tensor
    num_tokens: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    aggregation: str = "token",
    normalizer: float | None = None,
    max_length: int | None = None,
) -> PolicyLossOutput:
    """GRPO's objective, as a loss to minimize (DeepSeekMath eq. 3 with the PPO clip):

        per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta KL,   rho = pi / pi_old

    `logprobs`, `old_logprobs`, `ref_logprobs`, `mask`: `[b, n]` over response tokens;
    `advantages`: `[b]` (one per sequence) or `[b, n]`. `kl_estimator` names the per-token
    KL (`kl_estimator_names()`).

    `aggregation` (`loss_aggregation_names()`) turns per-token losses into the loss:
    `token` (the mean over every response token), `sequence` (each sequence's token mean,
    averaged over sequences), `dr_grpo` (the token sum over `max_length` x sequences).
    `normalizer` replaces the divisor by the whole step's (the sum of the aggregation's
    `count` over micro-batches and data-parallel ranks) when a batch is split.
    """
    agg = loss_aggregation(aggregation)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the frozen reference model's)")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        kl = kl_estimate(kl_estimator, logprobs, ref_logprobs, old_logprobs)
        per_token = per_token + beta * kl
    if normalizer is None:
        normalizer = max(agg.count(mask, max_length), 1.0)
    loss = agg.total(per_token, mask) / normalizer
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        # The clip is active where the clipped term is the smaller one and differs.
        held = ((ratio > 1.0 + clip_eps) & (advantages > 0)) | (
            (ratio < 1.0 - clip_eps) & (advantages < 0)
        )
        clip_frac = (held.to(mask.dtype) * mask).sum() / tokens
        kl_mean = (kl.detach() * mask).sum() / tokens
        ratio_mean = (ratio.detach() * mask).sum() / tokens
    return PolicyLossOutput(loss, clip_frac, kl_mean, ratio_mean, mask.sum().detach())
