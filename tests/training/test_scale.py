"""The scale settings on a tiny llm-jp-3 under torchrun (4 CPU processes, one launch): each
equals the run it replaces, in losses and in the updated weights (scale_worker.py).

- sequence parallelism: TP=2 x PP=2, and TP=2 x DP=2 with the distributed optimizer;
- overlapped grad reduce + param gather (several buckets) against the same run without;
- interleaved pipeline, PP=2 x 2 virtual stages, against PP=1;
- each recompute setting against none;
- checkpoints saved in one layout resume in another (TP / PP / SP / VPP changed);
and the flags end to end through pretrain_sft.py and train_dpo.py (one 2-process launch).
Context parallelism's own comparisons are in test_context_parallel.py.
"""

import json

import pytest

from tests.helpers import REPO, run_torchrun, torchrun_result

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "training" / "scale_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun_result(WORKER, 4, str(tmp_path_factory.mktemp("scale")), timeout=1200)


def test_training_moves_the_weights(results):
    # The comparisons below would be empty if the steps changed nothing.
    assert results["training_moved_weights"] > 1e-3


@pytest.mark.parametrize("case", ["sp_tp2_pp2", "sp_tp2_dp2_distopt"])
def test_sequence_parallel_equals_tensor_parallel_alone(results, case):
    assert results[case]["steps"] == 2
    assert results[case]["loss"] <= 1e-5
    assert results[case]["weights"] <= 1e-5


def test_overlapped_communication_equals_blocking(results):
    # The same sums in the same buckets, only launched earlier: fp32 noise at most.
    assert results["overlap_tp2_dp2_distopt"]["loss"] <= 1e-6
    assert results["overlap_tp2_dp2_distopt"]["weights"] <= 1e-6


def test_interleaved_pipeline_equals_one_stage(results):
    assert results["vpp_pp2x2_vs_pp1"]["loss"] <= 1e-5
    # PP=1 runs DP=4 x 1 micro-batch, PP=2 DP=2 x 2: the gradient sums differ in order
    # (~1e-7), which Adam's normalized step turns into up to ~1e-5 on weights whose
    # gradient is that small (the step moves weights by 2e-3).
    assert results["vpp_pp2x2_vs_pp1"]["weights"] <= 2e-5
    # Against the non-interleaved schedule of the same split: the same sums.
    assert results["vpp_pp2x2_vs_pp2"]["loss"] <= 1e-6
    assert results["vpp_pp2x2_vs_pp2"]["weights"] <= 1e-6
    # 4 micro-batches on 2 stages (the steady state), TP=2 with SP: as against PP=1 above.
    assert results["vpp_tp2_pp2x2_sp_4_micro_vs_pp1"]["loss"] <= 1e-5
    assert results["vpp_tp2_pp2x2_sp_4_micro_vs_pp1"]["weights"] <= 2e-5


@pytest.mark.parametrize("setting", ["full_uniform", "full_block", "full_block_1", "selective"])
def test_recompute_equals_no_recompute(results, setting):
    assert results[f"recompute_{setting}"]["loss"] <= 1e-6
    assert results[f"recompute_{setting}"]["weights"] <= 1e-6


@pytest.mark.parametrize(
    "case", ["resume_tp2pp2sp_to_tp1pp2vpp2", "resume_distopt_sp_to_pp2vpp2_overlap"]
)
def test_resume_in_another_layout_equals_the_uninterrupted_run(results, case):
    assert results[case]["steps"] == 1
    assert results[case]["loss"] <= 1e-5
    assert results[case]["weights"] <= 1e-5


# The same settings through pretrain_sft.py's flags (one 2-process launch): each run's
# losses equal the plain DP=2 run's, which test_sft.py shows equal to one process.
FLAG_RUNS = {
    "plain": (),
    "tp2_sp": ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
    "dp2_overlap": (
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--ddp-bucket-size",
        "5000",
    ),
    "pp2_vpp": (
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
    ),
    "pp2_uneven": (
        "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
    ),
    "recompute_block": (
        "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "1",
    ),
    # CP=2 x DP=1 on sdpa (the default under CP): both ranks read the same rows, the logged
    # loss sums both halves of every row.
    "cp2": ("--context-parallel-size", "2"),
}  # fmt: skip


DPO_FLAG_RUNS = {
    "plain": (),
    "tp2_sp": ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
    "pp2_vpp_recompute": (
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
        "--recompute-granularity", "full",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory, tiny_hf_dir):
    from megatron_kaja.checkpoint.convert import hf_to_mcore
    from tests.training.test_sft import WORKER as SFT_WORKER
    from tests.training.test_sft import _args, _records, _write_jsonl

    root = tmp_path_factory.mktemp("sft_flags")
    train = _write_jsonl(root / "train.jsonl", _records(160))
    hf_to_mcore(tiny_hf_dir, root / "mc", progress=False)
    setup = (root, train, root / "mc")
    runs = [
        {"entry": "sft", "argv": _args(setup, tiny_hf_dir, root / name, *flags)}
        for name, flags in FLAG_RUNS.items()
    ]
    # DPO (policy and frozen reference both split as the flags say), in the same launch.
    from tests.preference.test_train_dpo import TOPICS, _pairs, _write
    from tests.preference.test_train_dpo import _args as dpo_args

    dpo_root = root / "dpo"  # its pairs and the same converted checkpoint
    dpo_root.mkdir()
    (dpo_root / "mc").symlink_to(root / "mc")
    _write(dpo_root / "train.jsonl", _pairs(TOPICS[:8], 2))
    runs += [
        {"entry": "dpo", "argv": dpo_args(dpo_root, tiny_hf_dir, root / f"dpo_{name}", *flags)}
        for name, flags in DPO_FLAG_RUNS.items()
    ]
    run_torchrun(SFT_WORKER, 2, json.dumps(runs), timeout=1800)
    return root


def _sft_losses(root, name):
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.parametrize("name", [n for n in FLAG_RUNS if n != "plain"])
def test_scale_flags_train_like_the_plain_run(flag_runs, name):
    import torch

    plain = _sft_losses(flag_runs, "plain")
    assert len(plain) == 8 and plain[-1] < plain[0]
    torch.testing.assert_close(
        torch.tensor(_sft_losses(flag_runs, name)), torch.tensor(plain), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("name", [n for n in DPO_FLAG_RUNS if n != "plain"])
def test_scale_flags_train_dpo_like_the_plain_run(flag_runs, name):
    import torch

    plain = _sft_losses(flag_runs, "dpo_plain")
    assert len(plain) == 4
    torch.testing.assert_close(
        torch.tensor(_sft_losses(flag_runs, f"dpo_{name}")), torch.tensor(plain), rtol=1e-5, atol=0
    )
