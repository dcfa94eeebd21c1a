"""Model, megatron DDP, optimizer (megatron's, or bitsandbytes' 8-bit AdamW) and lr schedule
for a training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.model import build_gpt_model, default_transformer_impl
from megatron_kaja.training.bnb_optimizer import Bnb8bitOptimizer

if TYPE_CHECKING:  # megatron-core costs seconds to import: only where a stack is built
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class TrainingStack:
    """This rank's model stage and what trains it."""

    model: GPTModel  # this rank's pipeline stage
    ddp: DistributedDataParallel  # megatron's wrapper around it (gradient buffers)
    optimizer: MegatronOptimizer | Bnb8bitOptimizer
    scheduler: OptimizerParamScheduler
    transformer_impl: str  # the attention backend's name (`models/llama/attention.py`)
    optimizer_kind: str  # the --optimizer value: "adam" (megatron) or a BNB_OPTIMIZERS key


def build_training_stack(
    arch: LlamaArch,
    *,
    lr: float,
    min_lr: float,
    train_iters: int,
    lr_warmup_iters: int = 0,
    lr_decay_style: str = "cosine",
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.95,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    bf16: bool = False,
    optimizer: str = "adam",
    use_distributed_optimizer: bool = False,
    recompute_granularity: str | None = None,
    transformer_impl: str | None = None,
    padded_vocab_size: int | None = None,
    per_token_loss: bool = True,
) -> TrainingStack:
    """Build this rank's model stage wrapped for training.

    With `per_token_loss` (SFT) losses are per-token sums (`calculate_per_token_loss`):
    megatron then divides the summed gradients by the number of loss tokens in the whole
    global batch, across micro-batches and data-parallel ranks, so the result does not
    depend on the DP x accumulation split. Without it (GRPO, whose step normalizes its own
    loss) gradients are averaged over data-parallel ranks.

    `optimizer` "adam" is megatron's optimizer (fp32 master weights under bf16, optionally
    distributed); "adamw_8bit" / "paged_adamw_8bit" is bitsandbytes' (`Bnb8bitOptimizer`),
    fed by the same DDP gradient buffers.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    impl = transformer_impl or default_transformer_impl()
    model = build_gpt_model(
        arch,
        transformer_impl=impl,
        bf16=bf16,
        recompute_granularity=recompute_granularity,
        vocab_size_override=padded_vocab_size,
    )
    model.config.calculate_per_token_loss = per_token_loss
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=use_distributed_optimizer,
            average_in_collective=not per_token_loss,
        ),
        module=model,
    )
    if optimizer == "adam":
        optim = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                min_lr=min_lr,
                weight_decay=weight_decay,
                adam_beta1=adam_beta1,
                adam_beta2=adam_beta2,
                adam_eps=adam_eps,
                clip_grad=clip_grad,
                bf16=bf16,
                params_dtype=model.config.params_dtype,
                use_distributed_optimizer=use_distributed_optimizer,
            ),
            [ddp],
        )
    else:
        optim = Bnb8bitOptimizer(
            optimizer,
            model,
            lr=lr,
            weight_decay=weight_decay,
            betas=(adam_beta1, adam_beta2),
            eps=adam_eps,
            clip_grad=clip_grad,
            tp_group=ps.get_tensor_model_parallel_group(),
            grad_stats_group=ps.get_model_parallel_group(),
        )
    scheduler = OptimizerParamScheduler(
        optim,
        init_lr=0.0 if lr_warmup_iters else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=lr_warmup_iters,
        lr_decay_steps=train_iters,
        lr_decay_style=lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optim.scale_loss
    model.config.no_sync_func = ddp.no_sync
    return TrainingStack(model, ddp, optim, scheduler, impl, optimizer)
