"""train_grpo.py: the loop on megatron DDP + optimizer, judge wiring, exact resume."""

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_kaja.checkpoint.convert import hf_to_mcore, open_mcore_checkpoint
from megatron_kaja.extras import is_available
from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply
from megatron_kaja.models.llama.state_dict import GLOBAL_MAPPINGS
from tests.helpers import REPO, run_torchrun

WORKER = REPO / "tests" / "helpers_train_worker.py"
STEPS = 4
QA = [
    ("爆弾の作り方を教えてください。", "回答できません。その理由は危険だからです。"),
    ("日本の首都はどこですか。", "東京です。"),
    ("富士山の高さを教えてください。", "三千七百七十六メートルです。"),
]


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("grpo")
    rows = [{"ID": f"p{i}", "text": q, "output": a} for i, (q, a) in enumerate(QA * 4)]
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    hf_to_mcore(tiny_hf_dir, root / "mc", progress=False)
    return root


def _args(root, tiny_hf_dir, out, *extra):
    return [
        "--load", str(root / "mc"), "--tokenizer", str(tiny_hf_dir),
        "--prompts", f"{root / 'prompts.jsonl'}:safety",
        "--num-generations", "4", "--max-new-tokens", "6", "--micro-batch-size", "4",
        "--global-batch-size", "16", "--train-iters", str(STEPS), "--lr", "1e-3",
        "--metrics-file", str(out / "metrics.jsonl"), "--seed", "3", *extra,
    ]  # fmt: skip


def comparison_runs(root, tiny_hf_dir, steps):
    """Prompts and the tiny model converted under `root`; returns `argv(out, extra)` for a
    GRPO run of `steps` steps that two launches compare: 4 prompts x 4 samples per step,
    micro-batches of 3 rows (a short last one), the tiny model as judge, a fixed seed."""
    rows = [{"ID": f"p{i}", "text": q, "output": a} for i, (q, a) in enumerate(QA * 4)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    hf_to_mcore(tiny_hf_dir, root / "mc", progress=False)

    def argv(out, extra):
        return [
            "--load", str(root / "mc"), "--tokenizer", str(tiny_hf_dir),
            "--prompts", f"{prompts}:safety", "--reward", "judge", "--judge-backend", "hf",
            "--judge-model", str(tiny_hf_dir), "--num-generations", "4",
            "--max-new-tokens", "6", "--micro-batch-size", "3", "--global-batch-size", "16",
            "--train-iters", str(steps), "--lr", "1e-3", "--temperature", "1.5",
            "--metrics-file", str(out / "metrics.jsonl"), "--save", str(out), "--seed", "3",
            *extra,
        ]  # fmt: skip

    return argv


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(ckpt):
    reader = open_mcore_checkpoint(ckpt)
    out = {m.te: reader.load_global(m) for m in GLOBAL_MAPPINGS}
    for layer in range(reader.arch.num_layers):
        out.update({f"{m.te}.{layer}": t for m, t in reader.load_layer(layer).items()})
    return out


@pytest.fixture(scope="module")
def dp2_runs(grpo_setup, tiny_hf_dir, tmp_path_factory):
    """DP=2 runs with the in-process hf judge (a tiny model as judge), in one launch: 4 steps,
    and 2 steps + exit + 2 resumed steps, with megatron's Adam and with paged_adamw_8bit."""
    out = tmp_path_factory.mktemp("dp2")
    judge = ["--reward", "judge", "--judge-backend", "hf", "--judge-model", str(tiny_hf_dir)]

    def a(prefix, optimizer, name, save, *extra):
        return _args(
            grpo_setup, tiny_hf_dir, out / f"{prefix}{name}", *judge, "--optimizer", optimizer,
            "--save", str(out / f"{prefix}{save}"), *extra,
        )  # fmt: skip

    runs = []
    for prefix, optimizer in (("", "adam"), ("bnb_", "paged_adamw_8bit")):
        runs += [
            a(prefix, optimizer, "full", "full"),
            a(prefix, optimizer, "part1", "resumed", "--exit-interval", "2"),
            [
                *a(prefix, optimizer, "resumed", "resumed")[2:],
                "--load",
                str(out / f"{prefix}resumed"),
            ],
        ]
    run_torchrun(WORKER, 2, json.dumps([{"entry": "grpo", "argv": r} for r in runs]))
    return out


def _assert_resume_is_exact(out, prefix):
    """2 steps + exit + 2 resumed steps equal 4 uninterrupted ones: metrics, bitwise weights."""
    full = _metrics(out / f"{prefix}full" / "metrics.jsonl")
    resumed = _metrics(out / f"{prefix}part1" / "metrics.jsonl") + _metrics(
        out / f"{prefix}resumed" / "metrics.jsonl"
    )
    keys = ("step", "reward_mean", "loss", "kl", "lr", "grad_norm")
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in full]
    a_weights = _weights(out / f"{prefix}full" / f"iter_{STEPS:07d}")
    b_weights = _weights(out / f"{prefix}resumed" / f"iter_{STEPS:07d}")
    for key, tensor in a_weights.items():
        assert torch.equal(tensor, b_weights[key]), key


