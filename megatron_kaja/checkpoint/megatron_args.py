"""The `args` Namespace Megatron-LM keeps in its checkpoints, written and read for llm-jp-3.

Megatron-LM (checked against its tag core_v0.16.1) reads a checkpoint's `args` in three
places, and each reads fields the others do not:

* `megatron/training/checkpointing.py: load_args_from_checkpoint` (`--use-checkpoint-args`,
  and every `tools/checkpoint` loader) copies the model, tokenizer, padded-vocab and
  parallel sizes; `check_checkpoint_args` compares some of them on every `--load`.
* `tools/checkpoint/loader_base.py` needs `seq_length`, `tokenizer_type`, `fp16` / `bf16`,
  `normalization`, ... and the saver copies `sequence_parallel` and
  `apply_query_key_layer_scaling` from it.
* `megatron/training/arguments.py` turns them into a TransformerConfig by field name, so the
  RMSNorm epsilon is `layernorm_epsilon` (the flag is `--norm-epsilon`).

`MEGATRON_LM_ARGS_READ` lists every field those read for a dense GPT model; the tests assert
our files carry all of them. `vocab_size` is ours (Megatron-LM's `--vocab-size` spelling):
the unpadded vocabulary, which Megatron-LM does not store.
"""

from __future__ import annotations

import argparse

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.models.llama.config import LlamaArch

MEGATRON_LM_ARGS_READ = (
    # load_args_from_checkpoint: model
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "seq_length",
    "num_attention_heads",
    "num_query_groups",
    "group_query_attention",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "add_position_embedding",
    "use_rotary_position_embeddings",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "add_bias_linear",
    "add_qkv_bias",
    "squared_relu",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "apply_layernorm_1p",
    "normalization",
    "apply_query_key_layer_scaling",
    "attention_dropout",
    "hidden_dropout",
    "num_experts",
    # load_args_from_checkpoint: tokenizer, vocabulary, format, parallel sizes
    "tokenizer_type",
    "tokenizer_model",
    "padded_vocab_size",
    "ckpt_format",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage",
    "expert_model_parallel_size",
    # check_checkpoint_args
    "make_vocab_size_divisible_by",
    "data_parallel_random_init",
    # tools/checkpoint loaders and savers; load_checkpoint's sample counters
    "encoder_seq_length",
    "fp16",
    "bf16",
    "params_dtype",
    "sequence_parallel",
    "consumed_train_samples",
    "consumed_valid_samples",
    # arguments.py -> TransformerConfig
    "layernorm_epsilon",
)

CHECKPOINT_VERSION = 3.0  # what Megatron-LM's save_checkpoint writes (3.0: TP/PP-aware names)


def megatron_lm_args(
    arch: LlamaArch,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    padded_vocab: int,
    dtype: torch.dtype,
    ckpt_format: str,
    transformer_impl: str = "local",
    make_vocab_size_divisible_by: int = 128,
    iteration: int = 0,
    seq_length: int | None = None,
) -> argparse.Namespace:
    """The Namespace Megatron-LM would have saved training this model at this layout."""
    seq_length = seq_length or arch.max_position_embeddings
    return argparse.Namespace(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        seq_length=seq_length,
        encoder_seq_length=seq_length,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        position_embedding_type="rope",
        add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        rotary_interleaved=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        squared_relu=False,
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        apply_layernorm_1p=False,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        apply_query_key_layer_scaling=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        num_experts=None,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=None,  # a path on the machine that trains; the user gives it
        vocab_size=arch.vocab_size,
        padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ckpt_format=ckpt_format,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None,
        expert_model_parallel_size=1,
        world_size=tensor_parallel_size * pipeline_parallel_size,
        data_parallel_random_init=False,
        sequence_parallel=False,
        transformer_impl=transformer_impl,
        use_legacy_models=False,
        params_dtype=dtype,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        iteration=iteration,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def megatron_lm_common_state(args: argparse.Namespace, iteration: int = 0) -> dict:
    """The non-tensor entries Megatron-LM's save_checkpoint puts beside the model."""
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "num_floating_point_operations_so_far": 0,
    }


def _required(args, name: str, source: str):
    value = getattr(args, name, None)
    if value is None:
        raise CheckpointError(f"{source}: its args lack {name}")
    return value


def arch_from_megatron_args(
    args, source: str, vocab_size: int | None = None
) -> tuple[LlamaArch, str]:
    """The llm-jp-3 architecture described by a Megatron-LM args Namespace, and where the
    vocabulary size came from.

    The unpadded vocabulary is `vocab_size` from the args when they have it (ours do), else
    the caller's (an HF template's), else the padded size: the padding rows are then kept
    as vocabulary, as an llm-jp-3 HF config does (its vocab_size is already a multiple of 128).
    Anything llm-jp-3 does not have (biases, LayerNorm, learned positions, tied embeddings,
    experts) is refused by name.
    """
    unsupported = {
        "normalization": ("RMSNorm", None),
        "swiglu": (True,),
        "add_bias_linear": (False,),
        "add_qkv_bias": (False, None),
        "untie_embeddings_and_output_weights": (True,),
        "position_embedding_type": ("rope",),
        "num_experts": (None, 0, 1),
        "apply_layernorm_1p": (False, None),
    }
    for name, allowed in unsupported.items():
        value = getattr(args, name, allowed[0])
        if value not in allowed:
            raise CheckpointError(
                f"{source}: args.{name}={value!r} is not llm-jp-3's (expects {allowed[0]!r})"
            )
    heads = _required(args, "num_attention_heads", source)
    groups = heads
    if getattr(args, "group_query_attention", False):
        groups = _required(args, "num_query_groups", source)
    padded = _required(args, "padded_vocab_size", source)
    if getattr(args, "vocab_size", None):
        vocab, vocab_source = args.vocab_size, "args.vocab_size"
    elif vocab_size:
        vocab, vocab_source = vocab_size, "the HF template's vocab_size"
    else:
        vocab, vocab_source = padded, "args.padded_vocab_size (no unpadded size stored)"
    epsilon = getattr(args, "layernorm_epsilon", None) or getattr(args, "norm_epsilon", None)
    hidden = _required(args, "hidden_size", source)
    arch = LlamaArch(
        hidden_size=hidden,
        ffn_hidden_size=getattr(args, "ffn_hidden_size", None) or 4 * hidden,
        num_layers=_required(args, "num_layers", source),
        num_attention_heads=heads,
        num_query_groups=groups,
        vocab_size=vocab,
        head_dim=getattr(args, "kv_channels", None),
        max_position_embeddings=_required(args, "max_position_embeddings", source),
        rope_theta=float(getattr(args, "rotary_base", None) or 10000),
        norm_epsilon=float(epsilon or 1e-5),
    )
    return arch, vocab_source
