"""The one HF <-> megatron-core key map for llm-jp-3, used in both directions.

Tensors are handled in three forms:

* **HF**: `model.layers.{i}.self_attn.q_proj.weight`, ... as in `LlamaForCausalLM`.
* **global**: the megatron tensor of one layer before tensor-parallel splitting, in megatron's
  layout (fused QKV grouped by KV head; fc1 = cat(gate, up)), vocab padded. This is also what a
  torch_dist checkpoint stores (per layer along a leading layer axis), so it is TP/PP-free.
* **local**: one TP rank's slice of a global tensor, as a GPTModel's `state_dict()` holds it.

QKV fusion (nh heads, ng KV groups, d head_dim, H hidden)::

    qkv = cat([q.view(ng, nh//ng*d, H), k.view(ng, d, H), v.view(ng, d, H)], dim=1).view(-1, H)

so each TP rank's contiguous chunk holds whole KV groups (needs ng % TP == 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_kaja.models.llama.config import LlamaArch

# How a global tensor is split across tensor-parallel ranks.
REPLICATED, ROWS, COLUMNS, SWIGLU = "replicated", "rows", "columns", "swiglu"


def fuse_qkv(arch: LlamaArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ng, d, hidden = arch.num_query_groups, arch.head_dim, q.shape[-1]
    return torch.cat(
        [
            q.reshape(ng, arch.heads_per_group * d, hidden),
            k.reshape(ng, d, hidden),
            v.reshape(ng, d, hidden),
        ],
        dim=1,
    ).reshape(-1, hidden)


def split_qkv(arch: LlamaArch, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ng, d, hidden = arch.num_query_groups, arch.head_dim, qkv.shape[-1]
    q, k, v = qkv.reshape(ng, (arch.heads_per_group + 2) * d, hidden).split(
        [arch.heads_per_group * d, d, d], dim=1
    )
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_vocab(tensor: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Pad rows up to `padded_size` with zeros (Megatron's padded vocabulary)."""
    extra = padded_size - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {tensor.shape[0]} is larger than the padded size {padded_size}")
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))])


@dataclass(frozen=True)
class TensorMapping:
    """One megatron tensor and the HF tensors it is made of.

    `local` / `te` are the GPTModel state-dict names under the local and transformer-engine
    specs (relative to `decoder.layers.{i}.` for layer tensors); `dist` the torch_dist key.
    """

    local: str
    te: str
    hf: tuple[str, ...]
    tp_split: str
    to_global: Callable[..., torch.Tensor] | None = None  # (arch, *hf) -> global
    to_hf: Callable[..., tuple[torch.Tensor, ...]] | None = None  # (arch, global) -> hf
    is_vocab: bool = False

    def name(self, transformer_impl: str) -> str:
        return self.te if transformer_impl == "transformer_engine" else self.local

    def global_from_hf(
        self, arch: LlamaArch, hf_tensors: Sequence[torch.Tensor], padded_vocab: int
    ):
        if self.to_global is not None:
            return self.to_global(arch, *hf_tensors)
        (tensor,) = hf_tensors
        return pad_vocab(tensor, padded_vocab) if self.is_vocab else tensor

    def hf_from_global(self, arch: LlamaArch, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.to_hf is not None:
            return self.to_hf(arch, tensor)
        return (tensor[: arch.vocab_size] if self.is_vocab else tensor,)


def _hf_layer(name: str) -> str:
    return f"model.layers.{{i}}.{name}"


LAYER_MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping(
        local="input_layernorm.weight",
        te="self_attention.linear_qkv.layer_norm_weight",
        hf=(_hf_layer("input_layernorm.weight"),),
        tp_split=REPLICATED,
    ),
    TensorMapping(
        local="self_attention.linear_qkv.weight",
        te="self_attention.linear_qkv.weight",
        hf=tuple(_hf_layer(f"self_attn.{p}_proj.weight") for p in "qkv"),
        tp_split=ROWS,
        to_global=fuse_qkv,
        to_hf=split_qkv,
    ),
    TensorMapping(
        local="self_attention.linear_proj.weight",
        te="self_attention.linear_proj.weight",
        hf=(_hf_layer("self_attn.o_proj.weight"),),
        tp_split=COLUMNS,
    ),
    TensorMapping(
        local="pre_mlp_layernorm.weight",
        te="mlp.linear_fc1.layer_norm_weight",
        hf=(_hf_layer("post_attention_layernorm.weight"),),
        tp_split=REPLICATED,
    ),
    TensorMapping(
        local="mlp.linear_fc1.weight",
        te="mlp.linear_fc1.weight",
        hf=(_hf_layer("mlp.gate_proj.weight"), _hf_layer("mlp.up_proj.weight")),
        tp_split=SWIGLU,
        to_global=lambda arch, gate, up: torch.cat([gate, up]),
        to_hf=lambda arch, fc1: tuple(fc1.chunk(2)),
    ),
    TensorMapping(
        local="mlp.linear_fc2.weight",
        te="mlp.linear_fc2.weight",
        hf=(_hf_layer("mlp.down_proj.weight"),),
        tp_split=COLUMNS,
    ),
)