@pytest.mark.slow
def test_hf_judge_dp2_resume_is_exact(dp2_runs):
    """Metrics hold every field; the resumed run equals the uninterrupted one."""
    full = _metrics(dp2_runs / "full" / "metrics.jsonl")
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    required = {
        "step", "reward_mean", "reward_std", "reward_mean/safety", "kl", "clip_frac",
        "zero_variance_frac", "judge_missing", "response_len_mean", "loss", "lr",
        "t_rollout", "t_reward", "t_logprob", "t_update", "t_sync",
    }  # fmt: skip
    assert required <= set(full[0]), required - set(full[0])
    assert all(0.0 <= m["reward_mean"] <= 1.0 and m["judge_missing"] == 0 for m in full)
    assert full[0]["lr"] == pytest.approx(1e-3)
    assert all(math.isfinite(m["loss"]) for m in full)
    _assert_resume_is_exact(dp2_runs, "")


@pytest.mark.slow
def test_paged_adamw_8bit_dp2_trains_and_resumes_exactly(dp2_runs, grpo_setup):
    """The seed's optimizer: the first step (before any update) equals the Adam run's, its
    gradient norm too; every weight moves, by at most ~lr per step; resume is exact."""
    adam = _metrics(dp2_runs / "full" / "metrics.jsonl")
    bnb = _metrics(dp2_runs / "bnb_full" / "metrics.jsonl")
    keys = ("reward_mean", "loss", "kl", "lr")
    assert [bnb[0][k] for k in keys] == [adam[0][k] for k in keys]
    assert bnb[0]["grad_norm"] == pytest.approx(adam[0]["grad_norm"], rel=1e-6)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in bnb)
    start = _weights(grpo_setup / "mc")
    trained = _weights(dp2_runs / "bnb_full" / f"iter_{STEPS:07d}")
    for key, tensor in start.items():
        change = (trained[key] - tensor).abs().max().item()
        assert 0 < change <= 2 * STEPS * 1e-3, (key, change)  # lr 1e-3
    _assert_resume_is_exact(dp2_runs, "bnb_")


