"""`train_grpo.py --dry-run`: the run checked as configured, its layout and memory printed,
without a GPU, torch.distributed or the judge."""

from __future__ import annotations

from pathlib import Path

from megatron_kaja.rl.step import interleaved_micro_batch_count
from megatron_kaja.training.launch import describe_optimizer, plan_layout, start_plan
from megatron_kaja.training.memory import GIB, estimate_grpo_memory


def plan_grpo(cfg) -> int:
    """`train_grpo.py --dry-run`: check the run as configured, print layout and memory."""
    report, arch, dp = start_plan(cfg, "train_grpo.py")
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    grpo = cfg.grpo_config()
    per_rank = cfg.global_batch_size // dp  # completions per DP rank and step
    accumulation = -(-per_rank // cfg.micro_batch_size)
    accumulation_note = ""
    if cfg.virtual_pipeline_size(arch):
        # the interleaved schedule runs whole groups of PP micro-batches (`rl/step.py`)
        scheduled = interleaved_micro_batch_count(accumulation, pp)
        if scheduled > accumulation:
            accumulation_note = f" (+{scheduled - accumulation} empty: groups of PP)"
        accumulation = scheduled
    seq = cfg.max_prompt_length + cfg.max_new_tokens
    cp = cfg.context_parallel_size
    report.add(
        f"layout: TP={tp} x PP={pp} x DP={dp}{f' x CP={cp}' if cp > 1 else ''}; "
        f"{grpo.prompts_per_step} prompts x {cfg.num_generations} "
        f"generations = {cfg.global_batch_size} completions per step, {per_rank} per DP rank "
        f"= micro-batch {cfg.micro_batch_size} x {accumulation} accumulation steps"
        f"{accumulation_note}; sequences "
        f"<= {cfg.max_prompt_length} prompt + {cfg.max_new_tokens} new tokens; "
        f"{describe_optimizer(cfg)}; scale: {cfg.describe_scale()}; reference model: "
        f"{'yes (beta ' + str(cfg.beta) + ')' if cfg.beta > 0 else 'none (beta 0)'}"
    )
    judge = ", ".join(cfg.reward)
    if any(s.partition(":")[0] == "judge" for s in cfg.reward):
        judge += f" ({cfg.judge_backend} judge {cfg.judge_model} at {cfg.judge_base_url})"
    report.add(f"reward: {judge}; the judge is not contacted by a dry run")
    prompt_files = [("--prompts", spec.rpartition(":")[0]) for spec in cfg.prompts]
    report.check_files(
        [
            ("--load", cfg.load),
            ("--ref-load", cfg.ref_load),
            ("--tokenizer", cfg.tokenizer),
            *prompt_files,
        ]
    )
    report.check_tokenizer(cfg.tokenizer, arch)
    if Path(cfg.tokenizer).exists():
        from transformers import AutoTokenizer

        from megatron_kaja.rl.trainer import load_prompts

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        report.add("data:")
        for spec in cfg.prompts:
            report.check_data(
                "--prompts",
                spec.rpartition(":")[0],
                lambda s=spec: len(load_prompts([s], tokenizer)),
            )
    layout = plan_layout(cfg, dp, seq, accumulation, arch)
    report.add(
        f"rollouts: {cfg.rollout_engine} engine, "
        f"{min(per_rank, cfg.rollout_batch_size or per_rank)} sequences sampled at once"
    )
    estimate = estimate_grpo_memory(
        arch,
        layout,
        rollout_sequences=min(per_rank, cfg.rollout_batch_size or per_rank),
        prompt_length=cfg.max_prompt_length,
        max_new_tokens=cfg.max_new_tokens,
        reference_model=cfg.beta > 0,
        rollout_engine=cfg.rollout_engine,
        vllm_bytes=int(cfg.rollout_gpu_memory_utilization * cfg.gpu_memory_gb * GIB),
    )
    return report.finish(estimate)
