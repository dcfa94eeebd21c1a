"""The SFT loop: packed chat rows -> megatron-core forward/backward schedule -> optimizer."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.data import (
    PackedRowSampler,
    SFTDataConfig,
    build_attention_mask,
    build_sft_dataset,
    collate_packed_rows,
    parse_weighted_paths,
)
from megatron_kaja.extras import require
from megatron_kaja.models.llama.config import LlamaArch, training_vocab_size
from megatron_kaja.models.llama.forward import token_losses
from megatron_kaja.parallel.distributed import (
    ParallelLayout,
    initialize_model_parallel,
    set_virtual_pipeline_size,
)
from megatron_kaja.training import checkpointing
from megatron_kaja.training.config import ConfigError, SFTConfig
from megatron_kaja.training.control import RunControl
from megatron_kaja.training.metrics import (
    MetricsWriter,
    Throughput,
    default_peak_tflops,
    format_log_line,
    training_flops_per_token,
)
from megatron_kaja.training.scale import check_scale_extras
from megatron_kaja.training.setup import build_training_stack, optimizer_settings

logger = logging.getLogger("megatron_kaja.train")


def _rank0_first(fn):
    """Run `fn` on rank 0, then on the others (they reuse rank 0's tokenization cache)."""
    if dist.get_rank() == 0:
        result = fn()
        dist.barrier()
    else:
        dist.barrier()
        result = fn()
    return result


def resolve_model_source(cfg, run_kind: str) -> tuple[LlamaArch, int | None, bool, Path]:
    """Where a run starts: (architecture, the checkpoint's padded vocab, resume?, weights).

    `--load` may be a converted checkpoint (weights), a training run of the same kind
    (resumed: weights, optimizer, schedule, data position, RNG) or a run of the other kind
    (its latest weights: GRPO starts from an SFT run's folder).
    """
    if cfg.load is None:
        raise ConfigError("--load is required: training starts from a converted checkpoint")
    found = checkpointing.latest_checkpoint(cfg.load)
    resume = found is not None and found[1] == run_kind
    weights = checkpointing.iteration_dir(cfg.load, found[0]) if found else cfg.load
    reader = open_mcore_checkpoint(weights)
    return reader.arch, reader.padded_vocab, resume, Path(weights)


def _data_config(cfg: SFTConfig, paths: list[str]) -> SFTDataConfig:
    extra = {"cache_dir": cfg.data_cache_dir} if cfg.data_cache_dir else {}
    return SFTDataConfig(
        sources=parse_weighted_paths(paths),
        seq_length=cfg.seq_length,
        overlong=cfg.overlong,
        chat_template=cfg.chat_template,
        num_workers=cfg.tokenizer_workers,
        seed=cfg.seed,
        **extra,
    )


def _loss_func(batch: dict, vocab_size: int, output_tensor: torch.Tensor):
    """Sum of token losses where the mask is on, and the number of such tokens."""
    loss_mask = batch["loss_mask"]
    losses = token_losses(output_tensor, batch["labels"], vocab_size)
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _packed_seq_params(batch: dict):
    """transformer-engine's packed (THD) attention: the micro-batch's rows as one sequence
    of samples delimited by `cu_seqlens` (no padding compute, positions restart per sample)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    max_seqlen = int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=batch["cu_seqlens"],
        cu_seqlens_kv=batch["cu_seqlens"],
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def _forward_step(vocab_size: int, transformer_impl: str, data_iterator, model):
    """Packed rows -> vocab-parallel logits (last stage) or hidden states (other stages).

    - transformer-engine: the THD layout (rows flattened into one packed sequence).
    - sdpa: the samples' boundaries (`cu_seqlens`); on GPU torch's varlen flash kernel
      attends within them.
    - local: a per-sample causal mask `[b, 1, s, s]`.
    Outside THD, megatron's RoPE numbers a row's tokens 0..s-1 rather than per sample; as
    attention stays inside a sample and RoPE scores depend only on relative positions, this
    equals restarting positions up to rounding.
    """
    batch = next(data_iterator)
    b, s = batch["tokens"].shape
    if transformer_impl == "transformer_engine":
        flat = {
            k: batch[k].reshape(1, b * s) for k in ("tokens", "position_ids", "labels", "loss_mask")
        }
        output = model(
            flat["tokens"], flat["position_ids"], None, packed_seq_params=_packed_seq_params(batch)
        )
        return output, partial(_loss_func, flat, vocab_size)
    if transformer_impl == "sdpa":
        from megatron_kaja.models.llama.sdpa import packed_seq_params

        output = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            packed_seq_params=packed_seq_params(batch["cu_seqlens"], s),
        )
    else:
        mask = build_attention_mask(batch["cu_seqlens"], b, s)
        output = model(batch["tokens"], batch["position_ids"], mask)
    return output, partial(_loss_func, batch, vocab_size)


def _device_batch(batch: dict) -> dict:
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_global_batch(
    stack, micro_batches: list[dict], seq_length: int, forward_only: bool, vocab_size: int
):
    """One global batch through megatron-core's schedule; returns (loss sum, tokens) over DP."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batch_size = micro_batches[0]["tokens"].shape[0]
    if stack.transformer_impl == "transformer_engine":
        # THD: each micro-batch travels between pipeline stages as one packed sequence.
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    batches = [_device_batch(mb) for mb in micro_batches]
    # Under an interleaved pipeline every model chunk reads each micro-batch (the first
    # chunk its tokens, all of them its mask and positions, the last its labels).
    iterators = [iter(batches) for _ in stack.ddp_chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, vocab_size, stack.transformer_impl),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=stack.ddp_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for out in outputs:
            totals += out["loss"].double().cpu()
    # Sum over data-parallel ranks, then hand the last stage's numbers to every stage.
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    return totals[0].item(), totals[1].item()


def _micro_batches(dataset, sampler_iter, count: int) -> list[dict]:
    return [collate_packed_rows([dataset[i] for i in next(sampler_iter)]) for _ in range(count)]


def evaluate(stack, dataset, layout: ParallelLayout, cfg: SFTConfig, vocab_size: int) -> float:
    """Token-mean loss over up to `eval_iters` global batches of the validation rows."""
    unit = cfg.micro_batch_size * layout.data_parallel_size
    batch = min(cfg.global_batch_size, len(dataset) // unit * unit)
    if batch == 0:
        raise ConfigError(f"--valid-data packs into {len(dataset)} rows, fewer than {unit}")
    sampler = PackedRowSampler(
        len(dataset),
        cfg.micro_batch_size,
        batch,
        layout.dp_rank,
        layout.data_parallel_size,
        cfg.seed,
    )
    steps = min(cfg.eval_iters, sampler.global_batches_per_epoch)
    per_rank = sampler.global_batch_size // (cfg.micro_batch_size * layout.data_parallel_size)
    it = iter(sampler)
    loss_sum = tokens = 0.0
    stack.set_train(False)
    with torch.no_grad():
        for _ in range(steps):
            s, n = run_global_batch(
                stack, _micro_batches(dataset, it, per_rank), cfg.seq_length, True, vocab_size
            )
            loss_sum, tokens = loss_sum + s, tokens + n
    stack.set_train(True)
    return loss_sum / max(tokens, 1.0)


def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the last logged metrics (on every rank)."""
    from transformers import AutoTokenizer

    if cfg.optimizer != "adam":
        require("bitsandbytes", f"--optimizer {cfg.optimizer}")  # before any compute
    check_scale_extras(cfg)
    if cfg.context_parallel_size > 1:
        # transformer-engine's ring attention over packed (THD) rows needs every sample
        # padded to a multiple of 2 x CP, which the packer does not do yet.
        raise ConfigError(
            "--context-parallel-size > 1: SFT's packed rows are not split over context-"
            "parallel ranks yet (each sample would need padding to 2 x CP tokens)"
        )
    layout = initialize_model_parallel(
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        seed=cfg.seed,
        context_parallel_size=cfg.context_parallel_size,
    )
    cfg.check_launched_world(layout.world_size)
    dp = cfg.check_world(layout.world_size)
    arch, ckpt_padded_vocab, resume, weights = resolve_model_source(cfg, "sft")
    cfg.check_preset(arch, f"--load {cfg.load}")
    set_virtual_pipeline_size(cfg.virtual_pipeline_size(arch))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if len(tokenizer) > arch.vocab_size:
        raise ConfigError(
            f"--tokenizer has {len(tokenizer)} tokens, the model only {arch.vocab_size}"
        )
    train_set = _rank0_first(
        lambda: build_sft_dataset(_data_config(cfg, cfg.train_data), tokenizer)
    )
    valid_set = None
    if cfg.valid_data:
        valid_set = _rank0_first(
            lambda: build_sft_dataset(_data_config(cfg, cfg.valid_data), tokenizer)
        )
    sampler = PackedRowSampler(
        len(train_set),
        cfg.micro_batch_size,
        cfg.global_batch_size,
        layout.dp_rank,
        dp,
        seed=cfg.seed,
    )
    train_iters = cfg.train_iters or cfg.train_epochs * sampler.global_batches_per_epoch
    tp = cfg.tensor_model_parallel_size
    stack = build_training_stack(
        arch,
        **optimizer_settings(cfg),
        train_iters=train_iters,
        adam_eps=cfg.adam_eps,
        **cfg.scale_build_settings(),
        transformer_impl=cfg.transformer_impl,
        padded_vocab_size=training_vocab_size(arch, ckpt_padded_vocab, tp),
    )
    start = 0
    if resume:
        state = checkpointing.load_checkpoint(cfg.load, stack, "sft")
        start = state["iteration"]
        sampler.load_state_dict(state["sampler"])
    else:
        load_mcore_weights(stack.model_chunks, weights, stack.transformer_impl)

    is_writer = dist.get_rank() == dist.get_world_size() - 1  # a last-stage rank
    writer = MetricsWriter(
        cfg.metrics_file,
        enabled=is_writer,
        tensorboard_dir=cfg.tensorboard_dir,
        wandb_project=cfg.wandb_project,
        wandb_name=cfg.wandb_exp_name,
        run_config=cfg.model_dump(mode="json"),
    )
    stats = train_set.stats
    if is_writer:
        logger.info(
            "data: %d samples -> %d rows of %d (utilization %.2f%%, truncated %d, dropped %d); "
            "%d iterations, %d micro-batches of %d per DP rank per step, DP=%d TP=%d PP=%d",
            stats.num_samples, stats.num_rows, cfg.seq_length, 100 * stats.utilization,
            stats.truncated, stats.dropped, train_iters, cfg.gradient_accumulation_steps(dp),
            cfg.micro_batch_size, dp, tp, cfg.pipeline_model_parallel_size,
        )  # fmt: skip
    peak = cfg.peak_tflops or default_peak_tflops()
    flops_per_token = training_flops_per_token(arch, cfg.seq_length)
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    throughput = Throughput(train_iters, start)
    accumulation = cfg.gradient_accumulation_steps(dp)
    sampler_iter = iter(sampler)
    record: dict = {}

    def save(iteration: int) -> None:
        checkpointing.save_checkpoint(
            cfg.save,
            iteration,
            stack,
            arch=arch,
            sampler_state=sampler.state_dict(),
            config=cfg.model_dump(mode="json"),
            run_kind="sft",
            optimizer_fully_reshardable=cfg.dist_ckpt_optim_fully_reshardable,
        )

    control = RunControl(
        train_iters=train_iters,
        save=save if cfg.save else None,
        save_interval=cfg.save_interval,
        exit_interval=cfg.exit_interval,
        handle_sigterm=cfg.exit_signal_handler,
    )
    iteration = start
    while iteration < train_iters:
        lr = stack.optimizer.param_groups[0]["lr"]
        stack.zero_grad_buffers()
        stack.optimizer.zero_grad()
        micro = _micro_batches(train_set, sampler_iter, accumulation)
        loss_sum, tokens = run_global_batch(stack, micro, cfg.seq_length, False, arch.vocab_size)
        success, grad_norm, _ = stack.optimizer.step()
        stack.scheduler.step(increment=1)
        iteration += 1
        if iteration % cfg.log_interval == 0 or iteration == train_iters:
            speed = throughput.report(iteration, tokens_per_step)
            mfu = None
            if peak:
                mfu = speed["tokens_per_s"] * flops_per_token / (peak * 1e12 * layout.world_size)
            record = {
                "step": iteration,
                "train_iters": train_iters,
                "loss": loss_sum / max(tokens, 1.0),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens": tokens_per_step,
                "loss_tokens": int(tokens),
                "skipped": not success,
                "mfu": mfu,
                **speed,
            }
            writer.log(record)
            if is_writer:
                logger.info(format_log_line(record))
        if valid_set is not None and cfg.eval_interval and iteration % cfg.eval_interval == 0:
            valid_loss = evaluate(stack, valid_set, layout, cfg, arch.vocab_size)
            writer.log({"step": iteration, "valid_loss": valid_loss})
            if is_writer:
                logger.info("step %d | valid loss %.4f", iteration, valid_loss)
        if control.after_step(iteration):
            if is_writer and iteration < train_iters:
                logger.info("exiting at iteration %d (SIGTERM or --exit-interval)", iteration)
            break
    writer.close()
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pretrain_sft.py`."""
    from megatron_kaja.training.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its INFO dumps every bucket
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    try:
        if cfg.dry_run:
            from megatron_kaja.training.launch import plan_sft

            return plan_sft(cfg)
        train(cfg)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        from megatron_kaja.parallel.distributed import destroy_model_parallel

        if dist.is_initialized():
            destroy_model_parallel()
    return 0
