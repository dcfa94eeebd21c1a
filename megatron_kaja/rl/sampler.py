"""The `builtin` rollout engine: autoregressive sampling on a megatron-core GPTModel.

KV cache: megatron-core's own `StaticInferenceContext`, passed to `GPTModel.forward` as
`inference_context`; its attention writes each step's keys and values into per-layer
buffers and attends over the cached prefix (this runs on CPU through the bridge).

Vocabulary parallelism: in inference mode GPTModel insists on gathering the full-vocab
logits of every TP rank (`runtime_gather_output`). We want the opposite, so the forward
runs with the model's post-processing switched off (it then returns the final-norm hidden
states, `[s, b, h]`) and the output layer is applied to the last position without the
gather: each rank keeps `[b, vocab / TP]`, and sampling combines ranks with small
collectives only:

* greedy: each rank's (max, global id) pair is all-gathered and the best kept;
* temperature: the Gumbel-max trick, argmax(logits / T + g), g ~ Gumbel(0, 1) drawn from a
  seeded generator over the *global* (padded) vocabulary and sliced per rank, so any TP size
  samples the same tokens; with one generator per row, a row's tokens depend on its own
  stream only (not on the other rows of the batch);
* top-p (nucleus, Holtzman et al. 2020): keep the most probable tokens until their mass
  reaches p. The nucleus is found from the ranks' local top-m probabilities, all-gathered and
  merged (the global top-m is inside the union of local top-m's), doubling m until the mass
  reaches p; ties at the threshold probability are all kept.

Prompts of different lengths are left-padded; RoPE depends on relative positions only, so
a left-padded prompt (padding masked out of attention) sees the same scores as unpadded.
Rows stop at EOS (which is kept and learned) or at `max_new_tokens`.

Sequence parallelism (`--sequence-parallel`) is switched off while sampling: a decoding
step feeds one new position per row, which cannot be split over the TP ranks along the
sequence. The layers compute the same numbers either way (only where the activations between
the tensor-parallel regions live changes), so the samples are those of the SP-less model.

Context parallelism (`--context-parallel-size`) is switched off too: CP shards no weights,
so every CP rank decodes the whole rows alone (the log-prob and update passes split them);
CP rank 0's samples are then broadcast over the CP group.

Pipeline parallelism: every stage keeps its own KV cache; at each step a stage receives the
previous stage's hidden states for the new positions, runs its layers and sends its output
on; the last stage samples and broadcasts the new tokens (and their log-probs) to the
pipeline group, so every stage holds the same sequences and all stop together.

Interleaved pipeline (`--num-layers-per-virtual-pipeline-stage`): each rank holds several
model chunks, chunk v of stage s holding the layers of virtual stage v x PP + s. A decode
step visits them in layer order, chunk 0 of every stage, then chunk 1 of every stage, ...:
each chunk receives from the previous rank (a first stage's later chunk from the last
stage, whose previous chunk it continues) and sends to the next, and keeps a KV cache of
its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_kaja.parallel.distributed import compute_device, tensor_parallel_group
from megatron_kaja.rl.losses import mask_padded_vocab

# Sampling randomness: one stream for the whole batch, or one generator per row.
SamplingGenerator = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """A batch of sampled sequences: left-padded prompts, then right-padded responses."""

    prompt_ids: torch.Tensor  # [b, P] long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [b, P] bool, True on real prompt tokens
    response_ids: torch.Tensor  # [b, N] long, pad after EOS
    response_mask: torch.Tensor  # [b, N] bool, True on generated tokens (EOS included)
    logprobs: torch.Tensor  # [b, N] float, log softmax(logits / T) of each sampled token

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_valid(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    def responses(self) -> list[list[int]]:
        """Each row's generated ids, EOS included."""
        return [
            ids[mask].tolist()
            for ids, mask in zip(self.response_ids, self.response_mask, strict=True)
        ]


