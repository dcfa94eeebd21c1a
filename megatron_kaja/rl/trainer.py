"""The GRPO loop of `train_grpo.py`: prompts -> `grpo_step` -> megatron optimizer, with the
SFT trainer's stack (megatron DDP + optimizer + schedule), checkpoints and metrics."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.data.readers import read_records
from megatron_kaja.data.records import DataFormatError
from megatron_kaja.data.sources import DataSource
from megatron_kaja.extras import MissingExtraError, require
from megatron_kaja.models.llama.config import training_vocab_size
from megatron_kaja.models.llama.model import build_gpt_model
from megatron_kaja.parallel.distributed import initialize_model_parallel
from megatron_kaja.rl.engines import build_rollout_engine
from megatron_kaja.rl.rollout import PromptRecord, prompt_record
from megatron_kaja.rl.run_config import GRPORunConfig
from megatron_kaja.rl.step import grpo_step
from megatron_kaja.training import checkpointing
from megatron_kaja.training.config import ConfigError
from megatron_kaja.training.control import RunControl
from megatron_kaja.training.metrics import MetricsWriter
from megatron_kaja.training.setup import build_training_stack, optimizer_settings
from megatron_kaja.training.sft import resolve_model_source

logger = logging.getLogger("megatron_kaja.grpo")


def load_prompts(
    specs: list[str], tokenizer, max_prompt_length: int | None = None
) -> list[PromptRecord]:
    """Read `PATH:KIND` prompt files (AnswerCarefully / instructions / ELYZA schemas).

    Prompts longer than `max_prompt_length` tokens are skipped and counted in the log: the
    bound is what the memory plan (rollout KV cache, training sequence) was made for.
    """
    prompts, too_long = [], 0
    for spec in specs:
        path, _, kind = spec.rpartition(":")
        for location, record in read_records(DataSource(path=path)):
            if not isinstance(record, dict):
                raise DataFormatError(f"{location}: a prompt record is a JSON object")
            try:
                prompt = prompt_record(tokenizer, record, kind)
            except ValueError as exc:
                raise DataFormatError(f"{location}: {exc}") from None
            if max_prompt_length is not None and len(prompt.prompt_ids) > max_prompt_length:
                too_long += 1
                continue
            prompts.append(prompt)
    if too_long:
        logger.warning("skipped %d prompts longer than --max-prompt-length", too_long)
    if not prompts:
        raise DataFormatError(f"--prompts {' '.join(specs)}: no prompts")
    return prompts


class PromptSchedule:
    """Which prompts each data-parallel rank draws at each step, from the step alone.

    Prompts are visited in a seeded permutation per epoch; step t's global batch starts at
    prompt t x prompts-per-step and each DP rank takes its contiguous share. Because the
    position follows from the step, resuming needs nothing but the iteration number (a rank
    that oversamples to refill dropped groups simply reads on into the following prompts).
    """

    def __init__(self, prompts: list[PromptRecord], seed: int):
        self.prompts = prompts
        self.seed = seed

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def stream(self, step: int, dp_rank: int, per_rank: int, dp: int) -> Iterator[PromptRecord]:
        position = step * per_rank * dp + dp_rank * per_rank
        while True:
            epoch, index = divmod(position, len(self.prompts))
            yield self.prompts[self._order(epoch)[index]]
            position += 1


def build_reward_fn(cfg: GRPORunConfig):
    """The weighted sum of `--reward NAME[:WEIGHT]` terms (the judge built from --judge-*)."""
    from megatron_kaja.judge import JudgeConfig, LLMJudge, load_rubric
    from megatron_kaja.judge.backend import build_judge_backend
    from megatron_kaja.judge.rewards import WeightedReward, build_reward

    terms = []
    for spec in cfg.reward:
        name, _, weight = spec.partition(":")
        if name == "judge":
            backend = build_judge_backend(
                cfg.judge_backend,
                cfg.judge_model,
                base_url=cfg.judge_base_url,
                api_key=os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None,
                concurrency=cfg.judge_concurrency,
            )
            backend.check()
            rubrics = {n: load_rubric(n) for n in ("grpo_safety", "grpo_helpful")}
            judge = LLMJudge(backend, rubrics, JudgeConfig(mode="choice"))
            terms.append((build_reward("judge", judge=judge), float(weight or 1.0)))
        else:
            terms.append((build_reward(name), float(weight or 1.0)))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return WeightedReward(terms)


def model_parallel_shared(reward_fn):
    """Score on the first rank of each model-parallel group (TP x PP) only and share the
    result: those ranks hold identical rollouts, so the judge sees each completion once per
    data-parallel rank, not once per TP or pipeline rank."""
    from megatron.core import parallel_state as ps

    def reward(prompts, completions, **columns):
        group = ps.get_model_parallel_group()
        payload = [
            reward_fn(prompts, completions, **columns) if dist.get_rank(group=group) == 0 else None
        ]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        return payload[0]

    reward.__name__ = getattr(reward_fn, "__name__", "reward")
    return reward


class _MegatronOptimizerStep:
    """`zero_grad()` / `step()` for `grpo_step` over megatron DDP + the run's optimizer
    (megatron's, or bitsandbytes' 8-bit AdamW)."""

    def __init__(self, stack):
        self.stack = stack
        self.grad_norm = float("nan")

    def zero_grad(self) -> None:
        self.stack.ddp.zero_grad_buffer()
        self.stack.optimizer.zero_grad()

    def step(self) -> None:
        self.stack.ddp.finish_grad_sync()  # average gradients over data-parallel ranks
        _, grad_norm, _ = self.stack.optimizer.step()
        self.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")


def merge_rank_metrics(per_rank: list[dict]) -> dict:
    """One step's metrics over data-parallel ranks: each number is the mean over the ranks
    that have it (not NaN). Ranks may differ in their keys: `reward_mean/<kind>` exists only
    where that kind was drawn."""
    merged: dict = {}
    for metrics in per_rank:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                merged.setdefault(key, value)
            elif not math.isnan(value):
                merged.setdefault(key, []).append(float(value))
            else:
                merged.setdefault(key, [])
    return {
        k: (sum(v) / len(v) if v else math.nan) if isinstance(v, list) else v
        for k, v in merged.items()
    }


def _mean_over_data_parallel(metrics: dict) -> dict:
    from megatron.core import parallel_state as ps

    per_rank: list = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(per_rank, metrics, group=ps.get_data_parallel_group())
    return merge_rank_metrics(per_rank)


def train_grpo(cfg: GRPORunConfig) -> dict:
    """Run GRPO as configured; returns the last step's metrics."""
    from transformers import AutoTokenizer

    if cfg.optimizer != "adam":
        require("bitsandbytes", f"--optimizer {cfg.optimizer}")  # before any compute
    layout = initialize_model_parallel(
        cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed
    )
    cfg.check_launched_world(layout.world_size)
    dp = layout.data_parallel_size
    if cfg.global_batch_size % (cfg.num_generations * dp):
        raise ConfigError(
            f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
            f"--num-generations {cfg.num_generations} x data-parallel size {dp}"
        )
    grpo = cfg.grpo_config()
    per_rank = grpo.prompts_per_step // dp
    if cfg.rollout_engine == "vllm":  # before any compute
        require("vllm", "the vllm rollout engine (--rollout-engine vllm)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    # errors name file and line, before compute
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.max_prompt_length)
    reward_fn = model_parallel_shared(build_reward_fn(cfg))
    arch, ckpt_vocab, resume, weights = resolve_model_source(cfg, "grpo")
    cfg.check_preset(arch, f"--load {cfg.load}")
    steps_per_epoch = max(1, len(prompts) // grpo.prompts_per_step)
    train_iters = cfg.train_iters or cfg.train_epochs * steps_per_epoch
    tp = cfg.tensor_model_parallel_size
    padded = training_vocab_size(arch, ckpt_vocab, tp)
    stack = build_training_stack(
        arch,
        **optimizer_settings(cfg),
        **cfg.scale_build_settings(),
        train_iters=train_iters,
        padded_vocab_size=padded,
        per_token_loss=False,
    )
    start, ref_source = 0, cfg.ref_load or weights
    if resume:
        state = checkpointing.load_checkpoint(cfg.load, stack, "grpo")
        start = state["iteration"]
        ref_source = cfg.ref_load or state["config"].get("ref_load") or state["config"]["load"]
    else:
        load_mcore_weights(stack.model, weights, stack.transformer_impl)
    ref_model = None
    if grpo.beta > 0:
        ref_model = build_gpt_model(
            arch,
            bf16=cfg.bf16,
            vocab_size_override=padded,
            first_stage_layers=cfg.decoder_first_pipeline_num_layers,  # the policy's split
            last_stage_layers=cfg.decoder_last_pipeline_num_layers,
        )
        load_mcore_weights(ref_model, ref_source)
        ref_model.requires_grad_(False).eval()
    run_config = {**cfg.model_dump(mode="json"), "ref_load": str(ref_source)}

    is_writer = dist.get_rank() == 0
    writer = MetricsWriter(
        cfg.metrics_file,
        enabled=is_writer,
        tensorboard_dir=cfg.tensorboard_dir,
        wandb_project=cfg.wandb_project,
        run_config=run_config,
    )
    if is_writer:
        logger.info(
            "%d prompts, %d steps, %d prompts x %d generations per step (%d per DP rank), "
            "DP=%d TP=%d PP=%d, %s rollout engine",
            len(prompts), train_iters, grpo.prompts_per_step, grpo.num_generations,
            per_rank, dp, tp, cfg.pipeline_model_parallel_size, cfg.rollout_engine,
        )  # fmt: skip
    schedule = PromptSchedule(prompts, cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else arch.eos_token_id
    engine = build_rollout_engine(
        cfg.rollout_engine,
        stack.model,
        arch,
        eos_token_id=arch.eos_token_id,
        pad_token_id=pad_id,
        vocab_size=arch.vocab_size,
        tokenizer_dir=cfg.tokenizer,
        max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
        gpu_memory_utilization=cfg.rollout_gpu_memory_utilization,
        seed=cfg.seed + layout.dp_rank,
        transformer_impl=stack.transformer_impl,
    )
    optimizer = _MegatronOptimizerStep(stack)
    generator = torch.Generator()
    started = time.perf_counter()
    metrics: dict = {}

    def save(iteration: int) -> None:
        checkpointing.save_checkpoint(
            cfg.save,
            iteration,
            stack,
            arch=arch,
            sampler_state={},
            config=run_config,
            run_kind="grpo",
        )

    control = RunControl(
        train_iters=train_iters,
        save=save if cfg.save else None,
        save_interval=cfg.save_interval,
        exit_interval=cfg.exit_interval,
    )
    iteration = start
    while iteration < train_iters:
        lr = stack.optimizer.param_groups[0]["lr"]
        # The sampling stream follows from (seed, step, DP rank): identical across the TP
        # ranks of a group and across a resume.
        seed = np.random.SeedSequence([cfg.seed, iteration, layout.dp_rank]).generate_state(1)
        generator.manual_seed(int(seed[0]))
        synced = time.perf_counter()
        stack.sync_params()  # --overlap-param-gather: the last step left shards to gather
        engine.load_weights(stack.model)  # the weights of the last update (or of the start)
        synced = time.perf_counter() - synced
        stack.model.train()
        step_metrics = grpo_step(
            stack.model,
            ref_model,
            optimizer,
            schedule.stream(iteration, layout.dp_rank, per_rank, dp),
            reward_fn,
            grpo,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            eos_token_id=arch.eos_token_id,
            pad_token_id=pad_id,
            vocab_size=arch.vocab_size,
            generator=generator,
            num_prompts=per_rank,
            engine=engine,
        )
        stack.scheduler.step(increment=1)
        iteration += 1
        # t_sync: weights into the engine and, inside the step, its sleep (0 for builtin).
        step_metrics.update(
            grad_norm=optimizer.grad_norm, t_sync=step_metrics.get("t_sync", 0.0) + synced
        )
        metrics = _mean_over_data_parallel(step_metrics)
        metrics.update(
            step=iteration, train_iters=train_iters, lr=lr, elapsed_s=time.perf_counter() - started
        )
        if iteration % cfg.log_interval == 0 or iteration == train_iters:
            writer.log(metrics)
            if is_writer:
                logger.info(
                    "step %d/%d | reward %.3f (std %.3f) | loss %.4f | kl %.4f | clip %.3f | "
                    "zero-var %.2f | len %.1f | lr %.2e",
                    iteration, train_iters, metrics["reward_mean"], metrics["reward_std"],
                    metrics["loss"], metrics["kl"], metrics["clip_frac"],
                    metrics["zero_variance_frac"], metrics["response_len_mean"], lr,
                )  # fmt: skip
        if control.after_step(iteration):
            break
    engine.close()
    writer.close()
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_grpo.py`."""
    from megatron_kaja.parallel.distributed import destroy_model_parallel
    from megatron_kaja.training.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        cfg = load_config(argv, GRPORunConfig)
        if cfg.dry_run:
            from megatron_kaja.training.launch import plan_grpo

            return plan_grpo(cfg)
        train_grpo(cfg)
    except (ConfigError, DataFormatError, MissingExtraError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if dist.is_initialized():
            destroy_model_parallel()
    return 0
