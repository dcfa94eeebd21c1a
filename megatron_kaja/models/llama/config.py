"""llm-jp-3 (Llama) architecture: HF `config.json` <-> megatron-core `TransformerConfig`.

Every llm-jp-3 dense model is a `LlamaForCausalLM` with silu, RMSNorm, RoPE (HF rotate-half
layout, which is megatron's non-interleaved layout), no biases and untied embeddings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class ArchitectureError(ValueError):
    """An HF config that this package cannot map onto megatron-core."""


@dataclass(frozen=True)
class LlamaArch:
    """The architecture facts the converter and trainer need, independent of parallelism."""

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int  # the HF (unpadded for Megatron) vocabulary size
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ArchitectureError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ArchitectureError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_query_groups}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_hf_config(cls, config: dict | str | Path) -> LlamaArch:
        """Read an HF `config.json` (a dict, a file, or a checkpoint folder)."""
        source = "config"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no HF config at {path}")
            source = str(path)
            config = json.loads(path.read_text(encoding="utf-8"))
        archs = config.get("architectures") or [config.get("model_type", "unknown")]
        if archs[0] not in SUPPORTED_ARCHITECTURES and config.get("model_type") != "llama":
            raise ArchitectureError(
                f"{source}: architecture {archs[0]!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if config.get("tie_word_embeddings", False):
            raise ArchitectureError(
                f"{source}: tied embeddings are not supported (llm-jp-3 unties)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag, False):
                raise ArchitectureError(
                    f"{source}: {flag}=true is not supported (llm-jp-3 has none)"
                )
        if config.get("hidden_act", "silu") != "silu":
            raise ArchitectureError(f"{source}: hidden_act {config['hidden_act']!r} is not silu")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ArchitectureError(f"{source}: RoPE scaling {rope} is not supported")
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        try:
            return cls(
                hidden_size=config["hidden_size"],
                ffn_hidden_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                num_query_groups=config.get("num_key_value_heads") or config["num_attention_heads"],
                vocab_size=config["vocab_size"],
                head_dim=config.get("head_dim"),
                max_position_embeddings=config.get("max_position_embeddings", 4096),
                rope_theta=float(theta),
                norm_epsilon=config.get("rms_norm_eps", 1e-5),
                bos_token_id=config.get("bos_token_id", 1),
                eos_token_id=config.get("eos_token_id", 2),
                pad_token_id=config.get("pad_token_id"),
            )
        except KeyError as exc:
            raise ArchitectureError(f"{source}: missing field {exc.args[0]!r}") from None

    def to_hf_config(self, dtype: str = "bfloat16") -> dict:
        """An HF `config.json` dict that `AutoModelForCausalLM` loads without remote code."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_epsilon,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }

    def to_dict(self) -> dict:
        return asdict(self)


