"""Attention backends, registered by name (`--transformer-impl`): each owns its layer spec and
how a batch of packed rows is fed to a model built with it.

Packed rows hold several samples; attention must stay inside a sample:
- `transformer_engine`: the THD layout (the micro-batch's rows flattened into one packed
  sequence delimited by `cu_seqlens`; no padding compute, positions restart per sample);
- `sdpa`: the samples' boundaries (`cu_seqlens`); on GPU torch's varlen flash kernel attends
  within them;
- `local`: a per-sample causal mask `[b, 1, s, s]`.
Outside THD, megatron's RoPE numbers a row's tokens 0..s-1 rather than per sample; as attention
stays inside a sample and RoPE scores depend only on relative positions, this equals
restarting positions up to rounding.

Context parallelism (`--context-parallel-size`) splits packed rows on `sdpa` only; the other
backends say why not (`context_parallel_refusal`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar


class AttentionBackend:
    """One attention backend: its layer spec and its way of feeding packed rows."""

    name: str = ""
    # Why this backend cannot split packed rows over context-parallel ranks (None: it can).
    context_parallel_refusal: ClassVar[str | None] = None

    def layer_spec(self):
        """The megatron-core `ModuleSpec` of one llm-jp-3 decoder layer."""
        raise NotImplementedError

    def final_norm(self):
        """The norm after the last decoder layer: our `RMSNorm` (sequence parallel capable)."""
        from megatron_kaja.models.llama.norm import RMSNorm

        return RMSNorm

    def schedule_shape(self, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
        """(sequence length, micro-batch size) of the activations passed between pipeline
        stages for micro-batches of `micro_batch_size` rows of `seq_length` tokens."""
        return seq_length, micro_batch_size

    def forward(self, model, batch: dict):
        """Run `model` on a packed batch (`tokens`, `position_ids`, `cu_seqlens`, ...).

        Returns (output, batch): the output's per-token layout is the returned batch's (the
        same batch, or its token tensors reshaped), so a loss reads labels and mask from it.
        """
        raise NotImplementedError


_BACKENDS: dict[str, AttentionBackend] = {}


def register_attention_backend(name: str) -> Callable[[type], type]:
    """Class decorator: make an attention backend selectable as `--transformer-impl NAME`."""

    def wrap(cls: type) -> type:
        cls.name = name
        _BACKENDS[name] = cls()
        return cls

    return wrap


def attention_backend_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_BACKENDS)


def attention_backend(name: str) -> AttentionBackend:
    """The backend registered as `name` (ValueError naming the choices otherwise)."""
    if name not in _BACKENDS:
        raise ValueError(
            f"transformer impl {name!r}: use one of {', '.join(attention_backend_names())}"
        )
    return _BACKENDS[name]


@register_attention_backend("local")
class LocalAttention(AttentionBackend):
    """megatron-core's local spec; packed rows through a per-sample causal bool mask."""

    context_parallel_refusal = (
        "megatron-core's local DotProductAttention takes no context parallelism; "
        "use --transformer-impl sdpa"
    )

    def layer_spec(self):
        from megatron.core.models.gpt import gpt_layer_specs

        from megatron_kaja.models.llama.norm import with_rmsnorm

        # Our RMSNorm: megatron-core's torch fallback (no apex) refuses sequence parallelism.
        return with_rmsnorm(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))

    def forward(self, model, batch: dict):
        from megatron_kaja.data.batch import build_attention_mask

        b, s = batch["tokens"].shape
        mask = build_attention_mask(batch["cu_seqlens"], b, s)
        return model(batch["tokens"], batch["position_ids"], mask), batch


@register_attention_backend("sdpa")
class SDPAAttentionBackend(AttentionBackend):
    """torch SDPA core attention (`models/llama/sdpa.py`); packed rows through `cu_seqlens`.

    Under context parallelism each rank feeds its zigzag chunks of the rows
    (`parallel/context_parallel.py`) with the full rows' `cu_seqlens`, and returns that part of
    the batch: the loss reads the rank's labels and mask (and answer numbers, in DPO). The
    pipeline schedule divides the row length by CP itself (megatron-core's
    `get_tensor_shapes`).
    """

    def layer_spec(self):
        from megatron_kaja.models.llama.norm import with_rmsnorm
        from megatron_kaja.models.llama.sdpa import sdpa_layer_spec

        return with_rmsnorm(sdpa_layer_spec())

    def forward(self, model, batch: dict):
        from megatron.core import parallel_state as ps

        from megatron_kaja.models.llama.sdpa import packed_seq_params
        from megatron_kaja.parallel.context_parallel import split_batch_for_context_parallel

        s = batch["tokens"].shape[1]
        cp = ps.get_context_parallel_world_size()
        if cp > 1:
            batch = split_batch_for_context_parallel(batch, cp, ps.get_context_parallel_rank())
        params = packed_seq_params(batch["cu_seqlens"], s)
        return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params), batch


@register_attention_backend("transformer_engine")
class TransformerEngineAttention(AttentionBackend):
    """transformer-engine's spec; packed rows as one THD sequence per micro-batch."""

    # TE's ring attention over THD needs every sample padded to a multiple of 2 x CP and cut
    # into 2 x CP chunks (`cu_seqlens_q_padded`): the packer does not pad so.
    context_parallel_refusal = (
        "packed rows would need the THD layout with every sample padded to a multiple of "
        "2 x CP, which is not built; use --transformer-impl sdpa"
    )

    def layer_spec(self):
        from megatron.core.models.gpt import gpt_layer_specs

        from megatron_kaja.extras import require

        require("transformer_engine", "the transformer-engine layer spec")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()

    def final_norm(self):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm

    def schedule_shape(self, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
        # THD: each micro-batch travels between pipeline stages as one packed sequence.
        return seq_length * micro_batch_size, 1

    def forward(self, model, batch: dict):
        from megatron.core.packed_seq_params import PackedSeqParams

        from megatron_kaja.data.batch import TOKEN_FIELDS

        b, s = batch["tokens"].shape
        flat = {k: batch[k].reshape(1, b * s) for k in TOKEN_FIELDS if k in batch}
        max_seqlen = int(batch["max_seqlen"])
        params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=batch["cu_seqlens"],
            cu_seqlens_kv=batch["cu_seqlens"],
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
        return model(flat["tokens"], flat["position_ids"], None, packed_seq_params=params), flat
