"""`train_grpo.py` settings: Megatron-style flags / YAML, defaults from the seed's recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.training.config import OptimizerName, check_optimizer_flags
from megatron_kaja.training.launch import LaunchSettings
from megatron_kaja.training.scale import ScaleSettings

# The scale settings GRPO cannot take yet, and why (its rollouts and update run outside
# megatron-core's schedule: the sampler decodes one token at a time through each stage,
# and the update runs micro-batches of any length and number).
GRPO_UNSUPPORTED_SCALE = {
    "sequence_parallel": "the sampler decodes one token at a time (no sequence to split)",
    "overlap_grad_reduce": "the update's micro-batches run outside megatron-core's schedule",
    "num_layers_per_virtual_pipeline_stage": "the sampler passes one stage per rank",
    "context_parallel_size": "the sampler does not split sequences over ranks",
    "fp8_format": "the sampler's one-token GEMMs do not meet FP8's shape rules",
}


class GRPORunConfig(LaunchSettings, ScaleSettings):
    """Every setting of a `train_grpo.py` run (field names are the flags without dashes)."""

    model_config = ConfigDict(extra="forbid")

    load: Path  # the SFT model (converted or a pretrain_sft.py --save folder) or a GRPO run
    ref_load: Path | None = None  # the frozen reference; default: the weights the run starts from
    tokenizer: Path
    prompts: list[str] = Field(min_length=1)  # PATH:KIND, KIND in safety | helpful
    reward: list[str] = Field(default_factory=lambda: ["judge"])  # NAME[:WEIGHT]
    judge_backend: Literal["openai", "vllm", "hf"] = "openai"
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    judge_concurrency: int = Field(default=64, gt=0)
    # algorithm (GRPOConfig)
    num_generations: int = 8
    max_new_tokens: int = 512
    max_prompt_length: int = Field(default=512, gt=0)  # longer prompts are skipped (counted)
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04
    clip_eps: float = 0.2
    advantage: str = "grpo"
    loss_aggregation: str = "token"
    num_iterations: int = 1
    filter_zero_variance: bool = False
    oversample_rounds: int = 0
    # rollouts: builtin (our sampler on the training model), hf (transformers), vllm (colocated)
    rollout_engine: Literal["builtin", "hf", "vllm"] = "builtin"
    rollout_batch_size: int | None = Field(default=None, gt=0)  # sequences sampled at once
    rollout_gpu_memory_utilization: float = Field(default=0.3, gt=0, lt=1)  # vllm's share
    # optimizer and schedule (seed: lr 1e-5 cosine, warmup 0, weight decay 0.1)
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_iters: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    bf16: bool = False
    optimizer: OptimizerName = "adam"  # the seed's recipe: paged_adamw_8bit
    use_distributed_optimizer: bool = False
    # batches count completions: seed = 8 per device x 8 accumulation x 8 GPUs = 512
    micro_batch_size: int = Field(default=8, gt=0)
    global_batch_size: int = Field(default=512, gt=0)
    train_epochs: int | None = Field(default=None, gt=0)
    train_iters: int | None = Field(default=None, gt=0)
    tensor_model_parallel_size: int = Field(default=1, gt=0)
    pipeline_model_parallel_size: int = Field(default=1, gt=0)
    save: Path | None = None
    save_interval: int | None = Field(default=None, gt=0)
    exit_interval: int | None = Field(default=None, gt=0)
    metrics_file: Path | None = None
    tensorboard_dir: Path | None = None
    wandb_project: str | None = None
    log_interval: int = Field(default=1, gt=0)
    seed: int = 1234

    @model_validator(mode="after")
    def _consistent(self) -> GRPORunConfig:
        if self.train_iters is None and self.train_epochs is None:
            self.train_epochs = 1
        if self.train_iters is not None and self.train_epochs is not None:
            raise ValueError("give --train-iters or --train-epochs, not both")
        if self.pipeline_model_parallel_size > 1 and self.rollout_engine != "builtin":
            raise ValueError(
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size} needs "
                f"--rollout-engine builtin (the {self.rollout_engine} engine takes the whole "
                "model's weights from one stage; split it with TP instead)"
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
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        check_optimizer_flags(self)
        for name, why in GRPO_UNSUPPORTED_SCALE.items():
            value = getattr(self, name)
            if value not in (None, False, 1):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag}: not supported by train_grpo.py ({why})")
        if self.metrics_file is None and self.save is not None:
            self.metrics_file = self.save / "metrics.jsonl"
        self.grpo_config()  # validates the algorithm settings now, naming the field
        return self

    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig(
            num_generations=self.num_generations,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            beta=self.beta,
            clip_eps=self.clip_eps,
            advantage=self.advantage,
            loss_aggregation=self.loss_aggregation,
            num_iterations=self.num_iterations,
            filter_zero_variance=self.filter_zero_variance,
            oversample_rounds=self.oversample_rounds,
            lr=self.lr,
            min_lr=self.min_lr,
            lr_decay_style=self.lr_decay_style,
            lr_warmup_iters=self.lr_warmup_iters,
            weight_decay=self.weight_decay,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            rollout_batch_size=self.rollout_batch_size,
            seed=self.seed,
        )
