"""train_grpo.py under an interleaved pipeline (one 2-process launch): PP=2 x 2 model chunks
of one layer each against PP=2 without interleaving, over 2 steps.

- micro-batches of 3 (6 per step, whole groups of PP): the same completions (rewards,
  lengths, the sampler's log-probs against the update's), losses, gradients and weights;
- micro-batches of 6 (3 per step): the step fills the schedule's last group with an empty
  micro-batch, which changes nothing;
- 1 step, exit, resume at the same layout: equals the uninterrupted run bit for bit;

and at PP=2 x 2 chunks x DP=2 (a 4-process launch), 2 update passes per step, 3 micro-batches
per DP rank (filled up to 4): overlapped grad reduce against the blocking run, with megatron's
optimizer and with the distributed one (+ overlapped param gather), so the schedule's
per-chunk `no_sync` / grad-sync hooks hold under the empty micro-batches too.
"""

import json

import pytest
import torch

from tests.helpers import run_torchrun
from tests.rl.test_grpo_scale import RUNS as SCALE_RUNS
from tests.rl.test_train_grpo import WORKER, _metrics, _weights, comparison_runs

pytestmark = pytest.mark.slow

STEPS = 2
PP2 = ["--pipeline-model-parallel-size", "2"]
VPP = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1"]  # 4 layers: 2 chunks per stage
# As tests/rl/test_grpo_scale.py: at Adam's default eps a last-bit difference in a near-zero
# gradient entry becomes a step of up to lr; at 1e-4 weights compare at the gradients'
# precision.
ADAM_EPS = ["--adam-eps", "1e-4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("grpo_vpp")
    argv = comparison_runs(root, tiny_hf_dir, STEPS)
    launch = [
        argv(root / "pp2", [*PP2, *ADAM_EPS]),
        argv(root / "vpp", [*VPP, *ADAM_EPS]),
        argv(root / "vpp_mb6", [*VPP, *ADAM_EPS, "--micro-batch-size", "6"]),
        [
            *argv(root / "part1", [*VPP, *ADAM_EPS, "--exit-interval", "1"]),
            "--save", str(root / "resumed"),
        ],
        [
            *argv(root / "resumed", [*VPP, *ADAM_EPS]),
            "--load", str(root / "resumed"),
        ],
    ]  # fmt: skip
    run_torchrun(WORKER, 2, json.dumps([{"entry": "grpo", "argv": a} for a in launch]))
    return root


@pytest.mark.parametrize("case", ["vpp", "vpp_mb6"])
def test_interleaved_pipeline_equals_pp2(runs, case):
    ours = _metrics(runs / case / "metrics.jsonl")
    plain = _metrics(runs / "pp2" / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 1e-3 for m in plain)
    for a, b in zip(ours, plain, strict=True):
        # The same completions (hence rewards and lengths), scored alike by the update.
        for key in ("reward_mean", "reward_std", "response_len_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["sampler_logprob_diff"] < 1e-4
        for key in ("loss", "kl", "clip_frac"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start = _weights(runs / "mc")
    mine = _weights(runs / case / f"iter_{STEPS:07d}")
    theirs = _weights(runs / "pp2" / f"iter_{STEPS:07d}")
    assert all(not torch.equal(theirs[k], start[k]) for k in start)  # every tensor moved
    weight_diff = max(float((mine[k] - theirs[k]).abs().max()) for k in start)
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, plain, strict=True))
    print(f"{case} vs pp2: max loss diff {loss_diff:.2g}, max weight diff {weight_diff:.2g}")
    assert weight_diff <= 1e-5


def test_interleaved_pipeline_resume_is_exact(runs):
    """Saved after step 1 (a chunk per virtual stage in the checkpoint), resumed: the
    metrics and weights of the uninterrupted run."""
    full = _metrics(runs / "vpp" / "metrics.jsonl")
    resumed = _metrics(runs / "part1" / "metrics.jsonl") + _metrics(
        runs / "resumed" / "metrics.jsonl"
    )
    keys = ("step", "reward_mean", "loss", "kl", "lr", "grad_norm")
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in full]
    a = _weights(runs / "vpp" / f"iter_{STEPS:07d}")
    b = _weights(runs / "resumed" / f"iter_{STEPS:07d}")
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


# the DP=2 overlap runs of the GRPO scale test, each here under the interleaved pipeline
OVERLAP_RUNS = {k: v for k, v in SCALE_RUNS.items() if k.startswith("dp2")}


@pytest.fixture(scope="module")
def overlap_runs(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("grpo_vpp_dp2")
    argv = comparison_runs(root, tiny_hf_dir, STEPS)
    launch = [
        {"entry": "grpo", "argv": argv(root / name, [*VPP, *ADAM_EPS, *extra])}
        for name, extra in OVERLAP_RUNS.items()
    ]
    run_torchrun(WORKER, 4, json.dumps(launch), timeout=1200)
    return root


@pytest.mark.parametrize("case", ["dp2_overlap", "dp2_distopt_overlap"])
def test_interleaved_pipeline_overlap_equals_blocking(overlap_runs, case):
    plain = case.removesuffix("_overlap")
    ours = _metrics(overlap_runs / case / "metrics.jsonl")
    theirs = _metrics(overlap_runs / plain / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    assert all(m["grad_norm"] > 1e-3 for m in theirs)
    for a, b in zip(ours, theirs, strict=True):
        for key in ("reward_mean", "response_len_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("loss", "kl", "clip_frac"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start = _weights(overlap_runs / "mc")
    mine = _weights(overlap_runs / case / f"iter_{STEPS:07d}")
    other = _weights(overlap_runs / plain / f"iter_{STEPS:07d}")
    assert all(not torch.equal(other[k], start[k]) for k in start)
    weight_diff = max(float((mine[k] - other[k]).abs().max()) for k in start)
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs, strict=True))
    print(f"{case} vs {plain}: max loss diff {loss_diff:.2g}, max weight diff {weight_diff:.2g}")
    assert weight_diff <= 1e-6
