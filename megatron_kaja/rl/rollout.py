"""Rollouts: G samples per prompt, their rewards (with the prompt's columns), and dynamic
sampling that drops groups whose rewards do not vary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_kaja.rl.advantages import GroupedRewards, zero_variance_groups
from megatron_kaja.rl.sampler import Generation, SamplingGenerator, SamplingParams


@dataclass
class PromptRecord:
    """One training prompt: its text, token ids (chat template applied) and reward columns."""

    prompt: str
    prompt_ids: list[int]
    columns: dict = field(default_factory=dict)  # kind, output (reference), eval_aspect, ...

    @property
    def kind(self) -> str | None:
        return self.columns.get("kind")


def encode_prompt(tokenizer, question: str, system: bool = True) -> list[int]:
    """Token ids of the chat prompt for `question`, ending with the generation prompt.

    The template writes the BOS itself, so the text is encoded without added special tokens.
    """
    messages = ([{"role": "system", "content": ""}] if system else []) + [
        {"role": "user", "content": question}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_record(tokenizer, record: dict, kind: str, system: bool = True) -> PromptRecord:
    """A `PromptRecord` from a dataset row: AnswerCarefully / llm-jp-instructions (`text`,
    `output`) or ELYZA-tasks-100 (`input`, `output`, `eval_aspect`)."""
    question = record.get("text") or record.get("input") or record.get("question")
    if not question:
        raise ValueError(f"prompt record without 'text', 'input' or 'question': {record!r}")
    columns = {"kind": kind, "output": record.get("output") or record.get("answer") or ""}
    columns["eval_aspect"] = record.get("eval_aspect") or ""
    return PromptRecord(question, encode_prompt(tokenizer, question, system), columns)


@dataclass(frozen=True)
class RolloutSeeds:
    """One sampling stream per completion, keyed by (seed, step, round, the prompt's index in
    the step's global batch, the sample's index in its group).

    A completion's randomness then depends neither on which data-parallel rank samples its
    prompt nor on what else is in that rank's batch: a step samples the same completions at
    any DP size, and again on resume. `first_prompt` is the global index of this rank's first
    prompt. Dynamic sampling's refill rounds (`round_no` > 0) read on into prompts that another
    rank also draws in round 0; the round in the key keeps their samples apart. `device`: where
    the generators live (the sampler's device, so the noise is drawn there; streams differ
    between device types, not between ranks of one run).
    """

    seed: int
    step: int
    first_prompt: int = 0
    device: str | torch.device = "cpu"

    def generators(
        self, round_no: int, start: int, num_prompts: int, num_generations: int
    ) -> list[torch.Generator]:
        """Generators for `num_prompts` x `num_generations` rows (prompt-major), the prompts
        being this rank's `start`-th and following of the round."""
        rows = []
        for prompt in range(self.first_prompt + start, self.first_prompt + start + num_prompts):
            for sample in range(num_generations):
                key = [self.seed, self.step, round_no, prompt, sample]
                state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)
                rows.append(torch.Generator(self.device).manual_seed(int(state[0])))
        return rows


@dataclass
class RolloutBatch:
    """Groups of G completions: row `g * G + j` is sample j of prompt g."""

    prompts: list[PromptRecord]
    generation: Generation
    completions: list[str]
    rewards: GroupedRewards
    zero_variance_frac: float  # over every group sampled for this batch, dropped or not
    groups_sampled: int
    metrics: dict  # reward_metrics over every group sampled, dropped or not
    seconds: dict  # t_rollout (sampling + decoding), t_reward (the reward calls)

    @property
    def num_generations(self) -> int:
        return self.rewards.values.size(1)