# Where each mapping lives in the pipeline: first stage, every stage's layers, last stage.
EMBEDDING = TensorMapping(
    local="embedding.word_embeddings.weight",
    te="embedding.word_embeddings.weight",
    hf=("model.embed_tokens.weight",),
    tp_split=ROWS,
    is_vocab=True,
)
FINAL_NORM = TensorMapping(
    local="decoder.final_layernorm.weight",
    te="decoder.final_layernorm.weight",
    hf=("model.norm.weight",),
    tp_split=REPLICATED,
)
OUTPUT_LAYER = TensorMapping(
    local="output_layer.weight",
    te="output_layer.weight",
    hf=("lm_head.weight",),
    tp_split=ROWS,
    is_vocab=True,
)
GLOBAL_MAPPINGS = (EMBEDDING, FINAL_NORM, OUTPUT_LAYER)

# Linear modules that carry an `_extra_state` entry in a GPTModel state dict (FP8 metadata
# under transformer-engine; None under the local spec). The SDPA spec is the local spec with a
# stateless core attention, so its state dict is the local spec's.
_LOCAL_EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
LAYER_EXTRA_STATE_MODULES = {
    "local": _LOCAL_EXTRA_STATE_MODULES,
    "sdpa": _LOCAL_EXTRA_STATE_MODULES,
    "transformer_engine": ("self_attention.core_attention", *_LOCAL_EXTRA_STATE_MODULES),
}


def dist_key(mapping: TensorMapping) -> str:
    """The torch_dist checkpoint key (megatron uses TE names for both specs)."""
    return f"decoder.layers.{mapping.te}" if mapping in LAYER_MAPPINGS else mapping.te


def layer_key(mapping: TensorMapping, layer: int, transformer_impl: str) -> str:
    return f"decoder.layers.{layer}.{mapping.name(transformer_impl)}"


def hf_keys(mapping: TensorMapping, layer: int | None = None) -> tuple[str, ...]:
    return tuple(k.format(i=layer) for k in mapping.hf)


def all_hf_keys(arch: LlamaArch) -> list[str]:
    """Every tensor an llm-jp-3 HF checkpoint of this architecture must hold."""
    keys = [k for m in GLOBAL_MAPPINGS for k in hf_keys(m)]
    for i in range(arch.num_layers):
        keys += [k for m in LAYER_MAPPINGS for k in hf_keys(m, i)]
    return keys


def hf_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor shapes, for validation before anything is written."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (arch.vocab_size, h),
    }
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def global_shape(mapping: TensorMapping, arch: LlamaArch, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the global (TP-unsplit) megatron tensor of `mapping`."""
    h, d = arch.hidden_size, arch.head_dim
    if mapping.is_vocab:
        return (padded_vocab, h)
    if mapping.to_global is fuse_qkv:
        return ((arch.num_attention_heads + 2 * arch.num_query_groups) * d, h)
    if mapping.tp_split == SWIGLU:
        return (2 * arch.ffn_hidden_size, h)
    shapes = hf_shapes(arch)
    return shapes[hf_keys(mapping, 0)[0]]


def tp_slice(mapping: TensorMapping, tensor: torch.Tensor, tp_size: int, tp_rank: int):
    """This TP rank's slice of a global tensor."""
    if mapping.tp_split == REPLICATED or tp_size == 1:
        return tensor
    if mapping.tp_split == ROWS:
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if mapping.tp_split == COLUMNS:
        return tensor.chunk(tp_size, dim=1)[tp_rank]
    gate, up = tensor.chunk(2, dim=0)  # SWIGLU: each half is split separately
    return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])


def tp_merge(mapping: TensorMapping, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `tp_slice` over all ranks' slices (in rank order)."""
    if mapping.tp_split == REPLICATED or len(shards) == 1:
        return shards[0]
    if mapping.tp_split == ROWS:
        return torch.cat(list(shards), dim=0)
    if mapping.tp_split == COLUMNS:
        return torch.cat(list(shards), dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the decoder layers on pipeline stage `pp_rank` (even split)."""
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