# llm-jp-3 sizes (RECIPE.md). Vocab sizes are the released (already padded) HF sizes.
_LLMJP3 = LlamaArch(
    hidden_size=2048,
    ffn_hidden_size=7168,
    num_layers=24,
    num_attention_heads=16,
    num_query_groups=16,
    vocab_size=99584,
    head_dim=128,
)
PRESETS: dict[str, LlamaArch] = {
    "llm-jp-3-1.8b": _LLMJP3,
    "llm-jp-3-3.7b": replace(
        _LLMJP3,
        hidden_size=3072,
        ffn_hidden_size=8192,
        num_layers=28,
        num_attention_heads=24,
        num_query_groups=24,
    ),
    "llm-jp-3-13b": replace(
        _LLMJP3,
        hidden_size=5120,
        ffn_hidden_size=13824,
        num_layers=40,
        num_attention_heads=40,
        num_query_groups=40,
    ),
    "llm-jp-3-172b": replace(
        _LLMJP3,
        hidden_size=12288,
        ffn_hidden_size=38464,
        num_layers=96,
        num_attention_heads=96,
        num_query_groups=16,
        vocab_size=99840,
    ),
}


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of `divisible_by x TP` (Megatron-LM's rule)."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def training_vocab_size(arch: LlamaArch, checkpoint_vocab: int | None, tp: int) -> int:
    """The padded vocabulary a run builds: the checkpoint's when TP divides it (so its padding
    rows load as they are), else Megatron's rule for this TP."""
    if checkpoint_vocab and checkpoint_vocab % tp == 0:
        return checkpoint_vocab
    return padded_vocab_size(arch.vocab_size, tp)


def check_parallel_layout(
    arch: LlamaArch,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_stages: int | None = None,
):
    """Raise ValueError, naming the sizes, when `arch` cannot be split this way."""
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        raise ValueError("parallel sizes must be >= 1")
    if arch.num_query_groups % tensor_parallel_size:
        raise ValueError(
            f"num_key_value_heads {arch.num_query_groups} is not divisible by "
            f"tensor-model-parallel-size {tensor_parallel_size}"
        )
    if arch.num_attention_heads % tensor_parallel_size:
        raise ValueError(
            f"num_attention_heads {arch.num_attention_heads} is not divisible by "
            f"tensor-model-parallel-size {tensor_parallel_size}"
        )
    if arch.ffn_hidden_size % tensor_parallel_size:
        raise ValueError(
            f"intermediate_size {arch.ffn_hidden_size} is not divisible by "
            f"tensor-model-parallel-size {tensor_parallel_size}"
        )
    pipeline_stage_layers(
        arch.num_layers,
        pipeline_parallel_size,
        first_stage_layers=first_stage_layers,
        last_stage_layers=last_stage_layers,
        virtual_stages=virtual_stages,
    )


def pipeline_stage_layers(
    num_layers: int,
    pipeline_parallel_size: int,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_stages: int | None = None,
) -> list[int]:
    """Decoder layers of each pipeline stage, as megatron-core splits them
    (`get_num_layers_to_build`): the first / last stage may be given their own count
    (Megatron-LM's `--decoder-first/last-pipeline-num-layers`), the other stages share the
    rest evenly; with `virtual_stages` model chunks per stage each stage's count must divide
    by it. Raises ValueError naming the flag that does not fit."""
    p = pipeline_parallel_size
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if uneven and p < 2:
        raise ValueError(
            "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size >= 2"
        )
    counts: list[int | None] = [None] * p
    rest, middle = num_layers, p
    for index, (given, flag) in enumerate(
        ((first_stage_layers, "first"), (last_stage_layers, "last"))
    ):
        if given is None:
            continue
        if given < 1:
            raise ValueError(f"--decoder-{flag}-pipeline-num-layers must be >= 1")
        counts[0 if index == 0 else p - 1] = given
        rest, middle = rest - given, middle - 1
    if not uneven and num_layers % p:
        raise ValueError(
            f"num_hidden_layers {num_layers} is not divisible by pipeline-model-parallel-size {p}"
        )
    if rest < 0 or (middle == 0 and rest != 0) or (middle and rest % middle):
        raise ValueError(
            f"num_hidden_layers {num_layers} less --decoder-first/last-pipeline-num-layers "
            f"leaves {rest}, which the {middle} other pipeline stages cannot share evenly"
        )
    counts = [rest // middle if c is None else c for c in counts]
    if min(counts) < 1:
        raise ValueError(f"pipeline stages of {counts} layers: every stage needs a layer")
    if virtual_stages is not None and virtual_stages > 1:
        if p < 2:
            raise ValueError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2"
            )
        bad = [c for c in counts if c % virtual_stages]
        if bad:
            raise ValueError(
                f"pipeline stages of {counts} layers cannot each be cut into {virtual_stages} "
                "virtual stages (--num-layers-per-virtual-pipeline-stage)"
            )
    return counts


def virtual_pipeline_size(
    num_layers: int,
    pipeline_parallel_size: int,
    layers_per_virtual_stage: int | None,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> int | None:
    """Model chunks per pipeline stage for Megatron-LM's
    `--num-layers-per-virtual-pipeline-stage` (None: no interleaving). The count is taken
    from the stages without a `--decoder-first/last-pipeline-num-layers` of their own."""
    if layers_per_virtual_stage is None:
        return None
    counts = pipeline_stage_layers(
        num_layers,
        pipeline_parallel_size,
        first_stage_layers=first_stage_layers,
        last_stage_layers=last_stage_layers,
    )
    middle = [
        c
        for i, c in enumerate(counts)
        if not (i == 0 and first_stage_layers is not None)
        and not (i == len(counts) - 1 and last_stage_layers is not None)
    ]
    per_stage = middle[0] if middle else counts[0]
    if layers_per_virtual_stage < 1 or per_stage % layers_per_virtual_stage:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} does not "
            f"divide the {per_stage} layers of a pipeline stage"
        )
    chunks = per_stage // layers_per_virtual_stage
    return chunks if chunks > 1 else None


