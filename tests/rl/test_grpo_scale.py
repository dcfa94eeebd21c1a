"""train_grpo.py with the scale flags equals the run without them (one 2-process launch):

- `--sequence-parallel` at TP=2 against TP=2 alone: the sampler decodes with sequence
  parallelism off, the log-prob and update forwards take rows right-padded to a multiple of
  TP, the norms' gradients are summed over TP;
- the same at TP=2 x PP=2 (a second launch, 4 processes): the pipeline schedule's
  activations between stages are split over TP;
- `--overlap-grad-reduce` (+ `--overlap-param-gather` with the distributed optimizer, small
  buckets, two optimizer passes per step) at DP=2 against the blocking run.
"""

import json

import pytest
import torch

from tests.helpers import run_torchrun
from tests.rl.test_train_grpo import WORKER, _metrics, _weights, comparison_runs

pytestmark = pytest.mark.slow

STEPS = 2
TP2 = ["--tensor-model-parallel-size", "2"]
# Every completion of the tiny model runs to --max-new-tokens (it rarely samples EOS), so 6
# and 7 new tokens give forward rows of both parities: one of them needs the padding.
RUNS = {
    "tp2_new6": [*TP2, "--max-new-tokens", "6"],
    "tp2_sp_new6": [*TP2, "--max-new-tokens", "6", "--sequence-parallel"],
    "tp2_new7": [*TP2, "--max-new-tokens", "7"],
    "tp2_sp_new7": [*TP2, "--max-new-tokens", "7", "--sequence-parallel"],
    "dp2": ["--num-iterations", "2"],
    "dp2_overlap": ["--num-iterations", "2", "--overlap-grad-reduce", "--ddp-bucket-size", "2000"],
    "dp2_distopt": ["--num-iterations", "2", "--use-distributed-optimizer"],
    "dp2_distopt_overlap": [
        "--num-iterations", "2", "--use-distributed-optimizer", "--overlap-grad-reduce",
        "--overlap-param-gather", "--ddp-bucket-size", "2000",
    ],
}  # fmt: skip
PAIRS = {  # run with the flag: (the run without it, bound on losses and weights)
    "tp2_sp_new6": ("tp2_new6", 1e-5),
    "tp2_sp_new7": ("tp2_new7", 1e-5),
    "tp2_pp2_sp": ("tp2_pp2", 1e-5),
    "dp2_overlap": ("dp2", 1e-6),
    "dp2_distopt_overlap": ("dp2_distopt", 1e-6),
}


PP_RUNS = {
    "tp2_pp2": [*TP2, "--pipeline-model-parallel-size", "2", "--max-new-tokens", "7"],
    "tp2_pp2_sp": [
        *TP2, "--pipeline-model-parallel-size", "2", "--max-new-tokens", "7",
        "--sequence-parallel",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("grpo_scale")
    argv = comparison_runs(root, tiny_hf_dir, STEPS)
    # Adam's default eps (1e-8) turns a last-bit difference in a near-zero gradient entry
    # (another summation order of the same sum) into a step of up to lr in that weight; at
    # 1e-4 the weights compare at the gradients' own precision.
    adam_eps = ["--adam-eps", "1e-4"]

    for nproc, runs in ((2, RUNS), (4, PP_RUNS)):
        launch = [
            {"entry": "grpo", "argv": argv(root / name, [*extra, *adam_eps])}
            for name, extra in runs.items()
        ]
        run_torchrun(WORKER, nproc, json.dumps(launch), timeout=1200)
    return root


@pytest.mark.parametrize("case", list(PAIRS))
def test_scale_flag_equals_the_run_without_it(runs, case):
    plain, bound = PAIRS[case]
    with_flag = _metrics(runs / case / "metrics.jsonl")
    without = _metrics(runs / plain / "metrics.jsonl")
    assert [m["step"] for m in with_flag] == list(range(1, STEPS + 1))
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 1e-3 for m in without)
    for a, b in zip(with_flag, without, strict=True):
        # The same completions (hence rewards), loss, KL and gradient.
        for key in ("reward_mean", "response_len_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("loss", "kl", "clip_frac"):
            assert a[key] == pytest.approx(b[key], abs=bound), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start = _weights(runs / "mc")
    ours = _weights(runs / case / f"iter_{STEPS:07d}")
    theirs = _weights(runs / plain / f"iter_{STEPS:07d}")
    assert all(not torch.equal(theirs[k], start[k]) for k in start)  # every tensor moved
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(with_flag, without, strict=True))
    weight_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in start)
    print(f"{case} vs {plain}: max loss diff {loss_diff:.2g}, max weight diff {weight_diff:.2g}")
    assert weight_diff <= bound


def test_both_row_parities_were_trained(runs):
    """The padding is exercised: the two TP pairs' forwards differ in length by one."""
    six = _metrics(runs / "tp2_new6" / "metrics.jsonl")
    seven = _metrics(runs / "tp2_new7" / "metrics.jsonl")
    assert {m["response_len_mean"] for m in six} == {6.0}
    assert {m["response_len_mean"] for m in seven} == {7.0}