def causal_padding_mask(valid: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
    """megatron's bool attention mask `[b, 1, q, k]` (True = masked) for the last `q` query
    positions over keys `valid` `[b, k]`: causal, and padding keys hidden."""
    k = valid.size(1)
    q = k if num_queries is None else num_queries
    query_pos = torch.arange(k - q, k, device=valid.device).unsqueeze(1)
    future = torch.arange(k, device=valid.device).unsqueeze(0) > query_pos  # [q, k]
    return future.unsqueeze(0).unsqueeze(0) | ~valid[:, None, None, :]


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None):
    """`(ids [b, P], mask [b, P])` with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids, mask


def model_chunks(model) -> list:
    """This rank's model chunks: `model` itself, or the list of them under an interleaved
    pipeline (in the order megatron-core builds them, chunk v = virtual stage v)."""
    return list(model) if isinstance(model, list | tuple) else [model]


def holds_whole_model(model) -> bool:
    """Whether this rank's chunks are the whole model (no pipeline stages to pass between)."""
    chunks = model_chunks(model)
    return len(chunks) == 1 and chunks[0].pre_process and chunks[0].post_process


@contextlib.contextmanager
def _hidden_states_only(model):
    """GPTModel.forward returns final-norm hidden states `[s, b, h]` instead of logits."""
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


# The attributes megatron-core's modules copy from `config.sequence_parallel` when built and
# read at forward time (the linear layers, the vocab-parallel embedding, transformer-engine's
# modules); megatron-core's own inference switches the same ones
# (`transformer.utils.set_model_to_sequence_parallel`, 0.16.1).
_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def _attributes_set(changes: list[tuple[object, str, object]]):
    """Set each (owner, attribute, value) of `changes` inside the block and restore what
    every attribute held before afterwards, also on failure (an owner may come twice)."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in changes]
    for owner, attr, value in changes:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def _modules(model):
    return (m for chunk in model_chunks(model) for m in chunk.modules())


def sequence_parallel_off(model):
    """Run `model` (a module, or a list of chunks) without sequence parallelism inside the
    block, and restore every switch as it was afterwards: its config objects'
    `sequence_parallel` (read by the embedding, RoPE and the transformer block at forward
    time) and the copies its modules took."""
    changes = []
    for module in _modules(model):
        if getattr(getattr(module, "config", None), "sequence_parallel", False):
            changes.append((module.config, "sequence_parallel", False))
        changes += [
            (module, a, False) for a in _SEQUENCE_PARALLEL_ATTRS if module.__dict__.get(a) is True
        ]
    return _attributes_set(changes)


@contextlib.contextmanager
def context_parallel_off(model):
    """Run `model` (a module, or a list of chunks) without context parallelism inside the
    block, and restore every switch afterwards. CP shards no weights, so each CP rank can
    decode whole rows alone. What megatron-core 0.16.1 and our attention read of CP at
    forward time: the configs' `context_parallel_size` (RoPE's `get_rotary_seq_len` multiplies
    the table's length by it), RoPE's `cp_group` (it keeps this rank's chunks of the table)
    and `SDPAttention.cp_group` (it gathers keys and values over it)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_kaja.models.llama.sdpa import SDPAttention

    changes = []
    for module in _modules(model):
        if getattr(getattr(module, "config", None), "context_parallel_size", 1) > 1:
            changes.append((module.config, "context_parallel_size", 1))
        if isinstance(module, RotaryEmbedding | SDPAttention) and module.cp_group is not None:
            changes.append((module, "cp_group", None))
    # RoPE's forward is an lru_cache keyed by its arguments, not by `cp_group`: a table made
    # with CP off would be served to the split forwards after it (and the other way round).
    RotaryEmbedding.forward.cache_clear()
    try:
        with _attributes_set(changes):
            yield
    finally:
        RotaryEmbedding.forward.cache_clear()


def _share_over_context_parallel(model, *tensors: torch.Tensor) -> None:
    """Overwrite `tensors` with CP rank 0's on every rank of its CP group. The CP ranks decode
    the same rows with the same weights and seeds, so they sample the same tokens already;
    the broadcast makes that exact whatever the kernels' reduction order."""
    if model_chunks(model)[0].config.context_parallel_size == 1:
        return
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()
    for tensor in tensors:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)