def score_completions(
    reward_fn: Callable, prompts: Sequence[PromptRecord], completions: list[str], group_size: int
) -> GroupedRewards:
    """Call `reward_fn(prompts, completions, **columns)` once for all completions, with each
    prompt (and its columns) repeated for its G completions."""
    repeated = [p for p in prompts for _ in range(group_size)]
    names = sorted({name for p in prompts for name in p.columns})
    columns = {name: [p.columns.get(name) for p in repeated] for name in names}
    rewards = reward_fn([p.prompt for p in repeated], completions, **columns)
    if len(rewards) != len(completions):
        raise ValueError(f"reward returned {len(rewards)} values for {len(completions)}")
    return GroupedRewards.from_list(rewards, group_size)


def reward_metrics(rewards: GroupedRewards, prompts: Sequence[PromptRecord]) -> dict:
    """`reward_mean`, `reward_std` (over scored samples), `reward_mean/<kind>`, `judge_missing`."""
    values, valid = rewards.values, rewards.valid
    scored = values[valid]
    out = {
        "reward_mean": float(scored.mean()) if scored.numel() else math.nan,
        "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
        "judge_missing": rewards.num_missing,
    }
    kinds = [p.kind for p in prompts]
    for kind in sorted({k for k in kinds if k is not None}):
        rows = torch.tensor([k == kind for k in kinds])
        kind_scores = values[rows][valid[rows]]
        out[f"reward_mean/{kind}"] = float(kind_scores.mean()) if kind_scores.numel() else math.nan
    return out


def _stack(parts: list[GroupedRewards]) -> GroupedRewards:
    return GroupedRewards(torch.cat([r.values for r in parts]), torch.cat([r.valid for r in parts]))


def _select_groups(rewards: GroupedRewards, n: int) -> GroupedRewards:
    return GroupedRewards(rewards.values[:n], rewards.valid[:n])


def _select(gen: Generation, rows: torch.Tensor) -> Generation:
    return Generation(*(getattr(gen, f)[rows] for f in Generation.__dataclass_fields__))


def _concat(gens: list[Generation], pad_token_id: int) -> Generation:
    """Stack generations of different prompt / response widths (re-padding both sides)."""
    width = max(g.prompt_ids.size(1) for g in gens)
    length = max(g.response_ids.size(1) for g in gens)

    def pad(t, to, left, value):
        extra = to - t.size(1)
        shape = (t.size(0), extra)
        filler = torch.full(shape, value, dtype=t.dtype, device=t.device)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    return Generation(
        prompt_ids=torch.cat([pad(g.prompt_ids, width, True, pad_token_id) for g in gens]),
        prompt_mask=torch.cat([pad(g.prompt_mask, width, True, False) for g in gens]),
        response_ids=torch.cat([pad(g.response_ids, length, False, pad_token_id) for g in gens]),
        response_mask=torch.cat([pad(g.response_mask, length, False, False) for g in gens]),
        logprobs=torch.cat([pad(g.logprobs, length, False, 0.0) for g in gens]),
    )


def sample_in_chunks(
    engine,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    pad_token_id: int,
    generator: SamplingGenerator = None,
    chunk_size: int | None = None,
) -> Generation:
    """`engine.generate` over `prompts`, `chunk_size` rows at a time (None: all at once), so
    the KV cache is sized for a chunk, not for a rank's whole share of the step. `generator`:
    one stream for all rows, or a list of one per row (split with the rows)."""
    size = chunk_size or len(prompts)
    per_row = isinstance(generator, list)
    parts = [
        engine.generate(
            prompts[i : i + size], params, generator[i : i + size] if per_row else generator
        )
        for i in range(0, len(prompts), size)
    ]
    return parts[0] if len(parts) == 1 else _concat(parts, pad_token_id)


