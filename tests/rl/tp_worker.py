"""Run under torchrun with 2 processes: the GRPO pieces at TP=1 and at TP=2, results to JSON.

torchrun --nproc-per-node 2 tests/rl/tp_worker.py HF_DIR MCORE_DIR OUT.json
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_kaja.checkpoint.loading import load_mcore_weights
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.export import hf_weight_groups
from megatron_kaja.models.llama.model import build_gpt_model, build_model_chunks
from megatron_kaja.parallel.distributed import (
    compute_device,
    current_layout,
    destroy_model_parallel,
    init_process_group,
    initialize_model_parallel,
    set_virtual_pipeline_size,
)
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.engines import HFEngine
from megatron_kaja.rl.losses import token_logprobs
from megatron_kaja.rl.rollout import prompt_record
from megatron_kaja.rl.sampler import SamplingParams, causal_padding_mask, generate
from megatron_kaja.rl.step import grpo_step, run_micro_batches

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 99, 17], [1, 300, 301, 302, 12]]


def logprobs_of_fixed_tokens(model, arch) -> torch.Tensor:
    tokens = torch.randint(8, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(compute_device())  # the model's inputs live on its device
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row
    model.eval()
    with torch.no_grad():
        logits = model(
            tokens[:, :-1],
            torch.arange(11, device=tokens.device).expand(2, 11),
            causal_padding_mask(valid[:, :-1]),
        )
    return token_logprobs(logits, tokens[:, 1:], temperature=0.9, vocab_size=arch.vocab_size)


def run_layout(tp: int, hf_dir: str, mcore_dir: str) -> dict:
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    parallel_state.destroy_model_parallel()
    initialize_model_parallel(tp, 1, seed=5)
    arch = LlamaArch.from_hf_config(hf_dir)
    model = build_gpt_model(arch)
    load_mcore_weights(model, mcore_dir)
    ref = build_gpt_model(arch)
    load_mcore_weights(ref, mcore_dir)
    common = dict(eos_token_id=arch.eos_token_id, pad_token_id=4, vocab_size=arch.vocab_size)
    result = {"logprobs": logprobs_of_fixed_tokens(model, arch).tolist()}
    greedy = generate(model, PROMPTS, SamplingParams(10, temperature=0.0), **common)
    result["greedy"] = greedy.response_ids.tolist()
    sampled = generate(
        model,
        PROMPTS * 4,
        SamplingParams(10, temperature=0.8, top_p=0.9),
        generator=torch.Generator(device=compute_device()).manual_seed(3),
        **common,
    )
    result["sampled"] = sampled.response_ids.tolist()
    result["sampled_logprobs"] = sampled.logprobs.tolist()
    # The in-memory HF export gathers the TP shards back into the HF checkpoint's tensors,
    # and the hf rollout engine fed by it decodes as the builtin sampler does.
    original = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        original.update(load_file(path))
    exported = dict(pair for group in hf_weight_groups(model, arch) for pair in group)
    result["export_matches_hf"] = set(exported) == set(original) and all(
        torch.equal(t, original[n].to(t)) for n, t in exported.items()
    )
    engine = HFEngine(
        arch, eos_token_id=arch.eos_token_id, pad_token_id=4, dtype=torch.float32,
        device=compute_device(),
    )  # fmt: skip
    engine.load_weights(model)
    result["hf_engine_greedy"] = engine.generate(
        PROMPTS, SamplingParams(10, temperature=0.0)
    ).response_ids.tolist()

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [
        prompt_record(tok, {"text": q}, "helpful") for q in ("日本の首都は。", "料理を教えて。")
    ]

    def reward(prompts, completions, **columns):
        return [float(len(c) % 3 == 0) for c in completions]

    config = GRPOConfig(max_new_tokens=4, global_batch_size=16, micro_batch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    metrics = grpo_step(
        model,
        ref,
        opt,
        itertools.cycle(prompts),
        reward,
        config,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        generator=torch.Generator(device=compute_device()).manual_seed(0),
        **common,
    )
    result["step"] = {k: metrics[k] for k in ("reward_mean", "loss", "kl", "response_len_mean")}
    result["logprobs_after_step"] = logprobs_of_fixed_tokens(model, arch).tolist()
    result["tp"] = current_layout().tensor_parallel_size
    return result


def run_pipeline(
    pp: int, hf_dir: str, mcore_dir: str, vpp: int | None = None, micro_batch: int = 8
) -> dict:
    """Sampling and a GRPO step (uneven micro-batches: 12 completions in 8 + 4) at PP=`pp`
    (x `vpp` model chunks per stage: the policy and reference are lists of chunks); the
    results of the last stage."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    initialize_model_parallel(1, pp, seed=5)
    set_virtual_pipeline_size(vpp)
    arch = LlamaArch.from_hf_config(hf_dir)
    if vpp is None:
        model, ref = build_gpt_model(arch), build_gpt_model(arch)
        params = list(model.parameters())
    else:
        model, ref = build_model_chunks(arch), build_model_chunks(arch)
        params = [p for chunk in model for p in chunk.parameters()]
    for m in (model, ref):
        load_mcore_weights(m, mcore_dir)
    try:
        return _pipeline_results(model, ref, params, arch, hf_dir, micro_batch)
    finally:
        set_virtual_pipeline_size(None)