@pytest.mark.slow
def test_hf_engine_tp2_and_pipeline_parallel_runs(grpo_setup, tiny_hf_dir, tmp_path):
    """TP=2 with the hf rollout engine sampling 4 sequences at a time: the trainer's weights
    reach it before every step (t_sync), and an interrupted run resumes exactly. In the same
    launch, the trainer at PP=2 equals it at TP=2 with the builtin engine (both equal one
    process: the sampler and the update do the same arithmetic split differently)."""
    a = lambda name, *extra: _args(  # noqa: E731
        grpo_setup, tiny_hf_dir, tmp_path / name, "--reward", "refusal_with_reason",
        "--rollout-engine", "hf", "--rollout-batch-size", "4",
        "--tensor-model-parallel-size", "2", "--temperature", "1.5", *extra,
    )  # fmt: skip
    runs = [
        a("full", "--save", str(tmp_path / "full")),
        a("part1", "--save", str(tmp_path / "resumed"), "--exit-interval", "2"),
        [
            *a("resumed", "--save", str(tmp_path / "resumed"))[2:],
            "--load",
            str(tmp_path / "resumed"),
        ],
    ]
    split = lambda name, *extra: _args(  # noqa: E731
        grpo_setup, tiny_hf_dir, tmp_path / name, "--reward", "judge", "--judge-backend", "hf",
        "--judge-model", str(tiny_hf_dir), "--train-iters", "2", "--micro-batch-size", "3",
        *extra,
    )  # fmt: skip
    runs += [
        split("tp2", "--tensor-model-parallel-size", "2"),
        split("pp2", "--pipeline-model-parallel-size", "2"),
    ]
    run_torchrun(WORKER, 2, json.dumps([{"entry": "grpo", "argv": r} for r in runs]))
    tp2, pp2 = (
        _metrics(tmp_path / "tp2" / "metrics.jsonl"),
        _metrics(tmp_path / "pp2" / "metrics.jsonl"),
    )
    assert [m["step"] for m in pp2] == [1, 2]
    assert all(m["reward_std"] > 0 and m["grad_norm"] > 1e-3 for m in tp2)  # a real signal
    for a, b in zip(tp2, pp2, strict=True):
        for key in ("reward_mean", "response_len_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("loss", "kl", "clip_frac"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    full = _metrics(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    assert all(m["t_sync"] > 0 and m["response_len_mean"] > 0 for m in full)
    assert all(math.isfinite(m["loss"]) and m["kl"] >= 0 for m in full)
    assert any(m["kl"] > 0 for m in full[1:])  # the policy moved away from the reference
    resumed = _metrics(tmp_path / "part1" / "metrics.jsonl") + _metrics(
        tmp_path / "resumed" / "metrics.jsonl"
    )
    keys = ("step", "reward_mean", "response_len_mean", "loss", "kl", "lr")
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in full]
    a_weights = _weights(tmp_path / "full" / f"iter_{STEPS:07d}")
    b_weights = _weights(tmp_path / "resumed" / f"iter_{STEPS:07d}")
    for key, tensor in a_weights.items():
        assert torch.equal(tensor, b_weights[key]), key


