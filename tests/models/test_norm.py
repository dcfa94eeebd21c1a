"""The RMSNorm of the local / SDPA specs: torch's numbers and keys, megatron-core's norm
constructor, and the `sequence_parallel` mark finalize_model_grads sums over TP; the
pipeline split rules (uneven first / last stages, virtual stages)."""

from __future__ import annotations

import pytest
import torch

from megatron_kaja.models.llama.config import (
    LlamaArch,
    pipeline_stage_layers,
    transformer_config,
    virtual_pipeline_size,
)

ARCH = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=8,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=128,
    head_dim=16,
)


def test_rmsnorm_is_torchs_norm_and_marks_its_weight_for_sequence_parallelism():
    from megatron_kaja.models.llama.norm import RMSNorm

    plain = transformer_config(ARCH, tensor_parallel_size=2)
    sp = transformer_config(ARCH, tensor_parallel_size=2, sequence_parallel=True)
    assert sp.sequence_parallel and not plain.sequence_parallel
    ours, marked = RMSNorm(plain, 64, eps=1e-5), RMSNorm(sp, 64, eps=1e-5)
    assert marked.weight.sequence_parallel is True and ours.weight.sequence_parallel is False
    reference = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(reference.state_dict())  # same keys
    x = torch.randn(5, 3, 64)
    assert torch.equal(ours(x), reference(x))


def test_sequence_parallel_is_off_at_tensor_parallel_one():
    # Megatron-LM's rule: nothing to split over a single TP rank.
    assert not transformer_config(ARCH, sequence_parallel=True).sequence_parallel


@pytest.mark.parametrize("impl", ["local", "sdpa"])
def test_local_and_sdpa_specs_build_every_norm_as_ours(impl, megatron_world):
    from megatron_kaja.models.llama.model import block_spec, layer_spec
    from megatron_kaja.models.llama.norm import RMSNorm

    layer = layer_spec(impl)
    assert layer.submodules.input_layernorm is RMSNorm
    assert layer.submodules.pre_mlp_layernorm is RMSNorm
    block = block_spec(impl, transformer_config(ARCH))
    assert block.layer_norm is RMSNorm and len(block.layer_specs) == ARCH.num_layers


def test_megatron_core_fallback_norm_refuses_sequence_parallelism():
    """Why the specs carry their own norm: megatron-core 0.16.1's torch fallback (used
    without apex / transformer-engine) rejects the config ours accepts."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sp = transformer_config(ARCH, tensor_parallel_size=2, sequence_parallel=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(sp, 64)


def test_recompute_settings_reach_the_transformer_config():
    full = transformer_config(ARCH, recompute_granularity="full")
    assert (full.recompute_method, full.recompute_num_layers) == ("uniform", 1)
    block = transformer_config(
        ARCH, pipeline_parallel_size=2, recompute_granularity="full", recompute_method="block"
    )
    assert (block.recompute_method, block.recompute_num_layers) == ("block", 4)  # every layer
    with pytest.raises(ValueError, match="need full recompute"):
        transformer_config(ARCH, recompute_granularity="selective", recompute_num_layers=2)


def test_pipeline_stage_layers_even_uneven_and_virtual():
    assert pipeline_stage_layers(8, 2) == [4, 4]
    assert pipeline_stage_layers(8, 4, first_stage_layers=1, last_stage_layers=3) == [1, 2, 2, 3]
    assert pipeline_stage_layers(8, 2, first_stage_layers=3) == [3, 5]
    with pytest.raises(ValueError, match="not divisible by pipeline-model-parallel-size 3"):
        pipeline_stage_layers(8, 3)
    with pytest.raises(ValueError, match="cannot share evenly"):
        pipeline_stage_layers(8, 4, first_stage_layers=3)
    with pytest.raises(ValueError, match="virtual stages"):
        pipeline_stage_layers(8, 2, first_stage_layers=3, virtual_stages=2)
    # Megatron-LM's --num-layers-per-virtual-pipeline-stage -> chunks per stage.
    assert virtual_pipeline_size(8, 2, 2) == 2
    assert virtual_pipeline_size(8, 2, 4) is None  # one chunk per stage: no interleaving
    assert virtual_pipeline_size(8, 4, 1, first_stage_layers=2, last_stage_layers=2) == 2
    with pytest.raises(ValueError, match="does not divide"):
        virtual_pipeline_size(8, 2, 3)


def test_fp8_needs_transformer_engine_impl(megatron_world):
    from megatron_kaja.models.llama.model import build_gpt_model

    with pytest.raises(ValueError, match="--fp8-format needs --transformer-impl"):
        build_gpt_model(ARCH, transformer_impl="local", fp8_format="hybrid")
