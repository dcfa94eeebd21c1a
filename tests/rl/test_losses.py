"""Clipped surrogate, KL estimators, loss aggregations and token log-probs against
hand-computed values."""

import math

import pytest
import torch

from megatron_kaja.rl.losses import (
    clipped_policy_loss,
    kl_estimate,
    kl_estimator_names,
    kl_k3,
    loss_aggregation_names,
    mask_padded_vocab,
    token_logprobs,
)


def test_k3_against_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # r = ref / p: 0.5 -> 0.5 - ln 0.5 - 1 = 0.193147; 1 -> 0; 2 -> 2 - ln 2 - 1 = 0.306853
    expected = torch.tensor([0.5 + math.log(2) - 1, 0.0, 1 - math.log(2)])
    torch.testing.assert_close(kl_k3(logp, ref), expected)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def _loss_case():
    # Ratios e^(lp - old): 1.5, 0.5, 1.1 | 0.7, 1.3 (masked: 1.0)
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.3, 1.0]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_clipped_loss_token_and_sequence_aggregation():
    logp, old, adv, mask = _loss_case()
    # Per-token objective min(rho A, clip(rho, 0.8, 1.2) A):
    # row 0 (A=2): min(3, 2.4)=2.4, min(1, 1.6)=1.0, min(2.2, 2.2)=2.2
    # row 1 (A=-1): min(-0.7, -0.8)=-0.8, min(-1.3, -1.2)=-1.3
    per_token = [[-2.4, -1.0, -2.2], [0.8, 1.3]]
    out = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, aggregation="token")
    assert out.loss.item() == pytest.approx(sum(sum(r) for r in per_token) / 5)
    # Clip active: rho=1.5 with A>0, rho=0.7 with A<0 -> 2 of 5 tokens.
    assert out.clip_frac.item() == pytest.approx(0.4)
    assert out.kl.item() == 0.0
    seq = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, aggregation="sequence")
    assert seq.loss.item() == pytest.approx((sum(per_token[0]) / 3 + sum(per_token[1]) / 2) / 2)
    half = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, normalizer=10.0)
    assert half.loss.item() == pytest.approx(out.loss.item() / 2)


def test_kl_term_and_gradient():
    logp, old, adv, mask = _loss_case()
    logp = logp.clone().requires_grad_(True)
    ref = torch.full((2, 3), math.log(1.2))
    out = clipped_policy_loss(logp, old, adv, mask, beta=0.1, ref_logprobs=ref)
    base = clipped_policy_loss(logp, old, adv, mask)
    kl = kl_k3(logp.detach(), ref)
    expected_kl = (kl * mask).sum() / 5
    assert out.kl.item() == pytest.approx(expected_kl.item())
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.1 * expected_kl.item())
    out.loss.backward()
    # Clipped tokens carry no policy gradient; masked tokens none at all.
    assert logp.grad[1, 2] == 0
    # rho = 1.5 > 1.2 with A > 0: only the KL term's gradient, beta * (1 - ref/p) / 5.
    p = 1.5
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - 1.2 / p) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logprobs"):
        clipped_policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        clipped_policy_loss(logp, old, adv, mask, aggregation="mean")


def test_token_logprobs_match_log_softmax(megatron_world):
    from megatron_kaja.parallel.distributed import compute_device

    torch.manual_seed(0)
    device = compute_device()  # where a TP collective's inputs live
    logits = torch.randn(2, 5, 16).to(device).requires_grad_()
    targets = torch.randint(0, 13, (2, 5)).to(device)
    weights = torch.randn(2, 5).to(device)
    got = token_logprobs(logits, targets, temperature=0.7, vocab_size=13)
    (got * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected = torch.log_softmax(logits[..., :13] / 0.7, dim=-1).gather(-1, targets[..., None])
    torch.testing.assert_close(got, expected.squeeze(-1).detach())
    (expected.squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad)  # padded ids (13..15) get zero gradient
    assert torch.isinf(mask_padded_vocab(logits, 13, tp_rank=0)[..., 13:]).all()


def test_kl_estimators_against_hand_values_and_gradients():
    assert kl_estimator_names() == ["k1", "k2", "k3", "k3_is"]
    # p = 0.5, pi_ref = 0.25 (log ratio ln 2); the sampling policy had 0.4 (ratio 1.25).
    ln2 = math.log(2)
    expected = {
        "k1": (ln2, 1.0),  # value, d value / d log p
        "k2": (0.5 * ln2**2, ln2),
        "k3": (0.5 + ln2 - 1, 1 - 0.5),  # exp(d) - d - 1 with d = -ln 2; grad 1 - ref / p
        # 1.25 x k3; grad ratio x (k3 + 1 - ref / p) = ratio x log(p / ref)
        "k3_is": (1.25 * (0.5 + ln2 - 1), 1.25 * ln2),
    }
    ref, old = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.4)])
    for name, (value, grad) in expected.items():
        logp = torch.tensor([math.log(0.5)], requires_grad=True)
        kl = kl_estimate(name, logp, ref, old)
        kl.sum().backward()
        assert kl.item() == pytest.approx(value, abs=1e-6), name
        assert logp.grad.item() == pytest.approx(grad, abs=1e-6), name
    # On-policy (old = p) k3_is has k3's value and k2's gradient: the reverse-KL gradient.
    logp = torch.log(torch.tensor([0.5, 0.1, 0.7])).requires_grad_(True)
    ref = torch.log(torch.tensor([0.25, 0.3, 0.7]))
    kl = kl_estimate("k3_is", logp, ref, logp.detach())
    torch.testing.assert_close(kl, kl_estimate("k3", logp, ref, logp.detach()))
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(grad, (logp - ref).detach())
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate("k4", logp, ref, logp)


def test_kl_estimator_choice_reaches_the_loss():
    logp, old, adv, mask = _loss_case()
    ref = torch.full((2, 3), math.log(1.2))
    base = clipped_policy_loss(logp, old, adv, mask)
    for name in ("k1", "k2", "k3", "k3_is"):
        out = clipped_policy_loss(
            logp, old, adv, mask, beta=0.1, ref_logprobs=ref, kl_estimator=name
        )
        expected = (kl_estimate(name, logp, ref, old) * mask).sum() / 5
        assert out.kl.item() == pytest.approx(expected.item()), name
        assert out.loss.item() == pytest.approx(base.loss.item() + 0.1 * expected.item()), name


def test_dr_grpo_aggregation_divides_by_max_length_times_sequences():
    assert loss_aggregation_names() == ["dr_grpo", "sequence", "token"]
    logp, old, adv, mask = _loss_case()
    # Token sum -2.4 - 1.0 - 2.2 + 0.8 + 1.3 = -3.5 over max_length 4 x 2 sequences.
    out = clipped_policy_loss(logp, old, adv, mask, aggregation="dr_grpo", max_length=4)
    assert out.loss.item() == pytest.approx(-3.5 / 8)
    # The divisor is a constant: a shorter answer does not raise its tokens' weight.
    logp = logp.clone().requires_grad_(True)
    short = mask.clone()
    short[0, 2] = False
    a = clipped_policy_loss(logp, old, adv, mask, aggregation="dr_grpo", max_length=4)
    b = clipped_policy_loss(logp, old, adv, short, aggregation="dr_grpo", max_length=4)
    (ga,) = torch.autograd.grad(a.loss, logp)
    (gb,) = torch.autograd.grad(b.loss, logp)
    torch.testing.assert_close(ga[1], gb[1])
    with pytest.raises(ValueError, match="needs max_length"):
        clipped_policy_loss(logp, old, adv, mask, aggregation="dr_grpo")
