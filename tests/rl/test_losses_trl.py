"""Our GRPO loss against TRL's own `GRPOTrainer._compute_loss` (TRL 1.16) on identical
inputs: the loss and its gradient for each aggregation TRL shares with us, with the k3 KL
plain and importance-sampling-corrected, and the global token normalizer over two ranks.

TRL's method runs on a stand-in trainer holding only the attributes it reads; the policy's
log-probs come in as a tensor (its model forward is not what is compared). Skipped when TRL
is not installed (it is in the `test` extra).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_kaja.rl.losses import clipped_policy_loss

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")

MAX_LENGTH = 5
# Ours -> TRL's loss_type: the same aggregation under TRL's name.
AGGREGATIONS = {"token": "dapo", "sequence": "grpo", "dr_grpo": "dr_grpo"}


def _batch(seed: int = 0, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, MAX_LENGTH, generator=g) * 3
    logp = old + 0.3 * torch.randn(rows, MAX_LENGTH, generator=g)  # ratios around 1, some clipped
    ref = old + 0.2 * torch.randn(rows, MAX_LENGTH, generator=g)
    lengths = torch.randint(1, MAX_LENGTH + 1, (rows,), generator=g)
    mask = torch.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    adv = torch.randn(rows, generator=g)
    return logp, old, ref, adv, mask


def _trl_loss(logp, old, ref, adv, mask, *, loss_type, beta, bias_correction, items, processes):
    """TRL's loss for one process's batch (`items`: the token count over all processes)."""
    accelerator = SimpleNamespace(
        num_processes=processes,
        reduce=lambda t, reduction="sum": t,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None,
                             steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        max_completion_length=MAX_LENGTH,
    )  # fmt: skip
    n = logp.size(0)
    inputs = {
        "prompt_ids": torch.ones(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.ones(n, MAX_LENGTH, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(items)),
    }
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("kl", ["k3", "k3_is"])
def test_loss_and_gradient_equal_trls(aggregation, kl):
    logp, old, ref, adv, mask = _batch()
    ours_logp = logp.clone().requires_grad_(True)
    ours = clipped_policy_loss(
        ours_logp, old, adv, mask, clip_eps=0.2, beta=0.04, ref_logprobs=ref,
        kl_estimator=kl, aggregation=aggregation, max_length=MAX_LENGTH,
    ).loss  # fmt: skip
    ours.backward()
    theirs_logp = logp.clone().requires_grad_(True)
    theirs = _trl_loss(
        theirs_logp, old, ref, adv, mask, loss_type=AGGREGATIONS[aggregation], beta=0.04,
        bias_correction=kl == "k3_is", items=mask.sum(), processes=1,
    )  # fmt: skip
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)
    torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, atol=1e-7, rtol=1e-6)
    assert ours_logp.grad.abs().sum() > 0 and math.isfinite(ours.item())


def test_global_token_normalizer_over_two_ranks_equals_one_batch_and_trls_dapo():
    """Two data-parallel ranks whose gradients are averaged: each divides its token sum by
    half the global count (the step's normalizer), so their mean is the one-batch loss, as
    TRL's `dapo` computes it; each rank's own count (TRL's `bnpo`) is not."""
    logp, old, ref, adv, mask = _batch(seed=1, rows=6)
    mask[:3, 2:] = False  # rank 0 holds short answers, rank 1 long ones
    kw = dict(clip_eps=0.2, beta=0.04, kl_estimator="k3")
    whole = clipped_policy_loss(logp, old, adv, mask, ref_logprobs=ref, **kw).loss
    total = float(mask.sum())
    halves = [slice(0, 3), slice(3, 6)]
    ranks = [
        clipped_policy_loss(
            logp[r], old[r], adv[r], mask[r], ref_logprobs=ref[r], normalizer=total / 2, **kw
        ).loss
        for r in halves
    ]  # fmt: skip
    assert sum(ranks).item() / 2 == pytest.approx(whole.item(), abs=1e-7)
    trl = dict(beta=0.04, bias_correction=False, items=total, processes=2)
    dapo = [_trl_loss(logp[r], old[r], ref[r], adv[r], mask[r], loss_type="dapo", **trl)
            for r in halves]  # fmt: skip
    assert sum(dapo).item() / 2 == pytest.approx(whole.item(), abs=1e-7)
    bnpo = [_trl_loss(logp[r], old[r], ref[r], adv[r], mask[r], loss_type="bnpo", **trl)
            for r in halves]  # fmt: skip
    assert abs(sum(bnpo).item() / 2 - whole.item()) > 1e-3
