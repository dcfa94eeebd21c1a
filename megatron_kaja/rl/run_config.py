"""`train_grpo.py` settings: the shared run settings plus GRPO's section; defaults from the
seed's recipe (GRPOConfig's: lr 1e-5 cosine, warmup 0, weight decay 0.1, 8 generations)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from megatron_kaja.rl.advantages import advantage_names
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.engines import rollout_engine_names
from megatron_kaja.rl.losses import kl_estimator_names, loss_aggregation_names
from megatron_kaja.training.settings import RunSettings

_D = GRPOConfig  # its class attributes are the algorithm's defaults

# The scale settings GRPO cannot take yet, and why (docs/scale.md, GRPO).
GRPO_UNSUPPORTED_SCALE = {
    "fp8_format": "the sampler's one-token GEMMs do not meet FP8's shape rules",
}


class GRPORunConfig(RunSettings):
    """Every setting of a `train_grpo.py` run (field names are the flags without dashes)."""

    SECTION: ClassVar[str] = "GRPO: prompts, reward, algorithm, rollouts"
    # Batches count completions: the seed's 8 per device x 8 accumulation x 8 GPUs = 512.
    DEFAULTS: ClassVar[dict] = {
        "min_lr": _D.min_lr,
        "weight_decay": _D.weight_decay,
        "adam_beta2": 0.999,
        "micro_batch_size": _D.micro_batch_size,
        "global_batch_size": _D.global_batch_size,
    }
    BATCH_UNIT_FLAG: ClassVar[str] = "--num-generations"

    # GRPO: prompts, reward and judge
    ref_load: Path | None = Field(
        default=None,
        description="the frozen KL reference (default: the weights the run starts from)",
    )
    prompts: list[str] = Field(
        min_length=1, description="prompt files PATH:KIND, KIND safety or helpful"
    )
    reward: list[str] = Field(
        default_factory=lambda: ["judge"], description="reward terms NAME[:WEIGHT]"
    )
    judge_backend: Literal["openai", "vllm", "hf"] = Field(
        default="openai", description="where the judge runs"
    )
    judge_base_url: str | None = Field(default=None, description="OpenAI-compatible judge URL")
    judge_model: str | None = Field(default=None, description="judge model name or path")
    judge_api_key_env: str | None = Field(
        default=None, description="environment variable holding the judge's API key"
    )
    judge_concurrency: int = Field(default=64, gt=0, description="judge requests in flight")
    judge_request_timeout: float = Field(
        default=300.0, gt=0, description="seconds one judge request may take, retries included"
    )
    # GRPO: the algorithm (GRPOConfig)
    num_generations: int = Field(default=_D.num_generations, description="completions per prompt")
    max_new_tokens: int = Field(default=_D.max_new_tokens, description="completion length bound")
    max_prompt_length: int = Field(
        default=512, gt=0, description="longer prompts are skipped (counted in the log)"
    )
    temperature: float = Field(default=_D.temperature, description="sampling temperature")
    top_p: float = Field(default=_D.top_p, description="nucleus sampling mass")
    beta: float = Field(default=_D.beta, description="KL weight; 0 keeps no reference model")
    clip_eps: float = Field(default=_D.clip_eps, description="PPO ratio clip")
    advantage: Literal[tuple(advantage_names())] = Field(  # type: ignore[valid-type]
        default=_D.advantage, description="advantage estimator"
    )
    kl_estimator: Literal[tuple(kl_estimator_names())] = Field(  # type: ignore[valid-type]
        default=_D.kl_estimator,
        description="KL to the reference: k1, k2, k3 (Schulman's estimators) or k3_is (k3 "
        "weighted by the importance ratio to the sampling policy)",
    )
    loss_aggregation: Literal[tuple(loss_aggregation_names())] = Field(  # type: ignore[valid-type]
        default=_D.loss_aggregation,
        description="how token losses make the batch loss: token (mean over all tokens of the "
        "step), sequence (mean per sequence), dr_grpo (sum / (max length x sequences))",
    )
    num_iterations: int = Field(
        default=_D.num_iterations, description="optimizer passes over one batch of rollouts"
    )
    filter_zero_variance: bool = Field(
        default=_D.filter_zero_variance,
        description="drop groups whose rewards are all equal (DAPO's dynamic sampling)",
    )
    oversample_rounds: int = Field(
        default=_D.oversample_rounds, description="extra prompt draws to refill dropped groups"
    )
    # GRPO: rollouts
    rollout_engine: Literal[rollout_engine_names()] = Field(  # type: ignore[valid-type]
        default="builtin",
        description="builtin (our sampler on the training model), hf (transformers), vllm "
        "(colocated)",
    )
    rollout_batch_size: int | None = Field(
        default=_D.rollout_batch_size, gt=0, description="sequences sampled at once"
    )
    rollout_gpu_memory_utilization: float = Field(
        default=0.3, gt=0, lt=1, description="vllm's share of the GPU memory"
    )

    def batch_unit(self) -> int:
        return self.num_generations

    def check_micro_batches(self, micro_batches: int) -> None:
        """No rule on the count: a GRPO step's micro-batches follow from its rollouts (dynamic
        sampling drops groups), and under an interleaved pipeline the step fills the last
        group of PP with empty ones (`rl.step.interleaved_micro_batch_count`)."""

    @model_validator(mode="after")
    def _grpo_consistent(self) -> GRPORunConfig:
        if self.pipeline_model_parallel_size > 1 and self.rollout_engine != "builtin":
            raise ValueError(
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} needs "
                f"--rollout-engine builtin (the {self.rollout_engine} engine takes the whole "
                "model's weights from one stage; split it with TP instead)"
            )
        if self.context_parallel_size > 1 and self.rollout_engine != "builtin":
            raise ValueError(
                f"--context-parallel-size {self.context_parallel_size} needs --rollout-engine "
                f"builtin (the {self.rollout_engine} engine is not run under context parallelism)"
            )
        for spec in self.prompts:
            path, _, kind = spec.rpartition(":")
            if not path or kind not in ("safety", "helpful"):
                raise ValueError(f"--prompts {spec!r}: use PATH:safety or PATH:helpful")
        for spec in self.reward:
            weight = spec.partition(":")[2]
            if weight:
                float(weight)  # raises a ValueError naming the bad weight
        if any(s.partition(":")[0] == "judge" for s in self.reward) and not self.judge_model:
            raise ValueError("--reward judge needs --judge-model (and --judge-base-url for openai)")
        for name, why in GRPO_UNSUPPORTED_SCALE.items():
            if getattr(self, name) != type(self).model_fields[name].default:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: not supported by train_grpo.py ({why})")
        self.grpo_config()  # validates the algorithm settings now, naming the field
        return self

    def grpo_config(self) -> GRPOConfig:
        """The algorithm's settings: every GRPOConfig field this config has, by name."""
        return GRPOConfig(
            **{f.name: getattr(self, f.name) for f in fields(GRPOConfig) if hasattr(self, f.name)}
        )
