"""Group advantages against hand-computed values; None rewards; zero-variance groups."""

import math

import pytest
import torch

from megatron_kaja.rl.advantages import (
    GroupedRewards,
    advantage_names,
    compute_advantages,
    filter_zero_variance,
    zero_variance_groups,
)


def test_grpo_normalizes_by_group_mean_and_sample_std():
    rewards = GroupedRewards.from_list([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.6], group_size=4)
    adv = compute_advantages("grpo", rewards, eps=0.0)
    # Group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735
    s0 = math.sqrt(1 / 3)
    expected0 = [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0]
    # Group 1: mean 0.3, deviations (-.1,-.1,-.1,.3), sample std sqrt(0.12 / 3) = 0.2
    expected1 = [-0.5, -0.5, -0.5, 1.5]
    torch.testing.assert_close(adv, torch.tensor([expected0, expected1], dtype=torch.float64))


def test_dr_grpo_skips_the_std_division():
    rewards = GroupedRewards.from_list([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.6], group_size=4)
    adv = compute_advantages("dr_grpo", rewards)
    expected = [[0.5, -0.5, -0.5, 0.5], [-0.1, -0.1, -0.1, 0.3]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert {"grpo", "dr_grpo"} <= set(advantage_names())


def test_none_rewards_are_masked_not_zero():
    rewards = GroupedRewards.from_list([1.0, None, 0.0, 0.5, None, None, 0.3, None], 4)
    assert rewards.num_missing == 4
    adv = compute_advantages("dr_grpo", rewards)
    # Group 0's mean is over its three scores (0.5), not (1.5 + 0) / 4.
    torch.testing.assert_close(adv[0], torch.tensor([0.5, 0.0, -0.5, 0.0], dtype=torch.float64))
    # Group 1 has one score: no baseline, all zero.
    assert adv[1].abs().sum() == 0
    grpo = compute_advantages("grpo", rewards, eps=0.0)
    assert grpo[0, 1] == 0 and torch.isfinite(grpo).all()


def test_zero_variance_detection_and_filter():
    groups = [[1, 1, 1, 1], [0, 1, 0, 0], [0.5, 0.5 + 1e-9, 0.5, 0.5], [None, 1, None, None]]
    rewards = GroupedRewards.from_list([r for g in groups for r in g], 4)
    assert zero_variance_groups(rewards).tolist() == [True, False, True, True]
    keep, frac = filter_zero_variance(rewards)
    assert keep.tolist() == [1]
    assert frac == pytest.approx(0.75)
    # Zero-variance groups get zero advantage with the default eps (no division blow-up).
    assert compute_advantages("grpo", rewards)[0].abs().max() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_generations=4"):
        GroupedRewards.from_list([1.0, 0.0, 1.0], 4)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", GroupedRewards.from_list([1.0, 0.0], 2))
