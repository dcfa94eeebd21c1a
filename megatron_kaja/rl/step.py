"""One GRPO step as a library function: rollouts -> rewards -> advantages -> log-probs ->
clipped policy update with a KL penalty to a frozen reference (DeepSeekMath's GRPO).

The trainer (`train_grpo.py`) owns the loop, the megatron optimizer and its schedule,
checkpoints and the metrics file; this function owns what happens inside one step and
returns its metrics. It works at any tensor- and pipeline-parallel size (with several
stages the builtin sampler passes activations stage to stage, and the log-prob and update
passes go through megatron-core's pipeline schedule). Under an interleaved pipeline `model`
(and the reference) is the list of this rank's model chunks: the sampler visits them in
layer order and the schedule is megatron-core's interleaved 1F1B.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_kaja.rl.advantages import compute_advantages
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.losses import clipped_policy_loss, loss_aggregation, token_logprobs
from megatron_kaja.rl.rollout import PromptRecord, RolloutBatch, RolloutSeeds, collect_rollouts
from megatron_kaja.rl.sampler import (
    Generation,
    SamplingParams,
    causal_padding_mask,
    holds_whole_model,
    model_chunks,
)


@contextmanager
def _timed(metrics: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics[name] = metrics.get(name, 0.0) + time.perf_counter() - start


def sequence_multiple(model) -> int:
    """What the length of the rows `model` takes must divide by: 2 x CP under context
    parallelism (each CP rank holds 2 of 2 x CP chunks of a row), and each rank's part must
    divide by the TP size under sequence parallelism (TP ranks hold 1 / TP of it between the
    parallel regions): the least common multiple of 2 x CP and CP x TP."""
    config = model_chunks(model)[0].config
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    cp = config.context_parallel_size
    return math.lcm(2 * cp, cp * tp) if cp > 1 else tp


def forward_inputs(gen: Generation, rows: slice, multiple: int = 1):
    """`(tokens, valid)` of the forward that scores `gen`'s responses in `rows`: each sequence
    but its last token (position t predicts token t + 1), right-padded to a multiple of
    `multiple` positions. The padding is hidden from attention and, being after every real
    position of a causal model, changes no real position's logits; nothing reads its own."""
    tokens = gen.sequences[rows, :-1]
    valid = gen.attention_valid[rows, :-1]
    extra = -tokens.size(1) % multiple
    if extra:
        tokens = torch.nn.functional.pad(tokens, (0, extra))
        valid = torch.nn.functional.pad(valid, (0, extra), value=False)
    return tokens, valid


def forward_targets(gen: Generation, rows: slice, length: int) -> torch.Tensor:
    """The token each position of `forward_inputs`' rows (of `length`) predicts: the next one
    (any id past the end: nothing reads the padding's)."""
    targets = gen.sequences[rows, 1:]
    return torch.nn.functional.pad(targets, (0, length - targets.size(1)))


