"""TP=2 equals TP=1: log-probs, greedy and seeded top-p sampling, the HF weight export and
the hf rollout engine, and a whole GRPO step."""

import json

import pytest
import torch

from tests.helpers import REPO, run_torchrun


@pytest.mark.slow
def test_tp2_equals_tp1(tiny_hf_dir, tiny_mcore_dir, tmp_path):
    out = tmp_path / "tp.json"
    run_torchrun(REPO / "tests/rl/tp_worker.py", 2, str(tiny_hf_dir), str(tiny_mcore_dir), str(out))
    r = json.loads(out.read_text())
    one, two = r["tp1"], r["tp2"]
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