# Megatron-LM's --fp8-format values and the TransformerConfig.fp8 they set.
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def transformer_config(
    arch: LlamaArch,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    params_dtype=None,
    bf16: bool = False,
    recompute_granularity: str | None = None,
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    sequence_parallel: bool = False,
    virtual_pipeline_parallel_size: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    context_parallel_size: int = 1,
    fp8_format: str | None = None,
    fp8_recipe: str | None = None,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    init_method_std: float = 0.02,
):
    """The megatron-core `TransformerConfig` for `arch` under a TP x PP (x VPP x CP) layout.

    Recompute follows Megatron-LM's flags: `full` recomputes whole layers, `uniform`ly in
    groups of `recompute_num_layers` (default 1) or, with `block`, only the first
    `recompute_num_layers` layers of each stage (default: all of them); `selective`
    recomputes the core attention only. `fp8_format` / `fp8_recipe` need transformer-engine.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_parallel_layout(
        arch,
        tensor_parallel_size,
        pipeline_parallel_size,
        first_stage_layers=first_stage_layers,
        last_stage_layers=last_stage_layers,
        virtual_stages=virtual_pipeline_parallel_size,
    )
    if params_dtype is None:
        params_dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = torch.cuda.is_available()
    recompute = {}
    if recompute_granularity == "full":
        method = recompute_method or "uniform"
        if method not in ("uniform", "block"):
            raise ValueError(f"recompute method {method!r}: use uniform|block")
        if recompute_num_layers is None:
            stage = max(
                pipeline_stage_layers(
                    arch.num_layers,
                    pipeline_parallel_size,
                    first_stage_layers=first_stage_layers,
                    last_stage_layers=last_stage_layers,
                )
            )
            recompute_num_layers = 1 if method == "uniform" else stage
        recompute = dict(
            recompute_granularity="full",
            recompute_method=method,
            recompute_num_layers=recompute_num_layers,
        )
    elif recompute_granularity == "selective":
        if recompute_method is not None or recompute_num_layers is not None:
            raise ValueError("--recompute-method / --recompute-num-layers need full recompute")
        recompute = dict(recompute_granularity="selective")
    elif recompute_granularity is not None:
        raise ValueError(f"recompute granularity {recompute_granularity!r}: use full|selective")
    if sequence_parallel and tensor_parallel_size == 1:
        sequence_parallel = False  # Megatron-LM turns it off too: nothing to split at TP=1
    # Megatron-LM's default for the interleaved schedule (--overlap-p2p-communication):
    # separate, overlapped sends and receives instead of one batched call. The batched call
    # pairs messages wrongly on gloo once sends to the next and the previous stage meet in
    # one batch (PP=2: the same peer), with more micro-batches than stages.
    p2p = {}
    if virtual_pipeline_parallel_size:
        p2p = dict(overlap_p2p_comm=True, batch_p2p_comm=False)
    fp8 = {}
    if fp8_format is not None:
        if fp8_format not in FP8_FORMATS:
            raise ValueError(f"fp8 format {fp8_format!r}: use one of {FP8_FORMATS}")
        fp8 = dict(fp8=fp8_format, fp8_recipe=fp8_recipe or "delayed")
    elif fp8_recipe is not None:
        raise ValueError("--fp8-recipe needs --fp8-format")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size,
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        context_parallel_size=context_parallel_size,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=bf16,
        # Fused kernels need CUDA (and apex / TE); on CPU the unfused paths are used.
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        **recompute,
        **p2p,
        **fp8,
    )
