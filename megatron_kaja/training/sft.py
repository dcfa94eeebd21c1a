"""The SFT loop: packed chat rows -> megatron-core forward/backward schedule -> optimizer."""

from __future__ import annotations

import logging
from functools import partial

import torch
import torch.distributed as dist

from megatron_kaja.data import (
    SFTDataConfig,
    build_sft_dataset,
    collate_packed_rows,
    load_conversations,
    parse_weighted_paths,
)
from megatron_kaja.models.llama.attention import AttentionBackend, attention_backend
from megatron_kaja.models.llama.forward import token_losses
from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.training.config import SFTConfig
from megatron_kaja.training.loop import (
    Run,
    Trainer,
    data_sampler,
    device_batch,
    rank0_first,
    run_training,
    validation_sampler,
)
from megatron_kaja.training.loop import main as run_main
from megatron_kaja.training.metrics import (
    Throughput,
    default_peak_tflops,
    format_log_line,
    training_flops_per_token,
)

logger = logging.getLogger("megatron_kaja.train")


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


def _forward_step(vocab_size: int, attention: AttentionBackend, data_iterator, model):
    """Packed rows -> vocab-parallel logits (last stage) or hidden states (other stages), fed
    as the attention backend feeds them (`models/llama/attention.py`)."""
    output, batch = attention.forward(model, next(data_iterator))
    return output, partial(_loss_func, batch, vocab_size)


