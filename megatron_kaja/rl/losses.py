"""GRPO's loss terms: per-token log-probs from vocab-parallel logits, the clipped surrogate,
and the k3 KL estimator.

Log-probs never gather the vocabulary: logits stay split across tensor-parallel ranks
(`[..., vocab / TP]` per rank) and megatron-core's vocab-parallel cross entropy combines
them with an all-reduce of the max and of the sum of exponentials (and of the target's
logit). Megatron pads the vocabulary to a multiple of 128 x TP; the padded ids are not
tokens, so they are masked out of the softmax before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGGREGATIONS = ("token", "sequence")


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


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, Schulman's k3 estimator
    ("Approximating KL Divergence", 2020): with d = log pi_ref - log pi,
    k3 = exp(d) - d - 1, unbiased and always >= 0 (the form DeepSeekMath's GRPO uses)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    clip_frac: torch.Tensor  # share of response tokens whose ratio the clip held back
    kl: torch.Tensor  # mean per-token k3 KL to the reference (0 when beta == 0)
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
    aggregation: str = "token",
    normalizer: float | None = None,
) -> PolicyLossOutput:
    """GRPO's objective, as a loss to minimize (DeepSeekMath eq. 3 with the PPO clip):

        per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3,   rho = pi / pi_old

    `logprobs`, `old_logprobs`, `ref_logprobs`, `mask`: `[b, n]` over response tokens;
    `advantages`: `[b]` (one per sequence) or `[b, n]`.

    `aggregation="token"` sums over every response token of the batch and divides by their
    number (DAPO's token-level loss: long answers weigh per token, not per answer);
    `"sequence"` averages each sequence over its tokens, then over sequences (the original
    GRPO). `normalizer` replaces the divisor (the global token or sequence count) when a
    batch is split into micro-batches whose losses are summed.
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {aggregation!r}: use one of {LOSS_AGGREGATIONS}")
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
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if aggregation == "token":
        total = (per_token * mask).sum()
        loss = total / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    else:
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        divisor = normalizer if normalizer is not None else per_seq.numel()
        loss = per_seq.sum() / max(divisor, 1)
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
