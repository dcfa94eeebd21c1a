"""Context parallelism (`--context-parallel-size`) on the sdpa backend: CP=2 equals the run
without it in losses and updated weights, alone, with TP=2 and sequence parallelism, and with
PP=2 (cp_worker.py, one 4-process launch); a CP=2 checkpoint resumes at CP=1; the backends
that cannot split rows and GRPO refuse it in one line, exit 2, before any compute."""

import pytest

from megatron_kaja.training.sft import main as sft_main
from tests.helpers import REPO, torchrun_result

WORKER = REPO / "tests" / "training" / "cp_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return torchrun_result(WORKER, 4, str(tmp_path_factory.mktemp("cp")), timeout=1200)


@pytest.mark.slow
def test_training_moves_the_weights(results):
    assert results["training_moved_weights"] > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_dp2_vs_dp4", "cp2_tp2_sp_vs_tp2", "cp2_pp2_vs_pp2"])
def test_context_parallel_equals_the_run_without_it(results, case):
    # Losses to float32 rounding; weights within Adam's normalized step of gradient sums
    # taken in another order (DP x CP ranks, micro-batches): measured <= 5e-6.
    assert results[case]["steps"] == 2
    assert results[case]["loss"] <= 1e-5
    assert results[case]["weights"] <= 1e-5


@pytest.mark.slow
def test_checkpoint_saved_at_cp2_resumes_at_cp1(results):
    assert results["resume_cp2_to_cp1"]["steps"] == 1
    assert results["resume_cp2_to_cp1"]["loss"] <= 1e-5
    assert results["resume_cp2_to_cp1"]["weights"] <= 1e-5


BASE = ["--load", "nowhere/mc", "--tokenizer", "nowhere/tok", "--context-parallel-size", "2"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--transformer-impl", "local"],
            "--context-parallel-size 2 with --transformer-impl local: megatron-core's local "
            "DotProductAttention takes no context parallelism; use --transformer-impl sdpa",
        ),
        (
            ["--transformer-impl", "transformer_engine"],
            "--context-parallel-size 2 with --transformer-impl transformer_engine: packed rows "
            "would need the THD layout with every sample padded to a multiple of 2 x CP, which "
            "is not built; use --transformer-impl sdpa",
        ),
    ],
)
def test_sft_refuses_context_parallelism_on_backends_that_cannot_split_rows(caplog, argv, line):
    assert sft_main([*BASE, "--train-data", "nowhere/a.jsonl", *argv]) == 2
    # the settings' error line: "invalid settings (command line): config: ..., <line>"
    assert caplog.messages[-1].endswith(line) and "\n" not in caplog.messages[-1]


def test_row_length_must_split_into_two_chunks_per_cp_rank(caplog):
    argv = [*BASE, "--train-data", "nowhere/a.jsonl", "--seq-length", "4098", "--dry-run",
            "--world-size", "4", "--allow-missing-files", "--global-batch-size", "8",
            "--model-preset", "llm-jp-3-13b"]  # fmt: skip
    assert sft_main(argv) == 2
    assert caplog.messages[-1] == "--context-parallel-size 2 needs --seq-length 4098 divisible by 4"


GRPO = ["--prompts", "nowhere/p.jsonl:safety", "--reward", "length"]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--transformer-impl", "local"],
            "--context-parallel-size 2 with --transformer-impl local: megatron-core's local "
            "DotProductAttention takes no context parallelism; use --transformer-impl sdpa",
        ),
        (
            ["--rollout-engine", "hf"],
            "--context-parallel-size 2 needs --rollout-engine builtin (the hf engine is not run "
            "under context parallelism)",
        ),
    ],
)
def test_grpo_refuses_context_parallelism_where_it_cannot_split_rows(caplog, argv, line):
    # (GRPO under CP on sdpa: tests/rl/test_grpo_context_parallel.py)
    from megatron_kaja.rl.trainer import main as grpo_main

    assert grpo_main([*BASE, *GRPO, *argv]) == 2
    assert caplog.messages[-1].endswith(line) and "\n" not in caplog.messages[-1]


def test_sdpa_is_the_backend_under_context_parallelism():
    from megatron_kaja.training.config import load_config

    cfg = load_config(["--tokenizer", "t", "--train-data", "a.jsonl",
                       "--context-parallel-size", "2"])  # fmt: skip
    assert cfg.transformer_impl == "sdpa"
    assert load_config(["--tokenizer", "t", "--train-data", "a.jsonl"]).transformer_impl is None
