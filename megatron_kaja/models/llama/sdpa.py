"""Core attention through `torch.nn.functional.scaled_dot_product_attention`, and its layer spec.

Without transformer-engine, megatron-core's local spec computes attention unfused (baddbmm,
softmax over a materialized `[b, heads, s, s]` score tensor, bmm). `SDPAttention` is a drop-in
replacement for its `DotProductAttention` (same constructor and forward, no parameters, so the
state dict is the local spec's): torch then picks a flash / memory-efficient kernel on GPU.

Packed rows (several samples per row) must not attend across samples:
- `packed_seq_params` with `cu_seqlens` (what `megatron_kaja.training` passes for this spec):
  on CUDA in fp16 / bf16, without attention dropout, torch's flash varlen kernel
  (`varlen_attn`) attends within each `cu_seqlens` segment of the micro-batch flattened to
  b*s tokens; elsewhere the segments become a block-causal mask;
- megatron's bool `attention_mask` (True = masked out) is inverted to SDPA's convention
  (True = may attend);
- no mask at all: plain causal attention (`is_causal=True`).

Context parallelism (CP > 1): each rank holds its zigzag chunks of every row
(`parallel/context_parallel.py`). Keys and values are all-gathered over the CP group (the
backward sums every rank's gradient for them), and the rank's queries attend to them under a
mask built from `cu_seqlens` over the full rows: a query at row position p sees a key at k
iff k <= p in the same sample. The gathered keys stay in rank order; the mask's key axis
follows that order, which gives the same attention as reordering them into the row's.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_kaja.data.batch import build_attention_mask
from megatron_kaja.parallel.context_parallel import (
    gather_sequence,
    gathered_positions,
    zigzag_positions,
)

try:  # torch >= 2.10: flash attention over cu_seqlens segments (CUDA only)
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_KWARGS = set(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn = None
    _VARLEN_KWARGS = set()

# `enable_gqa` (torch >= 2.5) lets SDPA broadcast KV heads over their query group.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPAttention(MegatronModule):
    """Megatron-core core attention (the `DotProductAttention` interface) on torch SDPA.

    forward: query `[s, b, heads_per_partition, head_dim]`, key / value
    `[s, b, groups_per_partition, head_dim]` (or `[t, heads, head_dim]` in the THD packed
    format) -> `[s, b, heads_per_partition * head_dim]`. Tensor parallelism splits heads, so
    each rank attends with its own heads and query groups. Under context parallelism the
    keys and values are gathered over the CP group (module docstring).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(
                "SDPAttention supports vanilla softmax over full causal windows only "
                f"(softmax_type={config.softmax_type!r}, window_size={config.window_size})"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.hidden_size_per_partition = self.heads_per_partition * config.kv_channels
        # Query-key layer scaling divides the scores by layer_number and the softmax multiplies
        # them back (an fp16 overflow guard); the product is 1/sqrt(d), which SDPA applies.
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        if attention_dropout is None:
            attention_dropout = config.attention_dropout
        self.dropout_p = attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        thd = query.dim() == 3  # THD packed format: [t, heads, d], one flattened sequence
        if thd:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        s, b = query.shape[:2]
        dropout_p = self.dropout_p if self.training else 0.0
        if self.cp_group is not None:
            if thd or attention_mask is not None:
                raise ValueError(
                    "SDPAttention with context parallelism takes [s, b, ...] rows and their "
                    "cu_seqlens (qkv_format sbhd), not THD input or an attention mask"
                )
            key, value, attention_mask = self._gather_context(key, value, packed_seq_params)
            context = self._sdpa(query, key, value, attention_mask, False, dropout_p)
        elif packed_seq_params is not None and self._varlen_usable(query, dropout_p):
            context = self._varlen(query, key, value, packed_seq_params)
        else:
            if packed_seq_params is not None and attention_mask is None:
                attention_mask = build_attention_mask(packed_seq_params.cu_seqlens_q, b, s)
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            context = self._sdpa(query, key, value, attention_mask, causal, dropout_p)
        return context.reshape(s, self.hidden_size_per_partition) if thd else context

    def _gather_context(self, key, value, params: PackedSeqParams | None):
        """The CP group's keys and values `[cp * s, b, ...]` (rank order) and this rank's
        queries' bool mask over them (True = masked out), from the full rows' `cu_seqlens`."""
        group = self.cp_group
        cp, rank = group.size(), group.rank()
        b = key.shape[1]
        row = key.shape[0] * cp
        if params is not None:
            cu_seqlens = params.cu_seqlens_q
        else:  # no packing: each row is one sample
            cu_seqlens = torch.arange(0, (b + 1) * row, row, device=key.device)
        mask = build_attention_mask(
            cu_seqlens,
            b,
            row,
            query_positions=zigzag_positions(row, cp, rank, cu_seqlens.device),
            key_positions=gathered_positions(row, cp, cu_seqlens.device),
        )
        return gather_sequence(key, group), gather_sequence(value, group), mask

    def _sdpa(self, query, key, value, attention_mask, causal: bool, dropout_p: float):
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask
            # A query that may attend nothing (a left-padding position) is NaN under kernels
            # without a safe softmax (torch's CPU path returns 0), and a NaN value poisons
            # every later query through P @ V even where its weight is 0. Megatron's local
            # softmax spreads such a row over all keys; attending everywhere is finite too.
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        gqa = self.heads_per_partition != self.groups_per_partition
        # With an explicit mask torch runs the memory-efficient kernel, which (unlike flash and
        # math) may not take `enable_gqa`: expand KV there rather than fall back to math.
        native_gqa = gqa and _SDPA_HAS_GQA and allowed is None
        if gqa and not native_gqa:
            repeat = self.heads_per_partition // self.groups_per_partition
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        kwargs = {"enable_gqa": True} if native_gqa else {}

        def attend():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                dropout_p=dropout_p,
                is_causal=causal and allowed is None,
                scale=self.softmax_scale,
                **kwargs,
            )

        if dropout_p > 0 and not self.config.sequence_parallel:
            # As DotProductAttention: dropout draws from the tensor-parallel RNG stream, so
            # each rank's heads get their own masks and activation recompute replays them.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = attend()
        else:
            out = attend()
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    @staticmethod
    def _varlen_usable(query: torch.Tensor, dropout_p: float) -> bool:
        # torch's varlen kernel is flash attention: fp16 / bf16 only (fp32 runs take the
        # masked path).
        return (
            varlen_attn is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and dropout_p == 0.0
        )

    def _varlen(self, query, key, value, params: PackedSeqParams):
        """Flash attention per `cu_seqlens` segment of the micro-batch flattened to b*s tokens."""
        s, b = query.shape[:2]

        def flat(t):  # [s, b, n, d] -> [b*s, n, d], row-major like cu_seqlens
            return t.transpose(0, 1).reshape(b * s, t.shape[2], t.shape[3])

        q, k, v = flat(query), flat(key), flat(value)
        kwargs = {"scale": self.softmax_scale}
        # torch 2.10 takes `is_causal`; later versions a (left, right) window, (-1, 0) = causal.
        if "window_size" in _VARLEN_KWARGS:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if self.heads_per_partition != self.groups_per_partition:
            if "enable_gqa" in _VARLEN_KWARGS:
                kwargs["enable_gqa"] = True
            else:
                repeat = self.heads_per_partition // self.groups_per_partition
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        cu_q = params.cu_seqlens_q.to(torch.int32)
        cu_k = (params.cu_seqlens_kv if params.cu_seqlens_kv is not None else cu_q).to(torch.int32)
        out = varlen_attn(
            q,
            k,
            v,
            cu_q,
            cu_k,
            params.max_seqlen_q or s,
            params.max_seqlen_kv or s,
            **kwargs,
        )
        # [b*s, n, d] -> [s, b, n * d]
        return out.view(b, s, -1).transpose(0, 1).contiguous()


def packed_seq_params(cu_seqlens: torch.Tensor, seq_length: int) -> PackedSeqParams:
    """`PackedSeqParams` for `SDPAttention` from a micro-batch's `cu_seqlens` (over b*s tokens).

    The rows keep megatron's `[s, b]` layout ("sbhd"; RoPE numbers each row 0..s-1, which
    equals per-sample positions since RoPE scores depend only on relative positions). The
    longest segment is bounded by the row length: the exact maximum would need a device sync.
    Under context parallelism `seq_length` is the full rows' length: megatron-core sizes its
    RoPE table from it and each rank takes its chunks of the table.
    """
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=seq_length,
        max_seqlen_kv=seq_length,
    )


def sdpa_layer_spec():
    """megatron-core's local llm-jp-3 layer spec with `SDPAttention` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=SDPAttention),
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention)
    )
