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


def block_spec(transformer_impl: str, config, vp_stage: int | None = None):
    """The decoder block of this rank's pipeline stage (model chunk `vp_stage`): its layers
    and the final norm. Given a bare layer spec, megatron-core picks the final norm itself
    (TE's, apex's, or a torch fallback that refuses sequence parallelism), so the block
    takes it from the attention backend."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    backend = attention_backend(transformer_impl)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[backend.layer_spec()] * count, layer_norm=backend.final_norm()
    )


def build_gpt_model(
    arch: LlamaArch,
    *,
    transformer_impl: str = "local",
    make_vocab_size_divisible_by: int = 128,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vocab_size_override: int | None = None,
    vp_stage: int | None = None,
    **config_kwargs,
):
    """Build this rank's stage of the model; megatron parallel state must be initialized.

    `config_kwargs` go to `transformer_config` (bf16, recompute, dropout, sequence
    parallelism, ...). The TP, PP, virtual-pipeline and context-parallel sizes come from the
    initialized parallel state; `vp_stage` picks the model chunk under interleaving
    (`build_model_chunks` builds them all). The padded vocabulary is Megatron's rule unless
    `vocab_size_override` (e.g. a checkpoint's padded size) is given.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megatron_kaja.parallel.distributed import compute_device

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(
        arch,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        virtual_pipeline_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        **config_kwargs,
    )
    if config.fp8 and transformer_impl != "transformer_engine":
        raise ValueError("--fp8-format needs --transformer-impl transformer_engine")
    refusal = attention_backend(transformer_impl).context_parallel_refusal
    if config.context_parallel_size > 1 and refusal:
        raise ValueError(
            f"--context-parallel-size with --transformer-impl {transformer_impl}: {refusal}"
        )
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(transformer_impl, config, vp_stage),
        vocab_size=vocab_size_override
        or padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
    _norms_in_params_dtype(model, config.params_dtype)
    # With CPU initialization (the CPU machine's default) the weights are made on the host.
    return model.to(compute_device())


def _norms_in_params_dtype(model, params_dtype) -> None:
    """Give the RMSNorm weights the model's parameter dtype, as every other weight has.

    megatron-core 0.16.1's torch norm fallback (`transformer/torch_norm.py`,
    `WrappedTorchNorm`, the norm of the local and SDPA specs without apex or
    transformer-engine) builds `torch.nn.RMSNorm(normalized_shape, eps)` without
    `dtype=config.params_dtype`, so under --bf16 the norm weights stay fp32 while the rest is
    bf16. Megatron's optimizers then keep them in `fp32_from_fp32_groups`, and the
    non-distributed `Float16OptimizerWithFloat16Params.sharded_state_dict` maps optimizer
    state onto model tensors only for `float16_groups`
    (`get_param_id_to_sharded_param_map(..., chain.from_iterable(self.float16_groups))`):
    the norms' Adam state has no key and a save fails with "Param id N does not match any
    model sharded param". bf16 norm weights (what transformer-engine's norms have) put them
    in the float16 groups with fp32 main copies like every other weight.
    """
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
            module.to(params_dtype)


def build_model_chunks(arch: LlamaArch, **kwargs) -> list:
    """This rank's model chunks: one `GPTModel` stage, or with an interleaved pipeline
    (a virtual pipeline size in the parallel state) one per virtual stage, in the order
    megatron-core's interleaved schedule expects (chunk i holds virtual stage i)."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_gpt_model(arch, **kwargs)]
    return [build_gpt_model(arch, vp_stage=stage, **kwargs) for stage in range(vpp)]
