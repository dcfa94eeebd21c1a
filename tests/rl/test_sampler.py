"""The builtin sampler: HF greedy parity, KV cache vs recomputation, vocab-parallel sampling."""

import pytest
import torch

from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.rl.sampler import SamplingParams, causal_padding_mask, generate, left_pad

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 99, 17], [1, 300, 301, 302, 12], [1, 7]]


def _generate(model, arch, params, seed=0, **kwargs):
    return generate(
        model,
        PROMPTS,
        params,
        eos_token_id=arch.eos_token_id,
        pad_token_id=4,
        vocab_size=arch.vocab_size,
        generator=torch.Generator(device=compute_device()).manual_seed(seed),
        **kwargs,
    )


def test_left_pad_and_mask():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=4)
    assert ids.tolist() == [[5, 6, 7], [4, 4, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    m = causal_padding_mask(mask)
    assert m.shape == (2, 1, 3, 3)
    assert m[0, 0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert m[1, 0, 2].tolist() == [True, True, False]  # padding keys hidden
    assert causal_padding_mask(mask, 1)[1, 0].tolist() == [[True, True, False]]


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_greedy_matches_transformers_generate(tiny_policy, tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    model, arch = tiny_policy
    out = _generate(model, arch, SamplingParams(max_new_tokens=12, temperature=0.0))
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    ours = out.responses()
    for prompt, response in zip(PROMPTS, ours, strict=True):
        expected = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=arch.eos_token_id,
            pad_token_id=4,
        )[0, len(prompt) :].tolist()
        if arch.eos_token_id in expected:  # HF pads after EOS
            expected = expected[: expected.index(arch.eos_token_id) + 1]
        assert response == expected
    # The sampling log-probs are the model's: recompute them from HF's logits.
    seq = out.sequences[0:1, out.prompt_mask[0].logical_not().sum() :]
    hf_logp = torch.log_softmax(hf(seq).logits[0, len(PROMPTS[0]) - 1 : -1], dim=-1)
    n = int(out.response_mask[0].sum())
    expected_lp = hf_logp.gather(-1, out.response_ids[0, :n, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs[0, :n], expected_lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_new_tokens=10, temperature=0.0), SamplingParams(10, 0.8, 0.9)],
    ids=["greedy", "top_p"],
)
def test_kv_cache_equals_recomputation(tiny_policy, params):
    model, arch = tiny_policy
    cached = _generate(model, arch, params, seed=3)
    recomputed = _generate(model, arch, params, seed=3, use_kv_cache=False)
    assert torch.equal(cached.response_ids, recomputed.response_ids)
    assert torch.equal(cached.response_mask, recomputed.response_mask)
    torch.testing.assert_close(cached.logprobs, recomputed.logprobs, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_respects_top_p(tiny_policy):
    model, arch = tiny_policy
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.5)
    a = _generate(model, arch, params, seed=5)
    b = _generate(model, arch, params, seed=5)
    c = _generate(model, arch, params, seed=6)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    # Every sampled token lies in its step's nucleus: recompute the nucleus per step.
    full = torch.cat([a.prompt_ids, a.response_ids], dim=1)
    valid = torch.cat([a.prompt_mask, a.response_mask], dim=1)
    with torch.no_grad():
        model.eval()
        logits = model(
            full,
            torch.arange(full.size(1), device=full.device).expand_as(full),
            causal_padding_mask(valid),
        )[..., : arch.vocab_size]
    width = a.prompt_ids.size(1)
    for step in range(a.response_ids.size(1)):
        probs = torch.softmax(logits[:, width + step - 1], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly ahead of each token
        for row in range(len(PROMPTS)):
            if not a.response_mask[row, step]:
                continue
            nucleus = set(order[row][before[row] < 0.5].tolist())
            assert int(a.response_ids[row, step]) in nucleus


def test_stops_at_eos_and_masks_after(tiny_policy):
    model, arch = tiny_policy
    # Sampling many long responses at a high temperature: some rows must hit EOS early.
    out = generate(
        model,
        [[1, 5 + i] for i in range(32)],
        SamplingParams(max_new_tokens=40, temperature=3.0),
        eos_token_id=arch.eos_token_id,
        pad_token_id=4,
        vocab_size=arch.vocab_size,
        generator=torch.Generator(device=compute_device()).manual_seed(0),
    )
    ended = 0
    for ids, mask in zip(out.response_ids, out.response_mask, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix
        if n < ids.numel() or ids[n - 1] == arch.eos_token_id:
            assert ids[n - 1] == arch.eos_token_id
            assert (ids[n:] == 4).all()
            ended += 1
    assert ended > 0
    assert (out.response_ids < arch.vocab_size).all()  # never a padded-vocab id


def test_sequence_parallel_off_switches_every_copy_and_restores_them():
    """Decoding feeds one position per row: the sampler runs with every sequence-parallel
    switch off (the configs' and the copies modules took when built) and restores them."""
    from types import SimpleNamespace

    from megatron_kaja.rl.sampler import sequence_parallel_off

    model = torch.nn.Sequential(*(torch.nn.Identity() for _ in range(3)))
    model.config = SimpleNamespace(sequence_parallel=True)
    model[0].config = SimpleNamespace(sequence_parallel=True)  # a second config object
    model[0].sequence_parallel = True
    model[1].reduce_scatter_embeddings = True
    model[2].sequence_parallel = False  # built without it: stays without

    def switches():
        return [
            model.config.sequence_parallel,
            model[0].config.sequence_parallel,
            model[0].sequence_parallel,
            model[1].reduce_scatter_embeddings,
            model[2].sequence_parallel,
        ]

    with pytest.raises(RuntimeError), sequence_parallel_off(model):
        assert switches() == [False] * 5
        raise RuntimeError("a failed decode restores them too")
    assert switches() == [True, True, True, True, False]
