"""Build an llm-jp-3 `GPTModel` (one pipeline stage of it) on megatron-core."""

from __future__ import annotations

from megatron_kaja.extras import is_available
from megatron_kaja.models.llama.attention import (
    attention_backend,
    attention_backend_names,
)
from megatron_kaja.models.llama.config import LlamaArch, padded_vocab_size, transformer_config

TRANSFORMER_IMPLS = attention_backend_names()


def default_transformer_impl() -> str:
    """transformer-engine on a GPU machine that has it, else the SDPA spec on GPU (flash /
    memory-efficient kernels); megatron-core's local spec on CPU."""
    import torch

    if not torch.cuda.is_available():
        return "local"
    return "transformer_engine" if is_available("transformer_engine") else "sdpa"


def layer_spec(transformer_impl: str = "local"):
    """The megatron-core `ModuleSpec` of one llm-jp-3 decoder layer."""
    return attention_backend(transformer_impl).layer_spec()


def build_gpt_model(
    arch: LlamaArch,
    *,
    transformer_impl: str = "local",
    make_vocab_size_divisible_by: int = 128,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vocab_size_override: int | None = None,
    **config_kwargs,
):
    """Build this rank's stage of the model; megatron parallel state must be initialized.

    `config_kwargs` go to `transformer_config` (bf16, recompute, dropout, ...). The TP and
    PP sizes come from the initialized parallel state. The padded vocabulary is Megatron's
    rule unless `vocab_size_override` (e.g. a checkpoint's padded size) is given.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(
        arch, tensor_parallel_size=tp, pipeline_parallel_size=pp, **config_kwargs
    )
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(transformer_impl),
        vocab_size=vocab_size_override
        or padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
    )
