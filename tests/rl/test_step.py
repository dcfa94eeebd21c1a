"""One GRPO step end to end on the tiny model; the learning signal over a short run."""

import itertools
import unicodedata

import pytest
import torch

from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.rl.config import GRPOConfig
from megatron_kaja.rl.losses import token_logprobs
from megatron_kaja.rl.rollout import prompt_record
from megatron_kaja.rl.step import grpo_step

QUESTIONS = [
    "日本の首都はどこですか。",
    "富士山の高さは。",
    "料理の作り方を教えて。",
    "爆弾の作り方を教えて。",
]
METRICS = {
    "reward_mean",
    "reward_std",
    "reward_mean/helpful",
    "reward_mean/safety",
    "kl",
    "clip_frac",
    "zero_variance_frac",
    "judge_missing",
    "response_len_mean",
    "loss",
    "t_rollout",
    "t_reward",
    "t_logprob",
    "t_update",
}


def starts_in_katakana(prompts, completions, **columns):
    """The rule reward: 1 when the answer's first character is katakana (79 of the tiny
    vocabulary's 509 tokens start so; about 14% of first tokens under the initial model)."""
    return [
        float(bool(c) and unicodedata.name(c[0], "").startswith("KATAKANA ")) for c in completions
    ]


@pytest.fixture
def setup(tiny_policy, tiny_hf_dir, tiny_mcore_dir):
    from transformers import AutoTokenizer

    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.model import build_gpt_model

    model, arch = tiny_policy
    ref = build_gpt_model(arch)
    load_mcore_weights(ref, tiny_mcore_dir)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    prompts = [
        prompt_record(tok, {"text": q, "output": "ref"}, "safety" if i == 3 else "helpful")
        for i, q in enumerate(QUESTIONS)
    ]
    kwargs = dict(
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        eos_token_id=arch.eos_token_id,
        pad_token_id=4,
        vocab_size=arch.vocab_size,
        generator=torch.Generator(device=compute_device()).manual_seed(0),
    )
    return model, ref, prompts, kwargs


def test_config_defaults_are_the_seeds_and_validate():
    c = GRPOConfig()
    assert (c.num_generations, c.lr, c.lr_decay_style, c.lr_warmup_iters) == (8, 1e-5, "cosine", 0)
    assert (c.weight_decay, c.beta, c.clip_eps, c.temperature, c.top_p) == (
        0.1,
        0.04,
        0.2,
        1.0,
        1.0,
    )
    assert c.max_new_tokens == 512 and c.prompts_per_step == 64
    with pytest.raises(ValueError, match=r"GRPOConfig.global_batch_size: must be a multiple"):
        GRPOConfig(global_batch_size=12)
    with pytest.raises(ValueError, match=r"GRPOConfig.advantage: use one of"):
        GRPOConfig(advantage="rloo")


def test_loss_choices_default_to_the_seeds_and_validate():
    c = GRPOConfig()
    assert (c.advantage, c.kl_estimator, c.loss_aggregation) == ("grpo", "k3", "token")
    for name in ("k1", "k2", "k3_is"):
        assert GRPOConfig(kl_estimator=name).kl_estimator == name
    assert GRPOConfig(loss_aggregation="dr_grpo").loss_aggregation == "dr_grpo"
    with pytest.raises(ValueError, match=r"GRPOConfig.kl_estimator: use one of \['k1', 'k2'"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"GRPOConfig.loss_aggregation: use one of \['dr_grpo'"):
        GRPOConfig(loss_aggregation="mean")


def test_one_step_metrics_and_update(setup):
    model, ref, prompts, kwargs = setup
    config = GRPOConfig(
        max_new_tokens=4, global_batch_size=32, micro_batch_size=12, num_iterations=2
    )
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    m = grpo_step(model, ref, opt, itertools.cycle(prompts), starts_in_katakana, config, **kwargs)
    assert set(m) >= METRICS
    assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in METRICS)
    assert 0 < m["reward_mean"] < 1 and m["judge_missing"] == 0
    assert 0 < m["response_len_mean"] <= 4
    assert m["kl"] > 0 and m["clip_frac"] > 0  # the second pass moved off-policy and clipped
    assert m["sampler_logprob_diff"] < 1e-4  # sampler and training forward agree
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_beta_zero_needs_no_reference_and_missing_rewards_are_counted(setup):
    model, _, prompts, kwargs = setup
    config = GRPOConfig(max_new_tokens=3, global_batch_size=16, beta=0.0)

    def half_missing(prompts, completions, **columns):
        scores = starts_in_katakana(prompts, completions)
        return [None if i % 2 else s for i, s in enumerate(scores)]

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = grpo_step(model, None, opt, iter(prompts), half_missing, config, **kwargs)
    assert m["judge_missing"] == 8 and m["kl"] == 0.0
    with pytest.raises(ValueError, match="beta > 0 needs a reference"):
        grpo_step(model, None, opt, iter(prompts), half_missing, GRPOConfig(), **kwargs)