def collect_rollouts(
    engine,
    prompt_source: Iterator[PromptRecord],
    num_prompts: int,
    num_generations: int,
    params: SamplingParams,
    reward_fn: Callable,
    decode: Callable[[list[int]], str],
    *,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    seeds: RolloutSeeds | None = None,
    filter_zero_variance: bool = False,
    oversample_rounds: int = 0,
    zero_variance_tol: float = 1e-6,
    rollout_batch_size: int | None = None,
) -> RolloutBatch:
    """Sample `num_generations` completions for `num_prompts` prompts with `engine` (a
    `megatron_kaja.rl.engines` engine), score them, and with
    `filter_zero_variance` drop the groups whose rewards do not vary (DAPO's dynamic sampling),
    drawing up to `oversample_rounds` more rounds of prompts to refill the batch (each round
    draws the shortfall divided by the keep rate so far; surplus groups are left out).

    The result may hold fewer than `num_prompts` groups (the source ran out, or the rounds did
    not find enough informative groups); it is never padded with zero-variance groups.
    Randomness: `seeds` (one stream per completion) when given, else the one `generator`.
    """
    kept_prompts: list[PromptRecord] = []
    kept_gens: list[Generation] = []
    kept_completions: list[str] = []
    kept_rewards: list[GroupedRewards] = []
    sampled = zero = 0
    all_prompts: list[PromptRecord] = []
    all_rewards: list[GroupedRewards] = []
    seconds = {"t_rollout": 0.0, "t_reward": 0.0}
    for round_no in range(1 + (oversample_rounds if filter_zero_variance else 0)):
        need = num_prompts - len(kept_prompts)
        if sampled:  # a refill round: draw enough prompts for the keep rate seen so far
            keep_rate = len(kept_prompts) / sampled
            need = math.ceil(need / keep_rate) if keep_rate > 0 else num_prompts
        batch = [p for _, p in zip(range(need), prompt_source, strict=False)]
        if not batch:
            break
        repeated = [p.prompt_ids for p in batch for _ in range(num_generations)]
        streams = generator
        if seeds is not None:
            streams = seeds.generators(round_no, len(all_prompts), len(batch), num_generations)
        start = time.perf_counter()
        gen = sample_in_chunks(
            engine,
            repeated,
            params,
            pad_token_id=pad_token_id,
            generator=streams,
            chunk_size=rollout_batch_size,
        )
        completions = [decode(ids) for ids in gen.responses()]
        seconds["t_rollout"] += time.perf_counter() - start
        start = time.perf_counter()
        rewards = score_completions(reward_fn, batch, completions, num_generations)
        seconds["t_reward"] += time.perf_counter() - start
        all_prompts += batch
        all_rewards.append(rewards)
        flat = zero_variance_groups(rewards, zero_variance_tol)
        sampled += len(batch)
        zero += int(flat.sum())
        keep = ~flat if filter_zero_variance else torch.ones_like(flat)
        groups = torch.nonzero(keep).flatten().tolist()
        rows = torch.tensor(
            [g * num_generations + j for g in groups for j in range(num_generations)]
        )
        if groups:
            kept_prompts += [batch[g] for g in groups]
            kept_gens.append(_select(gen, rows))
            kept_completions += [completions[i] for i in rows.tolist()]
            kept_rewards.append(GroupedRewards(rewards.values[groups], rewards.valid[groups]))
        if len(kept_prompts) >= num_prompts:
            break
    # A refill round may find more informative groups than needed: keep the batch size.
    rows = num_prompts * num_generations
    kept_prompts = kept_prompts[:num_prompts]
    kept_completions = kept_completions[:rows]
    if not kept_prompts:
        raise RuntimeError(
            f"dynamic sampling kept no group out of {sampled} sampled (all rewards flat); "
            "raise oversample_rounds, the temperature, or check the reward"
        )
    return RolloutBatch(
        prompts=kept_prompts,
        generation=_select(_concat(kept_gens, pad_token_id), slice(0, rows)),
        completions=kept_completions,
        rewards=_select_groups(_stack(kept_rewards), num_prompts),
        zero_variance_frac=zero / sampled,
        groups_sampled=sampled,
        metrics=reward_metrics(_stack(all_rewards), all_prompts),
        seconds=seconds,
    )
