"""train_dpo.py under context parallelism (sdpa): CP=2 equals the run without it in losses,
rewards, gradient norms and updated weights, one answer per row and packed (ipo there, whose
per-answer token counts are summed over the CP group too), and CP=2 x TP=2 with sequence
parallelism equals TP=2, CP=2 x PP=2 equals PP=2 (the stages pass [s / 2, b, h]
activations); one 4-process launch (CP=2 x DP=2 against DP=4: the same global
batches, CP the only change but DP's order of sums)."""

import json

import pytest
import torch

from megatron_kaja.preference.trainer import main as dpo_main
from tests.helpers import checkpoint_weights, run_torchrun
from tests.preference.test_train_dpo import EPS, WORKER, _args, _metrics, dpo_setup  # noqa: F401

STEPS = 3
# Rows of 64 tokens: CP=2 cuts each into 4 chunks of 16, so every answer spans both ranks'
# chunks.
SDPA = ("--transformer-impl", "sdpa", "--train-iters", str(STEPS), *EPS)
CP2 = ("--context-parallel-size", "2")
TP2_SP = ("--tensor-model-parallel-size", "2", "--sequence-parallel")
PP2 = ("--pipeline-model-parallel-size", "2")
# The pair data's answers take 44-50 positions: rows of 128 hold two (their boundary inside a
# chunk of 32).
PACKED_IPO = ("--packing", "--loss-type", "ipo", "--seq-length", "128")
CASES = {  # CP=2 run: the run without CP it must equal
    "cp2": "dp4",
    "cp2_packed_ipo": "dp4_packed_ipo",
    "cp2_tp2_sp": "tp2_sp",
    "cp2_pp2": "pp2",
}


@pytest.fixture(scope="module")
def runs(dpo_setup, tiny_hf_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("dpo_cp_runs")
    flags = {
        "dp4": (),
        "cp2": CP2,
        "dp4_packed_ipo": PACKED_IPO,
        "cp2_packed_ipo": (*PACKED_IPO, *CP2),
        "tp2_sp": TP2_SP,
        "cp2_tp2_sp": (*TP2_SP, *CP2),
        "pp2": PP2,
        "cp2_pp2": (*PP2, *CP2),
    }
    argvs = [
        _args(dpo_setup, tiny_hf_dir, out / name, *SDPA, *extra, "--save", str(out / name))
        for name, extra in flags.items()
    ]
    run_torchrun(WORKER, 4, json.dumps([{"entry": "dpo", "argv": a} for a in argvs]))
    return out


# Every logged number of a step; rewards/accuracies (a count of won pairs) exactly.
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected", "sft_nll", "grad_norm")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_equals_the_run_without_it(runs, name):
    """The CP ranks' per-answer log-probs add up to the whole answers' (the loss, rewards and
    NLL term are the numbers of the run without CP, not CP x them) and their gradients to the
    full gradient once (the grad norm: pairs counted on one CP rank only); the weights after
    three Adam steps equal to float32 rounding (Adam eps 1e-4, as test_train_dpo.py's
    packing comparison, so that what is compared is rounding, not its magnification)."""
    reference = _metrics(runs / CASES[name] / "metrics.jsonl")
    parallel = _metrics(runs / name / "metrics.jsonl")
    assert [m["step"] for m in parallel] == list(range(1, STEPS + 1))
    assert [m["rows"] for m in parallel] == [m["rows"] for m in reference]
    assert parallel[0]["sft_nll"] > 0  # the --sft-loss-weight term is in the loss
    for key in METRICS:
        torch.testing.assert_close(
            torch.tensor([m[key] for m in parallel], dtype=torch.float64),
            torch.tensor([m[key] for m in reference], dtype=torch.float64),
            rtol=1e-5, atol=1e-6, msg=key,
        )  # fmt: skip
    assert [m["rewards/accuracies"] for m in parallel] == [
        m["rewards/accuracies"] for m in reference
    ]
    assert reference[-1]["rewards/margins"] > 0  # the steps trained
    a = checkpoint_weights(runs / CASES[name] / f"iter_{STEPS:07d}")
    b = checkpoint_weights(runs / name / f"iter_{STEPS:07d}")
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_packed_rows_hold_several_answers(runs):
    """The packed case splits rows of several answers: 2 pairs' 4 answers in 2 rows."""
    packed = _metrics(runs / "cp2_packed_ipo" / "metrics.jsonl")
    unpacked = _metrics(runs / "cp2" / "metrics.jsonl")
    assert [m["rows"] for m in unpacked] == [16] * STEPS
    assert [m["rows"] for m in packed] == [8] * STEPS


def test_dpo_refuses_context_parallelism_on_local_attention(caplog):
    argv = ["--load", "nowhere/mc", "--tokenizer", "nowhere/tok", "--train-data",
            "nowhere/p.jsonl", "--context-parallel-size", "2",
            "--transformer-impl", "local"]  # fmt: skip
    assert dpo_main(argv) == 2
    assert caplog.messages[-1].endswith(
        "--context-parallel-size 2 with --transformer-impl local: megatron-core's local "
        "DotProductAttention takes no context parallelism; use --transformer-impl sdpa"
    )
    assert "\n" not in caplog.messages[-1]


def test_dpo_dry_run_shows_the_context_parallel_layout(capsys):
    argv = ["--tokenizer", "nowhere/tok", "--train-data", "nowhere/pairs.jsonl", "--load",
            "nowhere/mc", "--model-preset", "llm-jp-3-13b", "--dry-run", "--bf16",
            "--use-distributed-optimizer", "--recompute-granularity", "full",
            "--world-size", "16", "--tensor-model-parallel-size", "4",
            "--context-parallel-size", "2", "--allow-missing-files",
            "--seq-length", "8192"]  # fmt: skip
    assert dpo_main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "TP=4 x PP=1 x DP=2 x CP=2" in out and "result: OK" in out
