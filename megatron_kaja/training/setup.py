"""Model, megatron DDP, optimizer (megatron's, or bitsandbytes' 8-bit AdamW) and lr schedule
for a training run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.model import build_model_chunks, default_transformer_impl
from megatron_kaja.training.bnb_optimizer import Bnb8bitOptimizer

if TYPE_CHECKING:  # megatron-core costs seconds to import: only where a stack is built
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass
class TrainingStack:
    """This rank's model stage (one chunk, or one per virtual stage) and what trains it."""

    model_chunks: list[GPTModel]  # this rank's pipeline stage, chunk by chunk
    ddp_chunks: list[DistributedDataParallel]  # megatron's wrapper around each chunk
    optimizer: MegatronOptimizer | Bnb8bitOptimizer
    scheduler: OptimizerParamScheduler
    transformer_impl: str  # the attention backend's name (`models/llama/attention.py`)
    optimizer_kind: str  # the --optimizer value: "adam" (megatron) or a BNB_OPTIMIZERS key

    @property
    def model(self) -> GPTModel:
        """The model of a rank that holds one chunk (no interleaved pipeline)."""
        if len(self.model_chunks) != 1:
            raise ValueError("this rank holds several model chunks (interleaved pipeline)")
        return self.model_chunks[0]

    @property
    def ddp(self) -> DistributedDataParallel:
        """The DDP wrapper of a rank that holds one chunk."""
        if len(self.ddp_chunks) != 1:
            raise ValueError("this rank holds several model chunks (interleaved pipeline)")
        return self.ddp_chunks[0]

    def zero_grad_buffers(self) -> None:
        for chunk in self.ddp_chunks:
            chunk.zero_grad_buffer()

    def sync_params(self) -> None:
        """Finish the parameter all-gather now. With `--overlap-param-gather` the distributed
        optimizer's step leaves each rank's parameters updated only in its own shard until the
        next forward gathers them bucket by bucket; whatever reads the parameters outside a
        forward (a checkpoint save, a weight export) calls this first."""
        for chunk in self.ddp_chunks:
            if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)

    def set_train(self, mode: bool = True) -> None:
        for chunk in self.ddp_chunks:
            chunk.train(mode)


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
    recompute_method: str | None = None,
    recompute_num_layers: int | None = None,
    sequence_parallel: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
    ddp_bucket_size: int | None = None,
    decoder_first_pipeline_num_layers: int | None = None,
    decoder_last_pipeline_num_layers: int | None = None,
    fp8_format: str | None = None,
    fp8_recipe: str | None = None,
    transformer_impl: str | None = None,
    padded_vocab_size: int | None = None,
    per_token_loss: bool = True,
) -> TrainingStack:
    """Build this rank's model stage (its chunks, under an interleaved pipeline) wrapped for
    training.

    With `per_token_loss` (SFT) losses are per-token sums (`calculate_per_token_loss`):
    megatron then divides the summed gradients by the number of loss tokens in the whole
    global batch, across micro-batches and data-parallel ranks, so the result does not
    depend on the DP x accumulation split. Without it (GRPO, whose step normalizes its own
    loss) gradients are averaged over data-parallel ranks.

    `optimizer` "adam" is megatron's optimizer (fp32 master weights under bf16, optionally
    distributed); "adamw_8bit" / "paged_adamw_8bit" is bitsandbytes' (`Bnb8bitOptimizer`),
    fed by the same DDP gradient buffers.

    `overlap_grad_reduce` starts each gradient bucket's all-reduce (reduce-scatter with the
    distributed optimizer) from a backward hook as soon as the bucket is complete, in the last
    micro-batch; `overlap_param_gather` (distributed optimizer) gathers the updated
    parameters bucket by bucket in the next forward. `ddp_bucket_size` is in elements
    (megatron-core's default with overlap: max(40M, 1M x DP)). Both only move communication,
    so losses and weights equal the non-overlapped run's.
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
    chunks = build_model_chunks(
        arch,
        transformer_impl=impl,
        bf16=bf16,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        sequence_parallel=sequence_parallel,
        first_stage_layers=decoder_first_pipeline_num_layers,
        last_stage_layers=decoder_last_pipeline_num_layers,
        fp8_format=fp8_format,
        fp8_recipe=fp8_recipe,
        vocab_size_override=padded_vocab_size,
    )
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = per_token_loss
    if optimizer != "adam" and len(chunks) > 1:
        raise ValueError(f"--optimizer {optimizer} takes one model chunk: no interleaved pipeline")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=use_distributed_optimizer,
        average_in_collective=not per_token_loss,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        bucket_size=ddp_bucket_size,
    )
    ddp_chunks = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # As Megatron-LM: one bucket for the chunks after the first, whose communication
            # overlaps with the other chunks' compute in the interleaved schedule anyway.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    model = chunks[0]
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
            ddp_chunks,
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
    # The schedule's hooks, as Megatron-LM's training.py sets them: grad sync is off until
    # the last micro-batch (no_sync), and with overlap each chunk's grad reduce is launched
    # when its last backward is done. The param all-gather of --overlap-param-gather is
    # driven by DDP's forward pre-hooks, bucket by bucket (Megatron-LM's
    # --no-align-param-gather), so the schedule needs no param_sync_func.
    for chunk in chunks:
        cfg = chunk.config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optim.scale_loss
        cfg.no_sync_func = _per_chunk([d.no_sync for d in ddp_chunks])
        if overlap_grad_reduce:
            cfg.grad_sync_func = _per_chunk([d.start_grad_sync for d in ddp_chunks])
    return TrainingStack(chunks, ddp_chunks, optim, scheduler, impl, optimizer)


def _per_chunk(funcs: list):
    """One function for one chunk, the list for several (what megatron-core's schedules take)."""
    return funcs[0] if len(funcs) == 1 else funcs
