"""A live GPTModel's weights as HF `LlamaForCausalLM` tensors, in memory.

This is how a rollout engine that runs the HF layout (transformers, vLLM) receives the
trainer's weights after every update: the converter's key map applied to the model's own
tensors instead of a checkpoint. Each tensor-parallel shard is all-gathered over the TP group
and merged, the vocabulary padding is cut, and fused tensors (QKV, gate/up) are split back.

Tensors come in groups (the embedding, each decoder layer, the final norm with the output
layer) so a consumer can load one group at a time and never hold a second full copy of the
model. Every rank of the TP group must iterate in the same order: each group is a collective.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.state_dict import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_MAPPINGS,
    OUTPUT_LAYER,
    REPLICATED,
    TensorMapping,
    hf_keys,
    layer_key,
    stage_layers,
    tp_merge,
)
from megatron_kaja.parallel.distributed import tensor_parallel_group


def _gather_global(mapping: TensorMapping, local: torch.Tensor, group, world: int):
    """The global tensor of `mapping` from every TP rank's `local` slice."""
    if mapping.tp_split == REPLICATED or world == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local.contiguous(), group=group)
    return tp_merge(mapping, shards)


def _hf_tensors(arch, mapping, global_tensor, layer=None) -> list[tuple[str, torch.Tensor]]:
    names = hf_keys(mapping, layer)
    return list(zip(names, mapping.hf_from_global(arch, global_tensor), strict=True))


@torch.no_grad()
def hf_weight_groups(
    model, arch: LlamaArch, transformer_impl: str = "local"
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This pipeline stage's weights as `[(hf_name, tensor), ...]` groups (HF names, global
    layer indices, full unpadded tensors) in the model's dtype and device.

    Collective over the tensor-parallel group: every TP rank must consume the whole iterator.
    """
    from megatron.core import parallel_state as ps

    group, world, _ = tensor_parallel_group()
    own = model.state_dict(keep_vars=False)

    def group_of(mappings, layer=None, local_layer=None):
        out = []
        for mapping in mappings:
            name = (
                layer_key(mapping, local_layer, transformer_impl)
                if layer is not None
                else mapping.name(transformer_impl)
            )
            full = _gather_global(mapping, own[name], group, world)
            out += _hf_tensors(arch, mapping, full, layer)
        return out

    if model.pre_process:
        yield group_of([EMBEDDING])
    layers = stage_layers(
        arch.num_layers,
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
    )
    for local_layer, layer in enumerate(layers):
        yield group_of(LAYER_MAPPINGS, layer, local_layer)
    if model.post_process:
        yield group_of([FINAL_NORM, OUTPUT_LAYER])
