"""The GRPO trainer of `train_grpo.py`: prompts -> `grpo_step` -> megatron optimizer, on the
run skeleton (`training/loop.py`: world, stack, checkpoints, metrics, run control)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch.distributed as dist

from megatron_kaja.data.readers import read_records
from megatron_kaja.data.records import DataFormatError
from megatron_kaja.data.sources import DataSource
from megatron_kaja.extras import require
from megatron_kaja.models.llama.model import build_model_chunks
from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.rl.engines import EngineSettings, build_rollout_engine
from megatron_kaja.rl.rollout import PromptRecord, RolloutSeeds, prompt_record
from megatron_kaja.rl.run_config import GRPORunConfig
from megatron_kaja.rl.step import grpo_step
from megatron_kaja.training.loop import Run, Trainer, run_training
from megatron_kaja.training.loop import main as run_main

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
                request_timeout_s=cfg.judge_request_timeout,
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
    """Score on the first rank of each model-parallel group (TP x PP x CP) only and share the
    result: those ranks hold identical rollouts, so the judge sees each completion once per
    data-parallel rank, not once per TP, pipeline or context-parallel rank."""
    from megatron.core import parallel_state as ps

    def reward(prompts, completions, **columns):
        group, cp_group = ps.get_model_parallel_group(), ps.get_context_parallel_group()
        first = dist.get_rank(group=group) == 0 and dist.get_rank(group=cp_group) == 0
        payload = [reward_fn(prompts, completions, **columns) if first else None]
        # megatron-core's model-parallel group is TP x PP: first CP rank 0's scores reach the
        # other CP ranks (each the first of its own TP x PP group), then every group's ranks.
        if dist.get_world_size(group=cp_group) > 1:
            dist.broadcast_object_list(
                payload, src=dist.get_global_rank(cp_group, 0), group=cp_group
            )
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
        self.stack.zero_grad_buffers()
        self.stack.optimizer.zero_grad()

    def step(self) -> None:
        # What megatron-core's schedule runs after the last backward (the step runs its
        # micro-batches itself): finish the data-parallel gradient average (waiting for the
        # buckets --overlap-grad-reduce launched), and sum the gradients of the weights that
        # saw only this rank's slice of the sequence (--sequence-parallel's norms) over TP.
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(self.stack.ddp_chunks)
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


def model_or_chunks(chunks: list):
    """A model as `grpo_step` and the rollout engine take it: this rank's GPTModel, or the
    list of its chunks under an interleaved pipeline."""
    return chunks[0] if len(chunks) == 1 else chunks


def policy_model(stack):
    """The policy as `grpo_step` and the rollout engine take it (`model_or_chunks`)."""
    return model_or_chunks(stack.model_chunks)


class GRPOTrainer(Trainer):
    """`train_grpo.py`: rollouts from the policy, judge rewards, clipped loss + KL."""

    run_kind = "grpo"
    settings = GRPORunConfig
    per_token_loss = False  # the step normalizes its own loss
    logger = logger

    def check_extras(self, cfg: GRPORunConfig) -> None:
        if cfg.rollout_engine == "vllm":
            require("vllm", "the vllm rollout engine (--rollout-engine vllm)")

    def prepare(self, run: Run) -> int:
        cfg = run.cfg
        self.grpo = cfg.grpo_config()
        self.dp = run.layout.data_parallel_size
        self.per_rank = self.grpo.prompts_per_step // self.dp
        # errors name file and line, before compute
        self.prompts = load_prompts(cfg.prompts, run.tokenizer, cfg.max_prompt_length)
        self.reward_fn = model_parallel_shared(build_reward_fn(cfg))
        self.schedule = PromptSchedule(self.prompts, cfg.seed)
        steps_per_epoch = max(1, len(self.prompts) // self.grpo.prompts_per_step)
        return cfg.train_iters or cfg.train_epochs * steps_per_epoch

    def start(self, run: Run, resumed: dict | None) -> None:
        cfg, arch = run.cfg, run.arch
        ref_source = cfg.ref_load or run.source.weights
        if resumed is not None:
            saved = resumed["config"]
            ref_source = cfg.ref_load or saved.get("ref_load") or saved["load"]
        self.ref_source = ref_source
        self.ref_model = None
        if self.grpo.beta > 0:
            from megatron_kaja.checkpoint.loading import load_mcore_weights

            impl = run.stack.transformer_impl  # the policy's layer spec: same kernels on a GPU
            # Chunked as the policy (one per virtual stage under an interleaved pipeline): the
            # reference pass runs the same schedule over the same layer split.
            chunks = build_model_chunks(
                arch,
                transformer_impl=impl,
                bf16=cfg.bf16,
                vocab_size_override=run.padded_vocab,
                first_stage_layers=cfg.decoder_first_pipeline_num_layers,  # the policy's split
                last_stage_layers=cfg.decoder_last_pipeline_num_layers,
                # Its forward takes the policy's (padded) rows; SP shrinks its activations too.
                sequence_parallel=cfg.sequence_parallel,
            )
            load_mcore_weights(chunks, ref_source, impl)
            for chunk in chunks:
                chunk.requires_grad_(False).eval()
            self.ref_model = model_or_chunks(chunks)
        tokenizer = run.tokenizer
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else arch.eos_token_id
        )
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.engine = build_rollout_engine(
            cfg.rollout_engine,
            policy_model(run.stack),
            arch,
            EngineSettings(
                eos_token_id=arch.eos_token_id,
                pad_token_id=self.pad_id,
                vocab_size=arch.vocab_size,
                tokenizer_dir=cfg.tokenizer,
                max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                gpu_memory_utilization=cfg.rollout_gpu_memory_utilization,
                seed=cfg.seed,  # requests carry their own seeds (RolloutSeeds)
                transformer_impl=run.stack.transformer_impl,
            ),
        )
        self.optimizer = _MegatronOptimizerStep(run.stack)
        self.started = time.perf_counter()

    def run_config(self, run: Run) -> dict:
        return {**run.cfg.model_dump(mode="json"), "ref_load": str(self.ref_source)}

    def describe(self, run: Run) -> str:
        cfg, chunks = run.cfg, len(run.stack.model_chunks)
        return (
            f"{len(self.prompts)} prompts, {run.train_iters} steps, {self.grpo.prompts_per_step} "
            f"prompts x {self.grpo.num_generations} generations per step ({self.per_rank} per "
            f"DP rank), DP={self.dp} TP={cfg.tensor_model_parallel_size} "
            f"PP={cfg.pipeline_model_parallel_size}"
            + (f" x {chunks} virtual stages" if chunks > 1 else "")
            + (f" CP={cfg.context_parallel_size}" if cfg.context_parallel_size > 1 else "")
            + f", {cfg.rollout_engine} rollout engine"
        )

    def step(self, run: Run, iteration: int, log: bool) -> list[dict]:
        from megatron.core import parallel_state as ps

        cfg, stack = run.cfg, run.stack
        lr = stack.optimizer.param_groups[0]["lr"]
        synced = time.perf_counter()
        stack.sync_params()  # --overlap-param-gather: the last step left shards to gather
        policy = policy_model(stack)
        self.engine.load_weights(policy)  # the weights of the last update (or the start)
        synced = time.perf_counter() - synced
        for chunk in stack.model_chunks:
            chunk.train()
        step_metrics = grpo_step(
            policy,
            self.ref_model,
            self.optimizer,
            self.schedule.stream(iteration, run.layout.dp_rank, self.per_rank, self.dp),
            self.reward_fn,
            self.grpo,
            decode=self.decode,
            eos_token_id=run.arch.eos_token_id,
            pad_token_id=self.pad_id,
            vocab_size=run.arch.vocab_size,
            # Each completion's sampling stream follows from (seed, step, the prompt's index in
            # the step): the same on the TP ranks of a group, at any DP size, and on resume.
            seeds=RolloutSeeds(
                cfg.seed,
                iteration,
                first_prompt=run.layout.dp_rank * self.per_rank,
                device=compute_device(),
            ),
            num_prompts=self.per_rank,
            engine=self.engine,
            data_parallel_group=ps.get_data_parallel_group(),
        )
        stack.scheduler.step(increment=1)
        # t_sync: weights into the engine and, inside the step, its sleep (0 for builtin).
        step_metrics.update(
            grad_norm=self.optimizer.grad_norm, t_sync=step_metrics.get("t_sync", 0.0) + synced
        )
        metrics = _mean_over_data_parallel(step_metrics)  # a collective: every step
        metrics.update(
            step=iteration + 1,
            train_iters=run.train_iters,
            lr=lr,
            elapsed_s=time.perf_counter() - self.started,
        )
        return [metrics] if log else []

    def log_line(self, m: dict) -> str:
        return (
            f"step {m['step']}/{m['train_iters']} | reward {m['reward_mean']:.3f} "
            f"(std {m['reward_std']:.3f}) | loss {m['loss']:.4f} | kl {m['kl']:.4f} | "
            f"clip {m['clip_frac']:.3f} | zero-var {m['zero_variance_frac']:.2f} | "
            f"len {m['response_len_mean']:.1f} | lr {m['lr']:.2e}"
        )

    def close(self) -> None:
        self.engine.close()

    def plan(self, cfg: GRPORunConfig) -> int:
        from megatron_kaja.rl.plan import plan_grpo

        return plan_grpo(cfg)


def train_grpo(cfg: GRPORunConfig) -> dict:
    """Run GRPO as configured; returns the last logged step's metrics."""
    return run_training(cfg, GRPOTrainer())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_grpo.py`."""
    return run_main(GRPOTrainer(), argv)