def _pipeline_results(model, ref, params, arch, hf_dir: str, micro_batch: int) -> dict:
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    common = dict(eos_token_id=arch.eos_token_id, pad_token_id=4, vocab_size=arch.vocab_size)
    greedy = generate(model, PROMPTS, SamplingParams(10, temperature=0.0), **common)
    sampled = generate(
        model, PROMPTS * 4, SamplingParams(10, temperature=0.8, top_p=0.9),
        generator=torch.Generator(device=compute_device()).manual_seed(3), **common,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [
        prompt_record(tok, {"text": q}, "helpful") for q in ("日本の首都は。", "料理を教えて。")
    ]

    def reward(prompts, completions, **columns):
        return [float(len(c) % 3 == 0) for c in completions]

    def fixed_logprobs():  # the sampled rows, in micro-batches of 8 and 4
        for chunk in model if isinstance(model, list) else [model]:
            chunk.eval()
        with torch.no_grad():
            parts = run_micro_batches(
                model, sampled, [slice(0, 8), slice(8, 12)], temperature=0.9,
                vocab_size=arch.vocab_size,
            )  # fmt: skip
        return torch.cat(parts).tolist() if parts else None  # on the last stage only

    before = fixed_logprobs()
    config = GRPOConfig(
        max_new_tokens=4, num_generations=4, global_batch_size=12, micro_batch_size=micro_batch
    )
    opt = torch.optim.AdamW(params, lr=1e-3)
    metrics = grpo_step(
        model, ref, opt, itertools.cycle(prompts), reward, config,
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        generator=torch.Generator(device=compute_device()).manual_seed(0), **common,
    )  # fmt: skip
    result = {
        "greedy": greedy.response_ids.tolist(),
        "sampled": sampled.response_ids.tolist(),
        "sampled_logprobs": sampled.logprobs.tolist(),
        "step": {k: metrics[k] for k in ("reward_mean", "loss", "kl", "response_len_mean")},
        "logprobs_before_step": before,
        "logprobs_after_step": fixed_logprobs(),
    }
    payload = [result]
    dist.broadcast_object_list(
        payload,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return payload[0]


def main() -> None:
    hf_dir, mcore_dir, out = sys.argv[1:4]
    init_process_group()
    results = {f"tp{tp}": run_layout(tp, hf_dir, mcore_dir) for tp in (1, 2)}
    results.update({f"pp{pp}": run_pipeline(pp, hf_dir, mcore_dir) for pp in (1, 2)})
    # Interleaved: 2 chunks of one layer per stage; the step's 12 completions in micro-batches
    # of 5 (5 + 5 + 2), a count the schedule fills up to 4 with an empty one.
    results["pp2_vpp2"] = run_pipeline(2, hf_dir, mcore_dir, vpp=2, micro_batch=5)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    destroy_model_parallel()


if __name__ == "__main__":
    main()