def last_token_logits(model, tokens, valid, inference_context=None) -> torch.Tensor:
    """This rank's vocab-parallel logits `[b, vocab / TP]` after the last of `tokens`.

    With `inference_context`, `tokens` are the new positions only and `valid` covers the
    cached prefix plus them; without, `tokens` is the whole sequence.
    """
    b, s = tokens.shape
    mask = causal_padding_mask(valid, s)
    positions = torch.arange(valid.size(1) - s, valid.size(1), device=tokens.device).expand(b, s)
    with _hidden_states_only(model):
        hidden = model(
            tokens,
            positions,
            mask,
            inference_context=inference_context,
            runtime_gather_output=True,  # required by GPTModel's assert; unused without logits
        )
    logits, _ = model.output_layer(hidden[-1:], runtime_gather_output=False)
    return logits[0]


def stage_last_token_logits(model, tokens, valid, inference_context=None):
    """`last_token_logits` for this rank's pipeline stage: a non-first stage takes its input
    from the previous stage, a non-last stage sends its output on and returns None.

    `model` may be the list of this rank's chunks (interleaved pipeline), with one
    `inference_context` per chunk (or None): they run in turn, each between its neighbours
    in layer order (chunk v of the last stage hands over to chunk v + 1 of the first)."""
    chunks = model_chunks(model)
    contexts = inference_context
    if not isinstance(contexts, list):
        contexts = [inference_context] * len(chunks)  # None (no KV cache), or one chunk's
    logits = None
    for chunk, context in zip(chunks, contexts, strict=True):
        logits = _chunk_last_token_logits(chunk, tokens, valid, context)
    return logits


def _chunk_last_token_logits(model, tokens, valid, inference_context):
    """One model chunk's part of `stage_last_token_logits`."""
    if model.pre_process and model.post_process:
        return last_token_logits(model, tokens, valid, inference_context)
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    if not model.pre_process:
        hidden = torch.empty(
            (s, b, model.config.hidden_size), dtype=model.config.params_dtype, device=tokens.device
        )
        # The previous rank in the pipeline group, wrapping around from the first stage to
        # the last (megatron-core's rank arithmetic is modulo PP): a first stage's later chunk
        # continues from the last stage's previous chunk.
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    if model.post_process:
        return last_token_logits(model, tokens, valid, inference_context)
    positions = torch.arange(valid.size(1) - s, valid.size(1), device=tokens.device).expand(b, s)
    hidden = model(
        tokens,
        positions,
        causal_padding_mask(valid, s),
        inference_context=inference_context,
        runtime_gather_output=True,  # GPTModel asserts it under inference; no logits here
    )
    dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return None


def _share_from_last_stage(model, ids: torch.Tensor, logprobs: torch.Tensor):
    """The last pipeline stage's sampled ids and log-probs, on every stage."""
    if holds_whole_model(model):
        return ids, logprobs
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(ids, src=src, group=group)
    dist.broadcast(logprobs, src=src, group=group)
    return ids, logprobs


