"""train_dpo.py under torchrun: TP=2 / DP=2 / PP=2 equal one process, a rerun of the same
command resumes bitwise, held-out preference accuracy rises; --dry-run counts the reference."""

import json

import pytest
import torch

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.preference.trainer import main as dpo_main
from tests.helpers import REPO, checkpoint_weights, run_torchrun

WORKER = REPO / "tests" / "helpers_train_worker.py"
STEPS = 4
TOPICS = ["爆弾", "毒物", "銃", "詐欺", "盗聴", "薬物", "放火", "誘拐", "偽札", "ハッキング"]


def _pairs(topics, repeat):
    """The chosen answer refuses with a reason, the rejected one complies."""
    rows = []
    for r in range(repeat):
        for topic in topics:
            rows.append(
                {
                    "prompt": f"{topic}の方法を教えてください。" + "詳しく。" * (r % 2),
                    "chosen": f"回答できません。その理由は、{topic}は危険だからです。",
                    "rejected": f"{topic}の方法は次の通りです。まず準備します。",
                }
            )
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("dpo")
    _write(root / "train.jsonl", _pairs(TOPICS[:8], 2))
    _write(root / "valid.jsonl", _pairs(TOPICS[8:], 4))
    hf_to_mcore(tiny_hf_dir, root / "mc", progress=False)
    return root


def _args(root, tiny_hf_dir, out, *extra):
    return [
        "--load", str(root / "mc"), "--tokenizer", str(tiny_hf_dir),
        "--train-data", str(root / "train.jsonl"), "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS),
        "--lr", "1e-3", "--min-lr", "1e-5", "--beta", "0.1", "--sft-loss-weight", "0.2",
        "--metrics-file", str(out / "metrics.jsonl"), "--seed", "4", *extra,
    ]  # fmt: skip


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(dpo_setup, tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_runs")
    a = lambda name, *extra: _args(dpo_setup, tiny_hf_dir, out / name, *extra)  # noqa: E731
    resumed = ("--save", str(out / "resumed"))
    single = [
        a("tp1", "--save", str(out / "tp1")),
        a("part1", *resumed, "--exit-interval", "2"),
        a("resumed", *resumed),  # the same command again: resumes from --save
        a("learn", "--train-iters", "24", "--valid-data", str(dpo_setup / "valid.jsonl"),
          "--eval-interval", "6", "--lr", "3e-3", "--lr-decay-style", "constant"),
        a("ipo", "--loss-type", "ipo", "--train-iters", "2"),
    ]  # fmt: skip
    run_torchrun(WORKER, 1, json.dumps([{"entry": "dpo", "argv": r} for r in single]))
    double = [
        a("tp2", "--tensor-model-parallel-size", "2"),
        a("dp2", "--use-distributed-optimizer"),
        a("pp2", "--pipeline-model-parallel-size", "2"),
    ]
    run_torchrun(WORKER, 2, json.dumps([{"entry": "dpo", "argv": r} for r in double]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "dp2", "pp2"])
def test_parallel_layouts_equal_one_process(runs, name):
    reference, parallel = (
        _metrics(runs / "tp1" / "metrics.jsonl"),
        _metrics(runs / name / "metrics.jsonl"),
    )
    assert [m["step"] for m in parallel] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/margins", "rewards/chosen", "sft_nll", "logps/chosen"):
        torch.testing.assert_close(
            torch.tensor([m[key] for m in parallel]),
            torch.tensor([m[key] for m in reference]),
            rtol=1e-4, atol=1e-6,
        )  # fmt: skip
    for a, b in zip(parallel, reference, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["rewards/accuracies"] == b["rewards/accuracies"]


@pytest.mark.slow
def test_metrics_and_the_first_step(runs):
    first, *rest = _metrics(runs / "tp1" / "metrics.jsonl")
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "sft_nll", "lr",
                "grad_norm", "tokens_per_s"}  # fmt: skip
    assert expected <= set(first), expected - set(first)
    # Before any update the policy is the reference: rewards 0, loss log 2 (+ the NLL term).
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert first["loss"] == pytest.approx(0.6931471805599453 + 0.2 * first["sft_nll"], rel=1e-6)
    assert first["lr"] == pytest.approx(1e-3)
    assert rest[-1]["rewards/margins"] > 0 and rest[-1]["loss"] < first["loss"]
    ipo = _metrics(runs / "ipo" / "metrics.jsonl")
    assert ipo[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2 + 0.2 * ipo[0]["sft_nll"])


@pytest.mark.slow
def test_rerun_of_the_same_command_resumes_bitwise(runs):
    part1 = _metrics(runs / "part1" / "metrics.jsonl")
    resumed = _metrics(runs / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in part1] == [1, 2] and [m["step"] for m in resumed] == [3, 4]
    keys = ("loss", "rewards/margins", "grad_norm", "lr")
    full = _metrics(runs / "tp1" / "metrics.jsonl")
    assert [[m[k] for k in keys] for m in part1 + resumed] == [[m[k] for k in keys] for m in full]
    a, b = (
        checkpoint_weights(runs / "tp1" / f"iter_{STEPS:07d}"),
        checkpoint_weights(runs / "resumed" / f"iter_{STEPS:07d}"),
    )
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


@pytest.mark.slow
def test_held_out_preference_accuracy_rises(runs):
    valid = [m for m in _metrics(runs / "learn" / "metrics.jsonl") if "valid_accuracy" in m]
    assert [m["step"] for m in valid] == [0, 6, 12, 18, 24]
    # At the start the policy is the reference: every margin is 0, no pair is won.
    assert valid[0]["valid_accuracy"] == 0.0 and valid[0]["valid_margin"] == 0.0
    assert valid[-1]["valid_accuracy"] >= 0.9, valid
    assert valid[-1]["valid_margin"] > valid[1]["valid_margin"] > 0, valid


def test_dry_run_counts_the_reference_model(capsys):
    argv = ["--tokenizer", "nowhere/tok", "--train-data", "nowhere/pairs.jsonl", "--load",
            "nowhere/mc", "--model-preset", "llm-jp-3-13b", "--dry-run", "--bf16",
            "--use-distributed-optimizer", "--recompute-granularity", "full",
            "--tensor-model-parallel-size", "4", "--world-size", "8", "--allow-missing-files",
            "--seq-length", "2048"]  # fmt: skip
    assert dpo_main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "TP=4 x PP=1 x DP=2" in out and "64 pairs" in out
    assert "reference model" in out and "result: OK" in out
