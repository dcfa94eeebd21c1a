"""GRPO hyper-parameters; the defaults are the seed's recipe (see the project's RECIPE.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_kaja.rl.advantages import advantage_names
from megatron_kaja.rl.losses import kl_estimator_names, loss_aggregation_names


@dataclass
class GRPOConfig:
    """One GRPO run. Batch sizes count completions (prompts x num_generations), as TRL does:
    the seed's per-device batch 8 x gradient accumulation 8 x 8 GPUs = 512 completions =
    64 prompts x 8 generations per step."""

    num_generations: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL weight; 0 keeps no reference model
    kl_estimator: str = "k3"  # or k1, k2, k3_is (k3 x importance ratio, TRL's default)
    clip_eps: float = 0.2
    advantage: str = "grpo"  # or "dr_grpo" (no std division)
    advantage_eps: float = 1e-4
    # "token": mean over the step's tokens; "sequence": mean of per-sequence means;
    # "dr_grpo": token sum / (max_new_tokens x sequences)
    loss_aggregation: str = "token"
    num_iterations: int = 1  # optimizer passes over one batch of rollouts (mu in DeepSeekMath)
    filter_zero_variance: bool = False  # dynamic sampling (DAPO)
    oversample_rounds: int = 0  # extra prompt draws to refill dropped groups
    zero_variance_tol: float = 1e-6
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    weight_decay: float = 0.1
    micro_batch_size: int = 8  # completions per forward/backward
    global_batch_size: int = 512  # completions per optimizer step
    # completions sampled at once (None: a rank's whole share): bounds the rollout KV cache
    rollout_batch_size: int | None = None
    seed: int = 1234

    def __post_init__(self):
        def need(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"GRPOConfig.{field}: {message} (got {getattr(self, field)!r})")

        need(self.num_generations >= 2, "num_generations", "needs >= 2 samples per group")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 for GRPO rollouts")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.clip_eps > 0, "clip_eps", "must be > 0")
        need(self.advantage in advantage_names(), "advantage", f"use one of {advantage_names()}")
        need(
            self.kl_estimator in kl_estimator_names(),
            "kl_estimator",
            f"use one of {kl_estimator_names()}",
        )
        need(
            self.loss_aggregation in loss_aggregation_names(),
            "loss_aggregation",
            f"use one of {loss_aggregation_names()}",
        )
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.oversample_rounds >= 0, "oversample_rounds", "must be >= 0")
        need(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        need(
            self.rollout_batch_size is None or self.rollout_batch_size >= 1,
            "rollout_batch_size",
            "must be >= 1 (or None for all at once)",
        )
        need(
            self.global_batch_size % self.num_generations == 0,
            "global_batch_size",
            f"must be a multiple of num_generations={self.num_generations} (whole groups)",
        )
        need(self.lr > 0 and self.min_lr <= self.lr, "min_lr", f"must be <= lr={self.lr}")

    @property
    def prompts_per_step(self) -> int:
        return self.global_batch_size // self.num_generations

    def to_dict(self) -> dict:
        return asdict(self)
