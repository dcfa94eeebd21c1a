"""RMSNorm for the `local` and `sdpa` layer specs, usable with sequence parallelism.

megatron-core 0.16.1 builds the norms of its local spec with `WrappedTorchNorm` when apex is
absent, and that wrapper refuses `sequence_parallel` outright. Only transformer-engine's and
apex's norms accept it: with sequence parallelism each tensor-parallel rank normalizes its own
slice of the sequence, so the norm weight's gradient on a rank covers only those tokens and
the ranks' gradients must be summed. megatron-core does that sum in
`finalize_model_grads` (`_allreduce_non_tensor_model_parallel_grads`) for every parameter
that carries `sequence_parallel = True`; apex's `FusedLayerNorm` and TE's norms mark their
weights that way. This norm does the same on top of `torch.nn.RMSNorm`, so its numbers are
those of the torch norm it replaces (and its state-dict keys are the same).
"""

from __future__ import annotations

import dataclasses

import torch


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` with megatron-core's norm constructor; its weight is marked
    `sequence_parallel` when the config turns sequence parallelism on."""

    def __init__(
        self,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm: zero-centered gamma is not supported")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        # Read by finalize_model_grads: sum this weight's gradient over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel


def with_rmsnorm(layer_spec):
    """`layer_spec` (a megatron-core `TransformerLayer` spec) with both of its norms (before
    attention and before the MLP) built as `RMSNorm`."""
    submodules = dataclasses.replace(
        layer_spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    return dataclasses.replace(layer_spec, submodules=submodules)
