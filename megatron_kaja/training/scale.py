"""The scale settings every trainer shares, under Megatron-LM's flag names: sequence and
context parallelism, overlapped communication, interleaved and uneven pipelines,
activation recompute, FP8.

Each rule is checked when the settings are read (before any process group or model
exists); `check_scale_extras` then refuses, naming the extra, what needs transformer-engine
on a machine without it. `docs/scale.md` tells when to use which.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from megatron_kaja.extras import require
from megatron_kaja.models.llama.attention import attention_backend
from megatron_kaja.models.llama.config import FP8_RECIPES, LlamaArch, virtual_pipeline_size
from megatron_kaja.training.errors import ConfigError

FP8Recipe = Literal[FP8_RECIPES]  # type: ignore[valid-type]


class ScaleSettings(BaseModel):
    """scale: sequence / context parallelism, overlap, pipeline schedule, recompute, FP8"""

    sequence_parallel: bool = Field(
        default=False,
        description="split the norm / dropout regions' activations over the TP ranks along "
        "the sequence (Megatron-LM's --sequence-parallel); no effect at TP=1",
    )
    context_parallel_size: int = Field(
        default=1,
        gt=0,
        description="split every packed row over this many ranks (2 x this chunks, keys and "
        "values all-gathered in attention; --transformer-impl sdpa, its default here)",
    )
    overlap_grad_reduce: bool = Field(
        default=False,
        description="start each gradient bucket's all-reduce / reduce-scatter during backward",
    )
    overlap_param_gather: bool = Field(
        default=False,
        description="gather the distributed optimizer's updated parameters bucket by bucket "
        "during the next forward (needs --use-distributed-optimizer)",
    )
    ddp_bucket_size: int | None = Field(
        default=None,
        gt=0,
        description="elements per gradient bucket (default with overlap: max(40M, 1M x DP))",
    )
    num_layers_per_virtual_pipeline_stage: int | None = Field(
        default=None,
        gt=0,
        description="layers per model chunk: interleaved 1F1B with (layers per stage / this) "
        "chunks per pipeline stage",
    )
    decoder_first_pipeline_num_layers: int | None = Field(
        default=None, gt=0, description="layers of the first pipeline stage (uneven split)"
    )
    decoder_last_pipeline_num_layers: int | None = Field(
        default=None, gt=0, description="layers of the last pipeline stage (uneven split)"
    )
    recompute_activations: bool = Field(
        default=False, description="selective recompute (Megatron-LM's older switch)"
    )
    recompute_granularity: Literal["full", "selective"] | None = Field(
        default=None,
        description="full: recompute whole layers; selective: the core attention only",
    )
    recompute_method: Literal["uniform", "block"] | None = Field(
        default=None,
        description="full recompute: uniform groups of --recompute-num-layers layers "
        "(default), or block: only the first --recompute-num-layers layers of each chunk",
    )
    recompute_num_layers: int | None = Field(
        default=None,
        ge=0,
        description="full recompute: layers per group (uniform, default 1) or layers "
        "recomputed per chunk (block, default all)",
    )
    fp8_format: Literal["e4m3", "hybrid"] | None = Field(
        default=None,
        description="FP8 GEMMs through transformer-engine: e4m3, or hybrid (e5m2 gradients)",
    )
    fp8_recipe: FP8Recipe | None = Field(
        default=None, description="FP8 scaling recipe (default with --fp8-format: delayed)"
    )

    @model_validator(mode="after")
    def _scale_consistent(self):
        if self.recompute_activations and self.recompute_granularity is None:
            self.recompute_granularity = "selective"
        full = self.recompute_granularity == "full"
        if not full and (self.recompute_method is not None or self.recompute_num_layers):
            raise ValueError(
                "--recompute-method / --recompute-num-layers need --recompute-granularity full"
            )
        if self.overlap_param_gather and not getattr(self, "use_distributed_optimizer", False):
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
        if self.overlap_grad_reduce and getattr(self, "dist_ckpt_optim_fully_reshardable", False):
            # Overlap splits the gradient buffer into buckets; megatron-core 0.16.1 then
            # saves a fully reshardable optimizer state with some parameters' ranges past the
            # gathered buffer, zero-filled ("can lead to data corruption", its own warning).
            raise ValueError(
                "--dist-ckpt-optim-fully-reshardable with --overlap-grad-reduce: megatron-core "
                "0.16.1 zero-fills part of a bucketed buffer's optimizer state; drop one of them"
            )
        if self.fp8_recipe is not None and self.fp8_format is None:
            raise ValueError("--fp8-recipe needs --fp8-format")
        impl = getattr(self, "transformer_impl", None)
        if self.fp8_format is not None and impl not in (None, "transformer_engine"):
            raise ValueError("--fp8-format needs --transformer-impl transformer_engine")
        if self.context_parallel_size > 1 and hasattr(self, "transformer_impl"):
            if impl is None:  # the one backend that splits packed rows over CP ranks
                self.transformer_impl = impl = "sdpa"
            refusal = attention_backend(impl).context_parallel_refusal
            if refusal:
                raise ValueError(
                    f"--context-parallel-size {self.context_parallel_size} with "
                    f"--transformer-impl {impl}: {refusal}"
                )
        uses_pp = self.num_layers_per_virtual_pipeline_stage or (
            self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers
        )
        if uses_pp and getattr(self, "pipeline_model_parallel_size", 1) < 2:
            raise ValueError(
                "--num-layers-per-virtual-pipeline-stage and --decoder-first/last-pipeline-"
                "num-layers need --pipeline-model-parallel-size >= 2"
            )
        return self

    def model_parallel_size(self) -> int:
        """TP x PP x CP: the ranks one model replica spans."""
        tp = getattr(self, "tensor_model_parallel_size", 1)
        pp = getattr(self, "pipeline_model_parallel_size", 1)
        return tp * pp * self.context_parallel_size

    def virtual_pipeline_size(self, arch: LlamaArch) -> int | None:
        """Model chunks per pipeline stage (None: no interleaving); ConfigError if the
        layers do not split so."""
        try:
            return virtual_pipeline_size(
                arch.num_layers,
                getattr(self, "pipeline_model_parallel_size", 1),
                self.num_layers_per_virtual_pipeline_stage,
                first_stage_layers=self.decoder_first_pipeline_num_layers,
                last_stage_layers=self.decoder_last_pipeline_num_layers,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def check_sequence_length(self, seq_length: int, flag: str = "--seq-length") -> None:
        """Sequence parallelism splits each sequence over the TP ranks, context parallelism
        into 2 x CP chunks (load balance of the causal mask): the length must divide."""
        tp = getattr(self, "tensor_model_parallel_size", 1)
        if self.sequence_parallel and tp > 1 and seq_length % tp:
            raise ConfigError(
                f"--sequence-parallel needs {flag} {seq_length} divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
        cp = self.context_parallel_size
        if cp > 1 and seq_length % (2 * cp):
            raise ConfigError(
                f"--context-parallel-size {cp} needs {flag} {seq_length} divisible by {2 * cp}"
            )

    def check_micro_batches(self, micro_batches: int) -> None:
        """The interleaved schedule runs micro-batches in groups of PP: it needs at least PP
        of them per step and DP rank, and a multiple of PP (megatron-core's rule)."""
        pp = getattr(self, "pipeline_model_parallel_size", 1)
        if self.num_layers_per_virtual_pipeline_stage and (
            micro_batches < pp or micro_batches % pp
        ):
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage: {micro_batches} micro-batches per "
                f"step and data-parallel rank must be a multiple of "
                f"--pipeline-model-parallel-size {pp}"
            )

    def scale_build_settings(self) -> dict:
        """The keywords of `build_training_stack` these settings set."""
        return {
            "sequence_parallel": self.sequence_parallel,
            "overlap_grad_reduce": self.overlap_grad_reduce,
            "overlap_param_gather": self.overlap_param_gather,
            "ddp_bucket_size": self.ddp_bucket_size,
            "recompute_granularity": self.recompute_granularity,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_num_layers or None,
            "decoder_first_pipeline_num_layers": self.decoder_first_pipeline_num_layers,
            "decoder_last_pipeline_num_layers": self.decoder_last_pipeline_num_layers,
            "fp8_format": self.fp8_format,
            "fp8_recipe": self.fp8_recipe,
        }

    def describe_scale(self) -> str:
        """The scale settings in use, for the dry run's layout line."""
        parts = []
        if self.sequence_parallel:
            parts.append("sequence parallel")
        if self.context_parallel_size > 1:
            parts.append(f"CP={self.context_parallel_size}")
        if self.num_layers_per_virtual_pipeline_stage:
            parts.append(f"{self.num_layers_per_virtual_pipeline_stage} layers per virtual stage")
        if self.decoder_first_pipeline_num_layers or self.decoder_last_pipeline_num_layers:
            parts.append(
                f"first / last stage layers {self.decoder_first_pipeline_num_layers} / "
                f"{self.decoder_last_pipeline_num_layers}"
            )
        if self.overlap_grad_reduce or self.overlap_param_gather:
            what = [
                name
                for name, on in (
                    ("grad reduce", self.overlap_grad_reduce),
                    ("param gather", self.overlap_param_gather),
                )
                if on
            ]
            parts.append("overlapped " + " + ".join(what))
        if self.fp8_format:
            parts.append(f"fp8 {self.fp8_format} ({self.fp8_recipe or 'delayed'})")
        return ", ".join(parts) or "none"


def check_scale_extras(settings: ScaleSettings) -> None:
    """Refuse, before any compute, what needs transformer-engine when it is missing."""
    if settings.fp8_format is not None:
        require("transformer_engine", f"--fp8-format {settings.fp8_format}")