def run_global_batch(
    stack, micro_batches: list[dict], seq_length: int, forward_only: bool, vocab_size: int
):
    """One global batch through megatron-core's schedule; returns (loss sum, tokens) over the
    whole batch (every data-parallel rank, and every context-parallel rank's part of the rows)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    attention = attention_backend(stack.transformer_impl)
    seq_length, micro_batch_size = attention.schedule_shape(
        seq_length, micro_batches[0]["tokens"].shape[0]
    )
    batches = [device_batch(mb) for mb in micro_batches]
    # Under an interleaved pipeline every model chunk reads each micro-batch (the first
    # chunk its tokens, all of them its mask and positions, the last its labels).
    iterators = [iter(batches) for _ in stack.ddp_chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, vocab_size, attention),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=stack.ddp_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=compute_device())  # NCCL: on the device
    if ps.is_pipeline_last_stage():
        for out in outputs:
            totals += out["loss"].double()
    # Sum over data-parallel and context-parallel ranks (each CP rank holds its chunks of the
    # rows: its loss sum and tokens are a part), then hand the last stage's numbers to every
    # stage. finalize_model_grads sums the gradients' token count over the same group.
    dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    return totals[0].item(), totals[1].item()


def _micro_batches(dataset, sampler_iter, count: int) -> list[dict]:
    return [collate_packed_rows([dataset[i] for i in next(sampler_iter)]) for _ in range(count)]


def evaluate(run: Run, dataset) -> float:
    """Token-mean loss over up to `--eval-iters` global batches of the validation rows."""
    sampler, steps, per_rank = validation_sampler(run, len(dataset), "packed rows")
    it = iter(sampler)
    loss_sum = tokens = 0.0
    stack, cfg = run.stack, run.cfg
    stack.set_train(False)
    with torch.no_grad():
        for _ in range(steps):
            s, n = run_global_batch(
                stack, _micro_batches(dataset, it, per_rank), cfg.seq_length, True,
                run.arch.vocab_size,
            )  # fmt: skip
            loss_sum, tokens = loss_sum + s, tokens + n
    stack.set_train(True)
    return loss_sum / max(tokens, 1.0)


class SFTTrainer(Trainer):
    """`pretrain_sft.py`: packed chat rows, token-mean cross-entropy on the answers."""

    run_kind = "sft"
    settings = SFTConfig
    per_token_loss = True
    logger = logger

    def prepare(self, run: Run) -> int:
        cfg = run.cfg
        self.train_set = rank0_first(
            lambda: build_sft_dataset(_data_config(cfg, cfg.train_data), run.tokenizer)
        )
        self.valid_set = None
        if cfg.valid_data:
            self.valid_set = rank0_first(
                lambda: build_sft_dataset(_data_config(cfg, cfg.valid_data), run.tokenizer)
            )
        self.dp = run.layout.data_parallel_size
        self.sampler = data_sampler(run, len(self.train_set))
        return cfg.train_iters or cfg.train_epochs * self.sampler.global_batches_per_epoch

    def start(self, run: Run, resumed: dict | None) -> None:
        cfg = run.cfg
        if resumed is not None:
            self.sampler.load_state_dict(resumed["sampler"])
        self.sampler_iter = iter(self.sampler)
        self.throughput = Throughput(run.train_iters, run.start)
        self.tokens_per_step = cfg.global_batch_size * cfg.seq_length
        self.flops_per_token = training_flops_per_token(run.arch, cfg.seq_length)
        self.peak = cfg.peak_tflops or default_peak_tflops()

    def checkpoint_state(self) -> dict:
        return self.sampler.state_dict()

    def describe(self, run: Run) -> str:
        cfg, stats = run.cfg, self.train_set.stats
        return (
            f"data: {stats.num_samples} samples -> {stats.num_rows} rows of {cfg.seq_length} "
            f"(utilization {100 * stats.utilization:.2f}%, truncated {stats.truncated}, "
            f"dropped {stats.dropped}); {run.train_iters} iterations, "
            f"{cfg.gradient_accumulation_steps(self.dp)} micro-batches of "
            f"{cfg.micro_batch_size} per DP rank per step, DP={self.dp} "
            f"TP={cfg.tensor_model_parallel_size} PP={cfg.pipeline_model_parallel_size}"
            + (f" CP={cfg.context_parallel_size}" if cfg.context_parallel_size > 1 else "")
        )

    def step(self, run: Run, iteration: int, log: bool) -> list[dict]:
        cfg, stack = run.cfg, run.stack
        lr = stack.optimizer.param_groups[0]["lr"]
        stack.zero_grad_buffers()
        stack.optimizer.zero_grad()
        micro = _micro_batches(
            self.train_set, self.sampler_iter, cfg.gradient_accumulation_steps(self.dp)
        )
        loss_sum, tokens = run_global_batch(
            stack, micro, cfg.seq_length, False, run.arch.vocab_size
        )
        success, grad_norm, _ = stack.optimizer.step()
        stack.scheduler.step(increment=1)
        step = iteration + 1
        records = []
        if log:
            speed = self.throughput.report(step, self.tokens_per_step)
            mfu = None
            if self.peak:
                flops = speed["tokens_per_s"] * self.flops_per_token
                mfu = flops / (self.peak * 1e12 * run.layout.world_size)
            records.append(
                {
                    "step": step,
                    "train_iters": run.train_iters,
                    "loss": loss_sum / max(tokens, 1.0),
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens": self.tokens_per_step,
                    "loss_tokens": int(tokens),
                    "skipped": not success,
                    "mfu": mfu,
                    **speed,
                }
            )
            if torch.cuda.is_available():  # the peak since the start: what the scale flags cut
                records[-1]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.valid_set is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            valid_loss = evaluate(run, self.valid_set)
            records.append({"step": step, "valid_loss": valid_loss})
        return records

    def log_line(self, record: dict) -> str:
        if "valid_loss" in record:
            return f"step {record['step']} | valid loss {record['valid_loss']:.4f}"
        return format_log_line(record)

    def plan(self, cfg: SFTConfig) -> int:
        """`pretrain_sft.py --dry-run`: check the run as configured, print layout and memory."""
        from megatron_kaja.training.launch import describe_optimizer, plan_layout, start_plan
        from megatron_kaja.training.memory import estimate_memory

        report, arch, dp = start_plan(cfg, "pretrain_sft.py")
        tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
        accumulation = cfg.gradient_accumulation_steps(dp)
        recompute = cfg.recompute_granularity or "none"
        report.add(
            f"layout: TP={tp} x PP={pp} x DP={dp}; micro-batch {cfg.micro_batch_size} x "
            f"{accumulation} accumulation steps x DP {dp} = global batch "
            f"{cfg.global_batch_size} rows of {cfg.seq_length} tokens; recompute {recompute}; "
            f"{describe_optimizer(cfg)}; scale: {cfg.describe_scale()}"
        )
        data = [s.path for s in parse_weighted_paths(cfg.train_data)]
        if cfg.valid_data:
            data += [s.path for s in parse_weighted_paths(cfg.valid_data)]
        report.check_files(
            [("--load", cfg.load), ("--tokenizer", cfg.tokenizer)]
            + [("--train-data/--valid-data", p) for p in data]
            + [("--chat-template", cfg.chat_template)]
        )
        report.check_tokenizer(cfg.tokenizer, arch)
        report.add("data:")
        for source in parse_weighted_paths(cfg.train_data + (cfg.valid_data or [])):
            report.check_data(
                "--train-data/--valid-data",
                source.path,
                lambda s=source: len(load_conversations(s)),
            )
        layout = plan_layout(cfg, dp, cfg.seq_length, accumulation, arch)
        report.recommend(arch, layout)
        return report.finish(estimate_memory(arch, layout))


def train(cfg: SFTConfig) -> dict:
    """Run SFT as configured; returns the last logged metrics."""
    return run_training(cfg, SFTTrainer())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pretrain_sft.py`."""
    return run_main(SFTTrainer(), argv)
