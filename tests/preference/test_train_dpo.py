"""train_dpo.py under torchrun: TP=2 / DP=2 / PP=2 equal one process, packed pairs equal one
answer per row, a rerun of the same command resumes bitwise (fp32, and bf16 with the
distributed optimizer), held-out preference accuracy rises; --dry-run counts the reference."""

import json

import pytest
import torch

from megatron_kaja.checkpoint.convert import McoreCheckpointMeta, hf_to_mcore
from megatron_kaja.preference.trainer import main as dpo_main
from tests.helpers import REPO, checkpoint_weights, run_torchrun

WORKER = REPO / "tests" / "helpers_train_worker.py"
STEPS = 4
BF16_STEPS = 4
# Adam divides each gradient entry by its running RMS + eps: where an entry nearly cancels
# (|g| ~ 1e-7), float rounding in g moves the first updates by up to lr x rounding / eps
# (~1e-5 at eps 1e-8). The packed-vs-unpacked weight check uses eps 1e-4 so that what is
# compared is float32 rounding, not its magnification.
EPS = ("--adam-eps", "1e-4")
# The packing comparisons' rows: the test pairs' answers take 44-50 positions, so rows of 96
# hold two answers of up to 48 (a micro-batch of 2 pairs packs into 2, 3 or 4 rows).
PACK = ("--seq-length", "96", *EPS)
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
        a("unpacked", *PACK, "--save", str(out / "unpacked")),
        a("packed", "--packing", *PACK, "--save", str(out / "packed")),
        a("sdpa_packed", "--packing", *PACK, "--transformer-impl", "sdpa"),
    ]  # fmt: skip
    run_torchrun(WORKER, 1, json.dumps([{"entry": "dpo", "argv": r} for r in single]))
    dopt = ("--use-distributed-optimizer",)
    bf16 = ("--bf16", *dopt, "--train-iters", str(BF16_STEPS))
    bf16_resumed = ("--save", str(out / "bf16_resumed"))
    double = [
        a("tp2", "--tensor-model-parallel-size", "2"),
        a("dp2", *dopt),
        a("pp2", "--pipeline-model-parallel-size", "2"),
        a("dp2_packed", "--packing", *PACK, *dopt, "--save", str(out / "dp2_packed")),
        # packed micro-batches of 2 to 4 rows: evened out for the pipeline's fixed shapes
        a("pp2_packed", "--packing", *PACK, "--pipeline-model-parallel-size", "2"),
        a("bf16", *bf16, "--save", str(out / "bf16")),
        a("bf16_part1", *bf16, *bf16_resumed, "--exit-interval", "2"),
        a("bf16_resumed", *bf16, *bf16_resumed),
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


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected", "sft_nll", "grad_norm")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["packed", "sdpa_packed", "dp2_packed", "pp2_packed"])
def test_packed_pairs_equal_one_answer_per_row(runs, name):
    """--packing puts several answers in a row (each its own attention segment, log-probs
    summed per answer): the loss, every metric and the updated weights are those of one
    answer per row, to float32 rounding."""
    reference = _metrics(runs / "unpacked" / "metrics.jsonl")
    packed = _metrics(runs / name / "metrics.jsonl")
    assert [m["step"] for m in packed] == list(range(1, STEPS + 1))
    # 8 pairs a step: 16 rows unpacked, fewer packed (short answers share rows)
    assert [m["rows"] for m in reference] == [16] * STEPS
    if name != "pp2_packed":  # (there every micro-batch of a step has the most rows)
        assert all(m["rows"] < 16 for m in packed), [m["rows"] for m in packed]
    for key in PAIR_METRICS:
        torch.testing.assert_close(
            torch.tensor([m[key] for m in packed], dtype=torch.float64),
            torch.tensor([m[key] for m in reference], dtype=torch.float64),
            rtol=1e-6, atol=1e-6, msg=key,
        )  # fmt: skip
    assert [m["rewards/accuracies"] for m in packed] == [m["rewards/accuracies"] for m in reference]
    if name in ("sdpa_packed", "pp2_packed"):
        return  # save nothing: their metrics cover the SDPA and pipeline paths
    a = checkpoint_weights(runs / "unpacked" / f"iter_{STEPS:07d}")
    b = checkpoint_weights(runs / name / f"iter_{STEPS:07d}")
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        torch.testing.assert_close(b[key], tensor, rtol=0, atol=1e-6, msg=key)


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
def test_bf16_with_the_distributed_optimizer_resumes_bitwise(runs):
    """--bf16 --use-distributed-optimizer at DP=2 (as GPU runs train): 2 steps, exit, the
    same command again: the metrics and the saved bf16 weights equal an uninterrupted run's."""
    part1 = _metrics(runs / "bf16_part1" / "metrics.jsonl")
    resumed = _metrics(runs / "bf16_resumed" / "metrics.jsonl")
    full = _metrics(runs / "bf16" / "metrics.jsonl")
    assert [m["step"] for m in part1 + resumed] == list(range(1, BF16_STEPS + 1))
    keys = ("loss", "rewards/margins", "rewards/chosen", "sft_nll", "grad_norm", "lr")
    assert [[m[k] for k in keys] for m in part1 + resumed] == [[m[k] for k in keys] for m in full]
    assert full[-1]["rewards/margins"] > 0 and full[-1]["loss"] < full[0]["loss"]
    last = f"iter_{BF16_STEPS:07d}"
    assert McoreCheckpointMeta.load(runs / "bf16" / last).dtype == "bfloat16"
    a = checkpoint_weights(runs / "bf16" / last)
    b = checkpoint_weights(runs / "bf16_resumed" / last)
    for key, tensor in a.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, b[key]), key


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


def test_packing_is_refused_where_it_is_not_exact(caplog):
    """FP8 scales span a micro-batch's rows: packed and unpacked pairs would differ, so the
    run stops before any compute with one line naming the flag (exit 2)."""
    argv = ["--tokenizer", "nowhere/tok", "--train-data", "nowhere/pairs.jsonl", "--load",
            "nowhere/mc", "--packing", "--transformer-impl", "transformer_engine",
            "--fp8-format", "e4m3", "--dry-run", "--allow-missing-files"]  # fmt: skip
    assert dpo_main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "--packing" in message and "--fp8-format" in message and "\n" not in message
