"""One GRPO step as a library function: rollouts -> rewards -> advantages -> log-probs ->
clipped policy update with a KL penalty to a frozen reference (DeepSeekMath's GRPO).

The trainer (`train_grpo.py`) owns the loop, the megatron optimizer and its schedule,
checkpoints and the metrics file; this function owns what happens inside one step and
returns its metrics. It works at any tensor-parallel size; the model must be one pipeline
stage (pipeline-parallel training goes through megatron's schedules in the trainer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from megatron_kaja.rl.advantages import compute_advantages
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.losses import clipped_policy_loss, token_logprobs
from megatron_kaja.rl.rollout import PromptRecord, RolloutBatch, collect_rollouts
from megatron_kaja.rl.sampler import Generation, SamplingParams, causal_padding_mask


@contextmanager
def _timed(metrics: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - start


def response_logprobs(
    model, gen: Generation, rows: slice, *, temperature: float, vocab_size: int
) -> torch.Tensor:
    """Per-token log-probs `[rows, N]` of the responses `gen.response_ids[rows]` under `model`
    (one forward over prompt + response; differentiable when grad is enabled)."""
    tokens = gen.sequences[rows]
    valid = gen.attention_valid[rows]
    width = gen.prompt_ids.size(1)
    positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    logits = model(tokens[:, :-1], positions[:, :-1], causal_padding_mask(valid[:, :-1]))
    # Position t predicts token t + 1: the response starts at `width`.
    logits = logits[:, width - 1 :]
    return token_logprobs(logits, tokens[:, width:], temperature=temperature, vocab_size=vocab_size)


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def grpo_step(
    model,
    ref_model,
    optimizer,
    prompts: Iterator[PromptRecord],
    reward_fn: Callable,
    config: GRPOConfig,
    *,
    decode: Callable[[list[int]], str],
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
    num_prompts: int | None = None,
    engine=None,
) -> dict:
    """One GRPO step on `config.prompts_per_step` prompts (or `num_prompts`) drawn from
    `prompts`; returns the step's metrics.

    `ref_model`: the frozen reference (None when `config.beta == 0`). `optimizer`: anything
    with `zero_grad()` and `step()` (the megatron optimizer in the trainer, torch AdamW in
    the benchmark); a megatron-DDP-wrapped model has its gradients synchronized before the
    step. `decode` turns response ids into the text the reward reads. `engine` samples the
    rollouts (`megatron_kaja.rl.engines`; default: the builtin sampler on `model`) and must
    hold the current weights; it is put to sleep before the update.
    """
    from megatron_kaja.rl.engines import BuiltinEngine

    if engine is None:
        engine = BuiltinEngine(
            model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=vocab_size
        )
    if config.beta > 0 and ref_model is None:
        raise ValueError("GRPOConfig.beta > 0 needs a reference model (or set beta to 0)")
    metrics: dict = {}
    params = SamplingParams(config.max_new_tokens, config.temperature, config.top_p)
    batch: RolloutBatch = collect_rollouts(
        engine,
        prompts,
        num_prompts or config.prompts_per_step,
        config.num_generations,
        params,
        reward_fn,
        decode,
        pad_token_id=pad_token_id,
        generator=generator,
        filter_zero_variance=config.filter_zero_variance,
        oversample_rounds=config.oversample_rounds,
        zero_variance_tol=config.zero_variance_tol,
        rollout_batch_size=config.rollout_batch_size,
    )
    with _timed(metrics, "t_sync"):
        engine.sleep()  # free the engine's memory (vLLM: weights and KV cache) for the update
    metrics.update(batch.seconds)
    gen = batch.generation
    with _timed(metrics, "t_reward"):
        advantages = compute_advantages(config.advantage, batch.rewards, config.advantage_eps)
        advantages = advantages.flatten().to(gen.logprobs)
        # Missing rewards take no part in the loss at all.
        loss_mask = gen.response_mask & batch.rewards.valid.flatten().unsqueeze(1)
    n = gen.response_ids.size(0)
    slices = _micro_batches(n, config.micro_batch_size)
    kw = dict(temperature=config.temperature, vocab_size=vocab_size)
    with _timed(metrics, "t_logprob"), torch.no_grad():
        was_training = model.training
        model.eval()
        old = torch.cat([response_logprobs(model, gen, s, **kw) for s in slices])
        model.train(was_training)
        ref = None
        if config.beta > 0:
            ref_model.eval()
            ref = torch.cat([response_logprobs(ref_model, gen, s, **kw) for s in slices])
    if config.loss_aggregation == "token":
        normalizer = float(loss_mask.sum().clamp(min=1))
    else:
        normalizer = float(n)
    totals = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0}
    with _timed(metrics, "t_update"):
        for _ in range(config.num_iterations):
            optimizer.zero_grad()
            for s in slices:
                logp = response_logprobs(model, gen, s, **kw)
                out = clipped_policy_loss(
                    logp,
                    old[s],
                    advantages[s],
                    loss_mask[s],
                    clip_eps=config.clip_eps,
                    beta=config.beta,
                    ref_logprobs=None if ref is None else ref[s],
                    aggregation=config.loss_aggregation,
                    normalizer=normalizer,
                )
                out.loss.backward()
                share = float(out.num_tokens) / max(float(loss_mask.sum()), 1.0)
                totals["loss"] += float(out.loss) / config.num_iterations
                totals["clip_frac"] += float(out.clip_frac) * share / config.num_iterations
                totals["kl"] += float(out.kl) * share / config.num_iterations
            if hasattr(model, "finish_grad_sync"):
                model.finish_grad_sync()
            optimizer.step()
    lengths = gen.response_mask.sum(dim=1).float()
    metrics.update(batch.metrics)
    metrics.update(totals)
    metrics.update(
        zero_variance_frac=batch.zero_variance_frac,
        response_len_mean=float(lengths.mean()),
        groups=len(batch.prompts),
        # How far the sampler's log-probs are from the training forward's (rollout-engine drift).
        sampler_logprob_diff=float(((gen.logprobs - old).abs() * gen.response_mask).max()),
    )
    return metrics