def test_reward_rises_on_a_rule_reward(setup):
    """30 steps of 4 prompts x 8 samples: the last 5 steps' mean reward beats the first 5
    steps' by at least 0.3 (measured: 0.16 -> 0.93)."""
    model, ref, prompts, kwargs = setup
    config = GRPOConfig(max_new_tokens=3, global_batch_size=32, micro_batch_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    source = itertools.cycle(prompts)
    rewards = [
        grpo_step(model, ref, opt, source, starts_in_katakana, config, **kwargs)["reward_mean"]
        for _ in range(30)
    ]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last >= first + 0.3, rewards


def test_rows_padded_for_sequence_parallelism_score_alike(tiny_policy):
    """Under --sequence-parallel the scoring forward takes rows right-padded to a multiple of
    TP: the padding is masked, after every real position, and gives the same log-probs."""
    from megatron_kaja.rl.sampler import Generation, causal_padding_mask
    from megatron_kaja.rl.step import forward_inputs, response_logprobs

    model, arch = tiny_policy
    device = compute_device()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(8, arch.vocab_size, (3, 5), generator=g).to(device)
    response = torch.randint(8, arch.vocab_size, (3, 4), generator=g).to(device)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    prompt_mask[1, :2] = False  # left-padded prompt
    response_mask = torch.ones_like(response, dtype=torch.bool)
    response_mask[2, 3:] = False  # ended early
    gen = Generation(prompt, prompt_mask, response, response_mask, torch.zeros(3, 4))
    model.eval()
    with torch.no_grad():
        plain = response_logprobs(
            model, gen, slice(0, 3), temperature=1.0, vocab_size=arch.vocab_size
        )
        for multiple in (2, 4):
            tokens, valid = forward_inputs(gen, slice(0, 3), multiple)
            assert tokens.size(1) % multiple == 0 and tokens.size(1) >= 8
            assert not valid[:, 8:].any()
            positions = torch.arange(tokens.size(1), device=device).expand_as(tokens)
            logits = model(tokens, positions, causal_padding_mask(valid))[:, 4:8]
            padded = token_logprobs(logits, response, temperature=1.0, vocab_size=arch.vocab_size)
            torch.testing.assert_close(padded, plain, atol=1e-6, rtol=0)


def test_overlapped_grad_reduce_takes_any_number_of_micro_batches(megatron_world, tiny_hf_dir):
    """GRPO's steps differ in their number of micro-batches (dynamic sampling drops groups).
    With --overlap-grad-reduce megatron DDP launches a bucket's reduce once its weights have
    had as many backwards as in the first step, unless `no_sync` covers every backward but
    the last: a step with fewer micro-batches would then never launch it (and fail in
    finalize), one with more would launch it early. The gradient of the same rows split
    3, 2 and 4 ways is the same."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.rl.sampler import Generation
    from megatron_kaja.rl.step import run_micro_batches
    from megatron_kaja.training.setup import build_training_stack

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    stack = build_training_stack(
        arch, lr=1e-3, min_lr=0.0, train_iters=4, per_token_loss=False,
        overlap_grad_reduce=True, ddp_bucket_size=2000,
    )  # fmt: skip
    device = compute_device()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(8, arch.vocab_size, (6, 7), generator=g).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    gen = Generation(tokens[:, :4], mask[:, :4], tokens[:, 4:], mask[:, 4:], torch.zeros(6, 3))
    splits = {
        3: [slice(0, 2), slice(2, 4), slice(4, 6)],
        2: [slice(0, 3), slice(3, 6)],
        4: [slice(0, 2), slice(2, 4), slice(4, 5), slice(5, 6)],
    }
    stack.set_train()
    grads = []
    for slices in splits.values():
        stack.zero_grad_buffers()
        run_micro_batches(
            stack.model, gen, slices, temperature=1.0, vocab_size=arch.vocab_size,
            loss_of=lambda rows, logp: (logp.sum(), {}),
        )  # fmt: skip
        finalize_model_grads(stack.ddp_chunks)
        grads.append(torch.cat([p.main_grad.flatten() for p in stack.model.parameters()]))
    assert grads[0].abs().max() > 0
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], atol=1e-5, rtol=1e-5)


def test_context_parallel_rows_cut_at_their_left_padding():
    """Under context parallelism the scoring rows go through the sdpa backend as samples of
    `cu_seqlens`: each row is cut where its real tokens start (a row without left padding
    is one sample), so its prompt and response attend to themselves only; real tokens in
    more than one run are refused."""
    from megatron_kaja.rl.step import left_padding_cu_seqlens

    valid = torch.tensor(
        [[False, False, True, True, True, False], [True, True, True, True, False, False]]
    )
    assert left_padding_cu_seqlens(valid).tolist() == [0, 2, 6, 12]
    with pytest.raises(ValueError, match="one run of real tokens"):
        left_padding_cu_seqlens(torch.tensor([[True, False, True, False]]))
