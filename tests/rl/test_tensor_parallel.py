"""TP=2 equals TP=1: log-probs, greedy and seeded top-p sampling, the HF weight export and
the hf rollout engine, and a whole GRPO step; PP=2, and PP=2 x 2 virtual stages, equal PP=1."""

import json

import pytest
import torch

from tests.helpers import REPO, run_torchrun


@pytest.fixture(scope="module")
def tp_results(tiny_hf_dir, tiny_mcore_dir, tmp_path_factory):
    """One torchrun launch (2 processes) for every layout: TP=1, TP=2, PP=1, PP=2, PP=2 x 2
    virtual stages."""
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    run_torchrun(REPO / "tests/rl/tp_worker.py", 2, str(tiny_hf_dir), str(tiny_mcore_dir), str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tp2_equals_tp1(tp_results):
    one, two = tp_results["tp1"], tp_results["tp2"]
    assert (one["tp"], two["tp"]) == (1, 2)
    t = torch.tensor
    torch.testing.assert_close(t(two["logprobs"]), t(one["logprobs"]), atol=1e-5, rtol=0)
    assert t(one["logprobs"]).std() > 0.5  # the comparison is between varied numbers
    assert two["greedy"] == one["greedy"]
    assert one["export_matches_hf"] and two["export_matches_hf"]
    assert one["hf_engine_greedy"] == two["hf_engine_greedy"] == one["greedy"]
    assert two["sampled"] == one["sampled"]
    torch.testing.assert_close(
        t(two["sampled_logprobs"]), t(one["sampled_logprobs"]), atol=1e-5, rtol=0
    )
    for key in ("reward_mean", "response_len_mean"):
        assert two["step"][key] == one["step"][key]
    for key in ("loss", "kl"):
        assert two["step"][key] == pytest.approx(one["step"][key], abs=1e-5)
    # The update itself matched: the same log-probs after the step, and they moved.
    after_one, after_two = t(one["logprobs_after_step"]), t(two["logprobs_after_step"])
    torch.testing.assert_close(after_two, after_one, atol=1e-4, rtol=0)
    assert (after_one - t(one["logprobs"])).abs().max() > 1e-3


@pytest.mark.slow
def test_pp2_equals_pp1(tp_results):
    """Two pipeline stages: the sampler passes activations stage to stage and the last stage
    samples for all; the step's log-prob and update passes go through megatron's schedule
    (micro-batches of 8 and 4 completions, the short one padded)."""
    one, two = tp_results["pp1"], tp_results["pp2"]
    t = torch.tensor
    assert two["greedy"] == one["greedy"]
    assert two["sampled"] == one["sampled"]
    torch.testing.assert_close(
        t(two["sampled_logprobs"]), t(one["sampled_logprobs"]), atol=1e-5, rtol=0
    )
    for key in ("reward_mean", "response_len_mean"):
        assert two["step"][key] == one["step"][key]
    for key in ("loss", "kl"):
        assert two["step"][key] == pytest.approx(one["step"][key], abs=1e-5)
    before_one, before_two = t(one["logprobs_before_step"]), t(two["logprobs_before_step"])
    torch.testing.assert_close(before_two, before_one, atol=1e-5, rtol=0)
    after_one, after_two = t(one["logprobs_after_step"]), t(two["logprobs_after_step"])
    torch.testing.assert_close(after_two, after_one, atol=1e-4, rtol=0)
    assert (after_one - before_one).abs().max() > 1e-3  # the step moved them


@pytest.mark.slow
def test_interleaved_pipeline_equals_pp1(tp_results):
    """PP=2 x 2 model chunks per stage (one layer each): the sampler visits the chunks in
    layer order (stage 0 chunk 0, stage 1 chunk 0, stage 0 chunk 1, stage 1 chunk 1) with a
    KV cache per chunk, so it samples PP=1's tokens; the log-prob and update passes run the
    interleaved schedule (the step's 3 micro-batches filled up to 4 with an empty one)."""
    one, vpp = tp_results["pp1"], tp_results["pp2_vpp2"]
    t = torch.tensor
    assert vpp["greedy"] == one["greedy"]
    assert vpp["sampled"] == one["sampled"]
    torch.testing.assert_close(
        t(vpp["sampled_logprobs"]), t(one["sampled_logprobs"]), atol=1e-5, rtol=0
    )
    for key in ("reward_mean", "response_len_mean"):
        assert vpp["step"][key] == one["step"][key]
    for key in ("loss", "kl"):
        assert vpp["step"][key] == pytest.approx(one["step"][key], abs=1e-5)
    before_one, before_vpp = t(one["logprobs_before_step"]), t(vpp["logprobs_before_step"])
    torch.testing.assert_close(before_vpp, before_one, atol=1e-5, rtol=0)
    after_one, after_vpp = t(one["logprobs_after_step"]), t(vpp["logprobs_after_step"])
    torch.testing.assert_close(after_vpp, after_one, atol=1e-4, rtol=0)