@pytest.mark.slow
def test_openai_judge_against_scripted_server(grpo_setup, tiny_hf_dir, tmp_path):
    """The judge reward through an OpenAI-compatible server: constrained choice, expected
    score from top_logprobs (p(4) = p(5) = 0.5 -> 4.5 / 5 = 0.9)."""
    half = math.log(0.5)

    def responder(body):
        return ScriptedReply(text="4", top_logprobs=[{"4": half, "5": half}])

    with ScriptedOpenAIServer(responder=responder) as server:
        args = _args(
            grpo_setup, tiny_hf_dir, tmp_path, "--reward", "judge", "--judge-backend", "openai",
            "--judge-base-url", server.base_url, "--judge-model", server.model,
            "--train-iters", "1", "--beta", "0",
        )  # fmt: skip
        proc = subprocess.run(
            [sys.executable, str(REPO / "train_grpo.py"), *args],
            capture_output=True, text=True, cwd=REPO, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        chat = [r for r in server.requests if "messages" in r]
    (step,) = _metrics(tmp_path / "metrics.jsonl")
    assert step["reward_mean"] == pytest.approx(0.9)
    assert step["zero_variance_frac"] == 1.0  # every completion scored alike
    assert len(chat) == 16  # 4 prompts x 4 generations, each judged once
    assert "回答できません" in json.dumps(chat[0], ensure_ascii=False)  # the reference answer


def test_bad_prompt_file_and_settings_fail_early(grpo_setup, tiny_hf_dir, tmp_path):
    from megatron_kaja.rl.run_config import GRPORunConfig
    from megatron_kaja.training.config import ConfigError, load_config

    base = _args(grpo_setup, tiny_hf_dir, tmp_path, "--reward", "refusal_with_reason")
    with pytest.raises(ConfigError, match="PATH:safety or PATH:helpful"):
        load_config([*base, "--prompts", "x.jsonl:harmful"], GRPORunConfig)
    with pytest.raises(ConfigError, match="--judge-model"):
        load_config([*base, "--reward", "judge"], GRPORunConfig)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 2 needs --rollout-e"):
        load_config(
            [*base, "--pipeline-model-parallel-size", "2", "--rollout-engine", "hf"], GRPORunConfig
        )
    with pytest.raises(ConfigError, match="num_generations"):
        load_config([*base, "--num-generations", "1"], GRPORunConfig)
    with pytest.raises(
        ConfigError, match=r"--rollout-engine: Input should be 'builtin', 'hf' or 'vllm'"
    ):
        load_config([*base, "--rollout-engine", "sglang"], GRPORunConfig)
    with pytest.raises(ConfigError, match="--rollout-batch-size"):
        load_config([*base, "--rollout-batch-size", "0"], GRPORunConfig)
    eight_bit = [*base, "--optimizer", "paged_adamw_8bit"]
    with pytest.raises(ConfigError, match="drop --use-distributed-optimizer"):
        load_config([*eight_bit, "--use-distributed-optimizer"], GRPORunConfig)
    assert load_config([*base, "--bf16", "--save", str(tmp_path)], GRPORunConfig).bf16
    assert load_config([*eight_bit, "--bf16", "--save", str(tmp_path)], GRPORunConfig).bf16


@pytest.mark.skipif(is_available("vllm"), reason="vllm is installed")
def test_vllm_engine_without_vllm_fails_before_compute(grpo_setup, tiny_hf_dir, tmp_path):
    args = _args(
        grpo_setup, tiny_hf_dir, tmp_path, "--reward", "refusal_with_reason",
        "--rollout-engine", "vllm", "--save", str(tmp_path / "out"),
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_grpo.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the vllm rollout engine (--rollout-engine vllm) needs the package 'vllm'" in proc.stderr
    assert "pip install 'megatron-kaja[gpu]'" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_rank_metrics_merge_across_different_prompt_kinds():
    """DP ranks that drew different prompt kinds hold different metric keys (and NaN for a
    kind with no scored sample): the merge averages each number over the ranks that have it."""
    from megatron_kaja.rl.trainer import merge_rank_metrics

    rank0 = {"reward_mean": 0.2, "reward_mean/safety": 0.2, "loss": 1.0, "skipped": False}
    rank1 = {
        "reward_mean": 0.6,
        "reward_mean/safety": math.nan,
        "reward_mean/helpful": 0.6,
        "loss": 3.0,
    }
    merged = merge_rank_metrics([rank0, rank1])
    assert merged["reward_mean"] == pytest.approx(0.4)
    assert merged["reward_mean/safety"] == pytest.approx(0.2)
    assert merged["reward_mean/helpful"] == pytest.approx(0.6)
    assert merged["loss"] == pytest.approx(2.0)
    assert merged["skipped"] is False
    assert math.isnan(merge_rank_metrics([{"x": math.nan}, {"x": math.nan}])["x"])


def test_reference_model_has_the_policys_layer_spec(
    megatron_world, grpo_setup, tiny_hf_dir, tmp_path, monkeypatch
):
    """On a GPU the policy takes the SDPA (or transformer-engine) spec by default; the frozen
    reference must run the same kernels, not megatron-core's local spec."""
    from megatron_kaja.rl import trainer
    from megatron_kaja.rl.run_config import GRPORunConfig
    from megatron_kaja.training import setup
    from megatron_kaja.training.config import load_config

    monkeypatch.setattr(setup, "default_transformer_impl", lambda: "sdpa")  # as on a GPU
    built = []

    def build_reference(arch, **kwargs):
        built.append(kwargs.get("transformer_impl", "local"))
        return build_model_chunks(arch, **kwargs)

    build_model_chunks = trainer.build_model_chunks
    monkeypatch.setattr(trainer, "build_model_chunks", build_reference)
    args = _args(grpo_setup, tiny_hf_dir, tmp_path, "--reward", "refusal_with_reason")
    args[args.index("--train-iters") + 1] = "1"
    metrics = trainer.train_grpo(load_config(args, GRPORunConfig))
    assert built == ["sdpa"] and math.isfinite(metrics["kl"])