def left_padding_cu_seqlens(valid: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens` over the `[b, s]` rows that cut each row at its first real token: the
    left padding is a sample of its own, so the prompt and response attend only to
    themselves (the right padding after them is causal, hence invisible to them). Each row's
    real tokens must be one run (a left-padded prompt, then its response)."""
    s = valid.size(1)
    count = valid.sum(dim=1)
    first = valid.int().argmax(dim=1)
    last = s - 1 - valid.flip(1).int().argmax(dim=1)
    if bool(((last - first + 1 != count) & (count > 0)).any()):
        raise ValueError("rows to score under context parallelism need one run of real tokens")
    bounds = [0]
    for row, start in enumerate(first.tolist()):
        if start:
            bounds.append(row * s + start)
        bounds.append((row + 1) * s)
    return torch.tensor(bounds, dtype=torch.int32, device=valid.device)


def stage_forward(stage, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`stage`'s output for the rows `tokens` (real positions `valid`): logits `[b, s, vocab
    / TP]` on the last pipeline stage. Under context parallelism the rows go through the sdpa
    backend's forward, which feeds this rank's zigzag part of them (`[b, s / CP, ...]` out)
    with the rows' `cu_seqlens` (`left_padding_cu_seqlens`)."""
    if stage.config.context_parallel_size == 1:
        positions = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
        return stage(tokens, positions, causal_padding_mask(valid))
    from megatron_kaja.models.llama.attention import attention_backend

    batch = {
        "tokens": tokens,
        # sbhd rows under RoPE: positions are relative; megatron-core reads none of these.
        "position_ids": torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens),
        "cu_seqlens": left_padding_cu_seqlens(valid),
    }
    output, _ = attention_backend("sdpa").forward(stage, batch)
    return output


def scored_logprobs(
    stage, logits: torch.Tensor, targets: torch.Tensor, gen: Generation, **kw
) -> torch.Tensor:
    """Per-token log-probs `[b, N]` of the responses from `stage`'s `logits` for rows whose
    next tokens are `targets` `[b, s]`. Under context parallelism the logits hold this rank's
    part of the rows: its log-probs are gathered into the whole rows (`whole_rows`; the
    gradient stays with the rank's own part)."""
    width, length = gen.prompt_ids.size(1), gen.sequences.size(1) - 1
    if stage.config.context_parallel_size == 1:
        # Position t predicts token t + 1: the response starts at `width`.
        return token_logprobs(logits[:, width - 1 : length], targets[:, width - 1 : length], **kw)
    from megatron.core import parallel_state as ps

    from megatron_kaja.parallel.context_parallel import whole_rows, zigzag_positions

    cp, s = stage.config.context_parallel_size, targets.size(1)
    index = zigzag_positions(s, cp, ps.get_context_parallel_rank(), targets.device)
    local = token_logprobs(logits, targets.index_select(1, index), **kw)
    return whole_rows(local, s, ps.get_context_parallel_group())[:, width - 1 : length]


def response_logprobs(
    model, gen: Generation, rows: slice, *, temperature: float, vocab_size: int
) -> torch.Tensor:
    """Per-token log-probs `[rows, N]` of the responses `gen.response_ids[rows]` under `model`
    (one forward over prompt + response; differentiable when grad is enabled)."""
    tokens, valid = forward_inputs(gen, rows, sequence_multiple(model))
    targets = forward_targets(gen, rows, tokens.size(1))
    logits = stage_forward(model, tokens, valid)
    return scored_logprobs(
        model, logits, targets, gen, temperature=temperature, vocab_size=vocab_size
    )


def _micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(parts) if parts else None


def run_micro_batches(
    model,
    gen: Generation,
    slices: list[slice],
    *,
    temperature: float,
    vocab_size: int,
    loss_of: Callable | None = None,
) -> list:
    """Each micro-batch's response log-probs (`loss_of` None; call under no_grad), or its
    `loss_of(rows, logp) -> (loss, info)` backpropagated, returning the infos.

    One pipeline stage: plain forwards. Several: megatron-core's pipeline schedule (1F1B, or
    interleaved 1F1B when `model` is a list of chunks), whose activations travel between
    stages; results exist on the last stage only (other stages get an empty list).
    """
    kw = dict(temperature=temperature, vocab_size=vocab_size)
    if holds_whole_model(model):
        model = model_chunks(model)[0]
        # megatron DDP's `no_sync` (the training stack sets it as the config's no_sync_func)
        # around every backward but the last, as megatron-core's own schedule does: with
        # --overlap-grad-reduce a bucket's reduce starts from the backward hooks once its
        # weights had as many backwards as in the first step, and a step's number of
        # micro-batches varies (dynamic sampling drops groups); under no_sync that count is 1.
        no_sync = getattr(model.config, "no_sync_func", None) or contextlib.nullcontext
        # Context parallelism: every CP rank computes the whole rows' loss (`scored_logprobs`)
        # and backpropagates it through its own tokens, so the CP ranks' gradients sum to the
        # loss's; megatron DDP averages over DP x CP, hence the loss is scaled by CP, as
        # megatron-core 0.16.1's pipeline schedule scales a loss_func's `(loss, info)`.
        cp_size = model.config.context_parallel_size
        results = []
        for index, rows in enumerate(slices):
            logp = response_logprobs(model, gen, rows, **kw)
            if loss_of is None:
                results.append(logp)
            else:
                loss, info = loss_of(rows, logp)
                last = index == len(slices) - 1
                with contextlib.nullcontext() if last else no_sync():
                    (loss * cp_size).backward()
                results.append(info)
        return results
    return _pipeline_micro_batches(model_chunks(model), gen, slices, loss_of, **kw)


def interleaved_micro_batch_count(count: int, pipeline_size: int) -> int:
    """The micro-batches the interleaved schedule runs for `count` of them: megatron-core
    0.16.1 takes them in groups of PP per chunk (`microbatch_group_size_per_vp_stage`'s
    default) and needs a whole number of groups, so the count is rounded up to a multiple
    of PP. A step's count varies (dynamic sampling drops groups), so it cannot be fixed by
    the batch settings as SFT's is."""
    return max(1, math.ceil(count / pipeline_size)) * pipeline_size


def _pipeline_micro_batches(chunks, gen, slices, loss_of, *, temperature, vocab_size) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = gen.response_ids.size(0)
    if len(chunks) > 1:
        # Empty micro-batches (rows n:n) fill the last group: they run on copies of the last
        # row (below) and their loss is a zero that keeps the graph for the backward.
        pp = ps.get_pipeline_model_parallel_world_size()
        count = interleaved_micro_batch_count(len(slices), pp)
        slices = slices + [slice(n, n)] * (count - len(slices))
    # The schedule sends [seq, micro-batch, hidden] tensors of one shape: a short last
    # micro-batch is filled up with copies of its last row, which no loss reads.
    size = max(s.stop - s.start for s in slices)
    tokens, valid = forward_inputs(gen, slice(0, n), sequence_multiple(chunks))
    targets = forward_targets(gen, slice(0, n), tokens.size(1))
    if len(slices) * size > n:
        extra = len(slices) * size - n
        tokens = torch.cat([tokens, tokens[-1:].expand(extra, -1)])
        valid = torch.cat([valid, valid[-1:].expand(extra, -1)])
    results: list = []

    def forward_step(data_iterator, stage):
        rows = next(data_iterator)
        padded = slice(rows.start, rows.start + size)
        output = stage_forward(stage, tokens[padded], valid[padded])

        def loss_func(logits):
            if rows.stop == rows.start:  # an empty micro-batch that fills a group
                return logits.sum() * 0.0, {}
            real = logits[: rows.stop - rows.start]
            logp = scored_logprobs(stage, real, targets[rows], gen, **kw)
            if loss_of is None:
                results.append(logp)
                return logp.sum() * 0.0, {}
            loss, info = loss_of(rows, logp)
            results.append(info)
            # The schedule divides by the number of micro-batches (ours are already summed
            # shares of the whole batch's loss) and multiplies by CP (see run_micro_batches).
            return loss * len(slices), {}

        return output, loss_func

    kw = dict(temperature=temperature, vocab_size=vocab_size)
    config = chunks[0].config  # the schedule reads the first chunk's
    finalize, config.finalize_model_grads_func = config.finalize_model_grads_func, None
    # Under an interleaved pipeline every chunk reads each micro-batch's rows (as SFT's).
    iterators = [iter(slices) for _ in chunks]
    try:  # gradients are finalized by the optimizer step, as with one stage
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(slices),
            seq_length=tokens.size(1),
            micro_batch_size=size,
            forward_only=loss_of is None,
        )
    finally:
        config.finalize_model_grads_func = finalize
    return results


def _from_last_stage(model, values: dict) -> dict:
    """The last pipeline stage's `values` on every stage."""
    if holds_whole_model(model):
        return values
    from megatron.core import parallel_state as ps

    payload = [values]
    dist.broadcast_object_list(
        payload,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return payload[0]


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
    seeds: RolloutSeeds | None = None,
    num_prompts: int | None = None,
    engine=None,
    data_parallel_group=None,
) -> dict:
    """One GRPO step on `config.prompts_per_step` prompts (or `num_prompts`) drawn from
    `prompts`; returns the step's metrics.

    `model`: this rank's pipeline stage, or the list of its chunks under an interleaved
    pipeline (`ref_model` then too). `ref_model`: the frozen reference (None when
    `config.beta == 0`). `optimizer`: anything with `zero_grad()` and `step()` (the megatron
    optimizer in the trainer, torch AdamW in the benchmark); a megatron-DDP-wrapped model
    has its gradients synchronized before the step. `decode` turns response ids into the
    text the reward reads. `engine` samples the rollouts (`megatron_kaja.rl.engines`;
    default: the builtin sampler on `model`) and must hold the current weights; it is put to
    sleep before the update.

    Sampling randomness: `seeds` gives every completion its own stream, keyed by the prompt's
    place in the step's global batch, so a step samples the same completions at any
    data-parallel size; without it, one `generator` stream feeds the whole batch.
    `data_parallel_group`: the loss is normalized by counts over this group (the global
    batch), the gradients being averaged over it.
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
        seeds=seeds,
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
        valid = batch.rewards.valid.flatten().unsqueeze(1).to(gen.response_mask.device)  # host
        loss_mask = gen.response_mask & valid
    n = gen.response_ids.size(0)
    slices = _micro_batches(n, config.micro_batch_size)
    kw = dict(temperature=config.temperature, vocab_size=vocab_size)
    with _timed(metrics, "t_logprob"), torch.no_grad():
        chunks = model_chunks(model)
        was_training = [chunk.training for chunk in chunks]
        for chunk in chunks:
            chunk.eval()
        old = _cat(run_micro_batches(model, gen, slices, **kw))
        for chunk, mode in zip(chunks, was_training, strict=True):
            chunk.train(mode)
        ref = None
        if config.beta > 0:
            for chunk in model_chunks(ref_model):
                chunk.eval()
            ref = _cat(run_micro_batches(ref_model, gen, slices, **kw))
    # The step's normalizer counts the whole global batch (every micro-batch on every
    # data-parallel rank). Data-parallel gradients are averaged, so each rank divides by its
    # 1 / DP share of it: the update is then the same at any DP size (with this rank's count
    # instead, ranks with longer answers would weigh less per token: TRL's `bnpo`).
    aggregation = loss_aggregation(config.loss_aggregation)
    counts = torch.tensor(
        [aggregation.count(loss_mask, config.max_new_tokens), float(loss_mask.sum())],
        dtype=torch.float64,
        device=loss_mask.device,  # NCCL reduces device tensors only
    )
    dp_size = 1
    if data_parallel_group is not None:
        dp_size = dist.get_world_size(group=data_parallel_group)
        dist.all_reduce(counts, group=data_parallel_group)
    normalizer = max(float(counts[0]), 1.0) / dp_size
    token_share = max(float(counts[1]), 1.0) / dp_size  # metrics: token means over the step

    def loss_of(rows: slice, logp: torch.Tensor):
        out = clipped_policy_loss(
            logp,
            old[rows],
            advantages[rows],
            loss_mask[rows],
            clip_eps=config.clip_eps,
            beta=config.beta,
            ref_logprobs=None if ref is None else ref[rows],
            kl_estimator=config.kl_estimator,
            aggregation=config.loss_aggregation,
            normalizer=normalizer,
            max_length=config.max_new_tokens,
        )
        share = float(out.num_tokens) / token_share
        info = {"loss": float(out.loss.detach()), "clip_frac": float(out.clip_frac) * share}
        info["kl"] = float(out.kl) * share
        return out.loss, info

    totals = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0}
    with _timed(metrics, "t_update"):
        for _ in range(config.num_iterations):
            optimizer.zero_grad()
            for info in run_micro_batches(model, gen, slices, loss_of=loss_of, **kw):
                for key in totals:
                    totals[key] += info[key] / config.num_iterations
            for chunk in model_chunks(model):
                if hasattr(chunk, "finish_grad_sync"):
                    chunk.finish_grad_sync()
            optimizer.step()
    drift = math.nan
    if old is not None:
        # How far the sampler's log-probs are from the training forward's (rollout-engine drift).
        drift = float(((gen.logprobs - old).abs() * gen.response_mask).max())
    totals["sampler_logprob_diff"] = drift
    totals = _from_last_stage(model, totals)  # the losses exist on the last pipeline stage
    lengths = gen.response_mask.sum(dim=1).float()
    metrics.update(batch.metrics)
    metrics.update(totals)
    metrics.update(
        zero_variance_frac=batch.zero_variance_frac,
        response_len_mean=float(lengths.mean()),
        groups=len(batch.prompts),
    )
    return metrics
