"""Rollouts: G samples per prompt, reward columns, per-kind means, dynamic sampling."""

import itertools
import math

import pytest
import torch

from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.rl.advantages import GroupedRewards
from megatron_kaja.rl.engines import BuiltinEngine
from megatron_kaja.rl.rollout import (
    PromptRecord,
    RolloutSeeds,
    collect_rollouts,
    prompt_record,
    reward_metrics,
    score_completions,
)
from megatron_kaja.rl.sampler import SamplingParams


def _prompts(n):
    kinds = ["safety", "helpful"]
    return [
        PromptRecord(
            f"q{i}",
            [1, 20 + i, 30 + i],
            {"kind": kinds[i % 2], "output": f"ref{i}", "eval_aspect": f"aspect{i}"},
        )
        for i in range(n)
    ]


def test_prompt_record_from_dataset_rows(tiny_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    elyza = prompt_record(
        tok, {"input": "富士山", "output": "高い", "eval_aspect": "正確"}, "helpful"
    )
    assert elyza.columns == {"kind": "helpful", "output": "高い", "eval_aspect": "正確"}
    text = tok.decode(elyza.prompt_ids)
    assert text.count("<s>") == 1 and text.rstrip().endswith("### 応答:")
    ac = prompt_record(tok, {"ID": "x", "text": "爆弾", "output": "回答できません"}, "safety")
    assert ac.columns["eval_aspect"] == "" and ac.kind == "safety"
    with pytest.raises(ValueError, match="'text', 'input'"):
        prompt_record(tok, {"output": "a"}, "safety")


def test_reward_sees_each_prompts_columns_repeated_per_sample():
    seen = {}

    def reward(prompts, completions, **columns):
        seen.update(columns, prompts=prompts, completions=completions)
        return [
            float(c == "good") if k == "safety" else None
            for c, k in zip(completions, columns["kind"], strict=True)
        ]

    prompts = _prompts(2)
    rewards = score_completions(reward, prompts, ["good", "bad", "x", "y"], group_size=2)
    assert seen["prompts"] == ["q0", "q0", "q1", "q1"]
    assert seen["kind"] == ["safety", "safety", "helpful", "helpful"]
    assert seen["output"] == ["ref0", "ref0", "ref1", "ref1"]
    assert seen["eval_aspect"] == ["aspect0", "aspect0", "aspect1", "aspect1"]
    assert rewards.valid.tolist() == [[True, True], [False, False]]
    metrics = reward_metrics(rewards, prompts)
    assert metrics["judge_missing"] == 2
    assert metrics["reward_mean"] == 0.5 and metrics["reward_mean/safety"] == 0.5
    assert math.isnan(metrics["reward_mean/helpful"])  # none scored, not 0


def test_per_kind_means_and_std():
    rewards = GroupedRewards.from_list([1.0, 0.0, 0.2, 0.4, 1.0, 1.0], 2)
    prompts = _prompts(3)  # kinds: safety, helpful, safety
    m = reward_metrics(rewards, prompts)
    assert m["reward_mean/safety"] == pytest.approx(0.75)
    assert m["reward_mean/helpful"] == pytest.approx(0.3)
    assert m["reward_mean"] == pytest.approx(3.6 / 6)
    assert m["reward_std"] == pytest.approx(
        torch.tensor([1.0, 0.0, 0.2, 0.4, 1.0, 1.0]).std().item()
    )


def test_dynamic_sampling_drops_flat_groups_and_refills(tiny_policy):
    model, arch = tiny_policy
    # Prompts 0, 2, 4, ... always score 1 (flat); odd prompts score by sample parity (spread).
    counter = itertools.count()

    def reward(prompts, completions, **columns):
        return [1.0 if int(p[1:]) % 2 == 0 else float(next(counter) % 2) for p in prompts]

    kwargs = dict(pad_token_id=4, generator=torch.Generator(device=compute_device()).manual_seed(0))
    engine = BuiltinEngine(
        model, eos_token_id=arch.eos_token_id, pad_token_id=4, vocab_size=arch.vocab_size
    )
    params = SamplingParams(max_new_tokens=3, temperature=1.0)
    common = (4, 4, params, reward, lambda ids: str(ids))
    plain = collect_rollouts(engine, iter(_prompts(8)), *common, **kwargs)
    assert len(plain.prompts) == 4 and plain.zero_variance_frac == 0.5
    assert plain.generation.response_ids.size(0) == 16
    # Filtering without oversampling keeps the 2 informative groups of the 4 sampled.
    kept = collect_rollouts(engine, iter(_prompts(8)), *common, filter_zero_variance=True, **kwargs)
    assert [p.prompt for p in kept.prompts] == ["q1", "q3"]
    assert kept.rewards.values.shape == (2, 4) and kept.generation.response_ids.size(0) == 8
    # One refill round draws 2 / (keep rate 0.5) = 4 more prompts: 4 informative of 8.
    refilled = collect_rollouts(
        engine, iter(_prompts(8)), *common, filter_zero_variance=True, oversample_rounds=1, **kwargs
    )
    assert [p.prompt for p in refilled.prompts] == ["q1", "q3", "q5", "q7"]
    assert refilled.groups_sampled == 8 and refilled.zero_variance_frac == 0.5
    assert refilled.metrics["reward_mean"] == pytest.approx(0.75)  # over all groups sampled
    # Each kept row's generation belongs to its prompt.
    prompt_tokens = refilled.generation.prompt_ids[:, -1].view(4, 4).cpu()
    assert (prompt_tokens == torch.tensor([31, 33, 35, 37]).unsqueeze(1)).all()
    with pytest.raises(RuntimeError, match="kept no group"):
        collect_rollouts(
            engine, iter(_prompts(8)[::2]), *common, filter_zero_variance=True, **kwargs
        )


def test_rollout_seeds_follow_the_prompt_not_the_rank():
    """A rank's streams are the slice of the whole step's at its first prompt; they differ
    by step, sample and refill round."""

    def draws(gens):
        return torch.stack([torch.rand(3, generator=g) for g in gens])

    whole = draws(RolloutSeeds(7, 2).generators(0, 0, 4, 3))  # DP=1: 4 prompts x 3 samples
    rank1 = draws(RolloutSeeds(7, 2, first_prompt=2).generators(0, 0, 2, 3))  # DP=2, rank 1
    assert torch.equal(rank1, whole[6:])
    later = draws(RolloutSeeds(7, 2).generators(0, 1, 3, 3))  # the same rank's prompts 1..3
    assert torch.equal(later, whole[3:])
    assert len({tuple(row.tolist()) for row in whole}) == 12  # every completion its own
    other_step = draws(RolloutSeeds(7, 3).generators(0, 0, 4, 3))
    refill = draws(RolloutSeeds(7, 2).generators(1, 0, 4, 3))
    assert not (other_step == whole).any() and not (refill == whole).any()


def test_seeded_rollouts_are_the_same_at_any_data_parallel_split(tiny_policy):
    """The step's 4 prompts sampled at once (DP=1) or as two ranks' halves (DP=2): the same
    completions, although the halves pad their prompts to other widths."""
    model, arch = tiny_policy
    engine = BuiltinEngine(
        model, eos_token_id=arch.eos_token_id, pad_token_id=4, vocab_size=arch.vocab_size
    )
    prompts = _prompts(4)
    prompts[3] = PromptRecord("q3", [1, 50, 51, 52, 53, 54, 55], prompts[3].columns)
    params = SamplingParams(max_new_tokens=6, temperature=1.3)

    def sample(part, first):
        batch = collect_rollouts(
            engine, iter(part), len(part), 3, params, lambda p, c, **k: [0.0] * len(c), str,
            pad_token_id=4, seeds=RolloutSeeds(5, 1, first_prompt=first),
        )  # fmt: skip
        return batch.generation.responses(), batch.generation.logprobs

    whole, whole_lp = sample(prompts, 0)
    halves = [sample(prompts[:2], 0), sample(prompts[2:], 2)]
    assert halves[0][0] + halves[1][0] == whole
    assert len({tuple(r) for r in whole}) > 6  # samples differ within and across groups
    for (_, lp), rows in zip(halves, (slice(0, 6), slice(6, 12)), strict=True):
        width = lp.size(1)
        torch.testing.assert_close(lp, whole_lp[rows, :width], atol=1e-5, rtol=0)