def _global_argmax(scores: torch.Tensor, group, world: int, rank: int) -> torch.Tensor:
    """Global vocabulary id of each row's max over all TP ranks' slices (first id on ties)."""
    value, local = scores.max(dim=-1)
    index = local + rank * scores.size(-1)
    if world == 1:
        return index
    values = [torch.empty_like(value) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(values, value.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    # Ranks hold ascending id ranges, so the first rank with the max has the smallest id.
    best = torch.stack(values).argmax(dim=0)
    return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)


def _log_partition(scaled: torch.Tensor, group, world: int) -> torch.Tensor:
    """logsumexp over the global vocabulary of vocab-parallel `scaled` `[b, v]`."""
    top = scaled.max(dim=-1).values
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(scaled - top.unsqueeze(-1)).sum(dim=-1)
    if world > 1:
        dist.all_reduce(total, group=group)
    return top + total.log()


def _pick(scores: torch.Tensor, ids: torch.Tensor, rank: int, group, world: int) -> torch.Tensor:
    """scores[row, ids[row]] for global ids, from whichever rank holds them."""
    width = scores.size(-1)
    local = ids - rank * width
    here = (local >= 0) & (local < width)
    picked = scores.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(here, picked, torch.zeros_like(picked))
    if world > 1:
        dist.all_reduce(picked, group=group)
    return picked


def _nucleus_threshold(probs: torch.Tensor, top_p: float, group, world: int) -> torch.Tensor:
    """Per row, the smallest probability inside the top-p nucleus (global over TP ranks)."""
    width = probs.size(-1)
    m = min(64, width)
    while True:
        local_top = probs.topk(m, dim=-1).values  # [b, m], descending
        if world > 1:
            parts = [torch.empty_like(local_top) for _ in range(world)]
            dist.all_gather(parts, local_top.contiguous(), group=group)
            local_top = torch.cat(parts, dim=-1)
        merged = local_top.sort(dim=-1, descending=True).values
        if m < width:
            merged = merged[:, :m]  # the exact global top-m (beyond it ranks may miss some)
        reached = merged.cumsum(dim=-1) >= top_p
        if bool(reached.any(dim=-1).all()) or m == width:
            # Nucleus size K = first position where the mass reaches p (everything if never).
            last = torch.full_like(reached[:, 0], merged.size(-1) - 1, dtype=torch.long)
            k = torch.where(reached.any(dim=-1), reached.float().argmax(dim=-1), last)
            return merged.gather(-1, k.unsqueeze(-1)).squeeze(-1)
        m = min(2 * m, width)


def gumbel_uniforms(
    rows: int, vocab_size: int, generator: SamplingGenerator, device
) -> torch.Tensor:
    """`[rows, vocab_size]` uniforms for the Gumbel-max draw: from one stream, or row i's from
    `generator[i]` (so a row's draw does not depend on the batch it is in)."""
    if isinstance(generator, list):
        if len(generator) != rows:
            raise ValueError(f"{len(generator)} generators for {rows} rows")
        # Filled in place, each row on its generator's device (no per-row tensors to stack).
        noise = torch.empty((rows, vocab_size), device=generator[0].device if rows else device)
        for row, g in zip(noise, generator, strict=True):
            row.uniform_(generator=g)
        return noise.to(device)
    return torch.rand((rows, vocab_size), generator=generator, device=device)


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    vocab_size: int,
    generator: SamplingGenerator = None,
    tensor_parallel: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from vocab-parallel `logits` `[b, vocab / TP]`.

    Returns `(ids [b], logprobs [b])`: global token ids (identical on every TP rank) and
    log softmax(logits / T) of each (T = 1 for greedy), the untruncated sampling policy that
    training recomputes. `tensor_parallel`: `(group, world, rank)` of the vocabulary split
    (default: megatron's tensor-parallel group; `(None, 1, 0)` for logits held whole).
    """
    group, world, rank = tensor_parallel or tensor_parallel_group()
    x = mask_padded_vocab(logits, vocab_size, rank)
    temperature = 1.0 if params.greedy else params.temperature
    scaled = x / temperature
    log_z = _log_partition(scaled, group, world)
    if params.greedy:
        ids = _global_argmax(x, group, world, rank)
    else:
        scores = scaled
        if params.top_p < 1.0:
            probs = torch.exp(scaled - log_z.unsqueeze(-1))
            threshold = _nucleus_threshold(probs, params.top_p, group, world)
            scores = scores.masked_fill(probs < threshold.unsqueeze(-1), float("-inf"))
        # Noise over the real vocabulary, identical on every rank and for every TP size (the
        # padding differs with TP); padded ids are -inf already and take a dummy draw.
        b, width = scores.shape
        u = torch.full_like(scores, 0.5)
        drawn = gumbel_uniforms(b, vocab_size, generator, scores.device)
        start, end = rank * width, min((rank + 1) * width, vocab_size)
        if end > start:
            u[:, : end - start] = drawn[:, start:end]
        u = u.clamp_(min=1e-20, max=1.0 - 1e-7)
        ids = _global_argmax(scores - torch.log(-torch.log(u)), group, world, rank)
    logprobs = _pick(scaled, ids, rank, group, world) - log_z
    return ids, logprobs


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    generator: SamplingGenerator = None,
    use_kv_cache: bool = True,
) -> Generation:
    """Sample a response to each prompt (token ids) with this rank's stage of `model` (a
    GPTModel, or the list of this rank's chunks under an interleaved pipeline).

    Every tensor-parallel rank must call this with the same prompts and an identically
    seeded `generator` (data-parallel ranks: different prompts or seeds); a list of
    generators gives each row its own stream. `use_kv_cache=False`
    recomputes the whole sequence at every step (the reference the cache is tested against).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    device = compute_device()
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    b, width = prompt_ids.shape
    total = width + params.max_new_tokens
    tokens = torch.cat(
        [prompt_ids, torch.full((b, params.max_new_tokens), pad_token_id, device=device)], dim=1
    )
    valid = torch.cat([prompt_mask, torch.zeros_like(tokens[:, width:], dtype=torch.bool)], dim=1)
    logprobs = torch.zeros((b, params.max_new_tokens), device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    chunks = model_chunks(model)
    # One KV cache per chunk: each holds its own layers' keys and values.
    contexts = [StaticInferenceContext(b, total) if use_kv_cache else None for _ in chunks]
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    steps = 0
    with sequence_parallel_off(chunks), context_parallel_off(chunks):
        try:
            for step in range(params.max_new_tokens):
                end = width + step
                if not use_kv_cache:
                    logits = stage_last_token_logits(
                        chunks, tokens[:, :end], valid[:, :end], inference_context=contexts
                    )
                else:
                    start = 0 if step == 0 else end - 1
                    logits = stage_last_token_logits(
                        chunks, tokens[:, start:end], valid[:, :end], inference_context=contexts
                    )
                    for context in contexts:
                        context.sequence_len_offset = end
                        context.enable_decode_mode()
                if logits is not None:  # the last pipeline stage samples
                    ids, lp = sample_next_token(
                        logits, params, vocab_size=vocab_size, generator=generator
                    )
                    lp = lp.float()
                else:
                    ids = torch.empty(b, dtype=torch.long, device=device)
                    lp = torch.empty(b, dtype=torch.float32, device=device)
                ids, lp = _share_from_last_stage(chunks, ids, lp)
                tokens[:, end] = torch.where(finished, torch.full_like(ids, pad_token_id), ids)
                valid[:, end] = ~finished
                logprobs[:, step] = torch.where(finished, torch.zeros_like(lp), lp)
                finished |= ids == eos_token_id
                steps = step + 1
                if bool(finished.all()):  # same tokens on every TP rank: all ranks stop together
                    break
        finally:
            for chunk, mode in zip(chunks, was_training, strict=True):
                chunk.train(mode)
    steps_done = torch.tensor([steps], device=device)
    _share_over_context_parallel(chunks, tokens, valid, logprobs, steps_done)
    steps = int(steps_done)
    return Generation(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=tokens[:, width : width + steps],
        response_mask=valid[:, width : width + steps],
        logprobs=logprobs[:, :steps],
    )
