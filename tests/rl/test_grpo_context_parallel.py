"""train_grpo.py under context parallelism (sdpa): CP=2 equals the run without it in
completions, rewards, losses, KL, clip fraction, gradient norm and updated weights.

- one 2-process launch: CP=2 against CP=1 (there DP=2: the same global batch and the same
  completions, which follow from each prompt's place in the step), with 6 and 7 new tokens:
  the forward rows of the two differ in length by one, so one of them is padded to a
  multiple of 2 x CP; the 7-token pair under the `sequence` loss aggregation, whose
  per-token weights need each whole row's token count;
- one 4-process launch: CP=2 x TP=2 with `--sequence-parallel` against TP=2 with it (rows
  padded to a multiple of lcm(2 x CP, CP x TP)), and CP=2 x PP=2 against PP=2 (the sampler
  passes whole rows' activations between stages, the pipeline schedule's passes split rows).
"""

import json

import pytest
import torch

from tests.helpers import run_torchrun
from tests.rl.test_train_grpo import WORKER, _metrics, _weights, comparison_runs

pytestmark = pytest.mark.slow

STEPS = 2
SDPA = ["--transformer-impl", "sdpa"]
CP2 = ["--context-parallel-size", "2"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
NEW6 = ["--max-new-tokens", "6"]
NEW7_SEQ = ["--max-new-tokens", "7", "--loss-aggregation", "sequence"]
LAUNCHES = {
    2: {
        "cp1_new6": NEW6,
        "cp2_new6": [*NEW6, *CP2],
        "cp1_new7_seq": NEW7_SEQ,
        "cp2_new7_seq": [*NEW7_SEQ, *CP2],
    },
    4: {
        "tp2_sp": [*TP2_SP, *NEW6],
        "cp2_tp2_sp": [*TP2_SP, *NEW6, *CP2],
        "pp2": [*PP2, *NEW6],
        "cp2_pp2": [*PP2, *NEW6, *CP2],
    },
}
PAIRS = {  # the CP=2 run: (the run without CP, its launch's size)
    "cp2_new6": ("cp1_new6", 2),
    "cp2_new7_seq": ("cp1_new7_seq", 2),
    "cp2_tp2_sp": ("tp2_sp", 4),
    "cp2_pp2": ("pp2", 4),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("grpo_cp")
    return root, comparison_runs(root, tiny_hf_dir, STEPS)


def _launch(setup, nproc):
    root, argv = setup
    # Adam eps 1e-4 as test_grpo_scale.py: Adam's default turns a last-bit difference in a
    # near-zero gradient entry into a step of up to lr in that weight.
    launch = [
        {"entry": "grpo", "argv": argv(root / name, [*SDPA, *extra, "--adam-eps", "1e-4"])}
        for name, extra in LAUNCHES[nproc].items()
    ]
    run_torchrun(WORKER, nproc, json.dumps(launch), timeout=1200)
    return root


@pytest.fixture(scope="module")
def two_process_runs(setup):
    return _launch(setup, 2)


@pytest.fixture(scope="module")
def four_process_runs(setup):
    return _launch(setup, 4)


@pytest.mark.parametrize("case", list(PAIRS))
def test_context_parallel_equals_the_run_without_it(request, case):
    """The same completions (rewards, lengths), the CP=1 loss, KL and clip fraction (not CP
    times them: every token counted once), the CP=1 gradient norm and weights after two
    steps (the CP ranks' gradients sum to the loss's once)."""
    plain, nproc = PAIRS[case]
    root = request.getfixturevalue({2: "two_process_runs", 4: "four_process_runs"}[nproc])
    parallel = _metrics(root / case / "metrics.jsonl")
    reference = _metrics(root / plain / "metrics.jsonl")
    assert [m["step"] for m in parallel] == list(range(1, STEPS + 1))
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 1e-3 for m in reference)
    assert all(m["kl"] > 0 for m in reference[1:])  # the KL term is live after one update
    for a, b in zip(parallel, reference, strict=True):
        # (reward_std is a mean over DP ranks of each rank's own: not comparable across DP)
        for key in ("reward_mean", "response_len_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("loss", "kl", "clip_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start = _weights(root / "mc")
    ours = _weights(root / case / f"iter_{STEPS:07d}")
    theirs = _weights(root / plain / f"iter_{STEPS:07d}")
    assert all(not torch.equal(theirs[k], start[k]) for k in start)  # every tensor moved
    for key in start:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)
    weight_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in start)
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(parallel, reference, strict=True))
    print(f"{case} vs {plain}: max loss diff {loss_diff:.2g}, max weight diff {weight_diff:.2g}")


def test_both_row_lengths_were_trained(two_process_runs):
    """Every completion runs to --max-new-tokens, so the 6- and 7-token runs' rows differ in
    length by one: one of them is padded to a multiple of 2 x CP."""
    six = _metrics(two_process_runs / "cp2_new6" / "metrics.jsonl")
    seven = _metrics(two_process_runs / "cp2_new7_seq" / "metrics.jsonl")
    assert {m["response_len_mean"] for m in six} == {6.0}
    assert {m["response_len_mean"] for m in seven} == {7.0}
