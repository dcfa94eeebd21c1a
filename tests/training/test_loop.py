"""The run skeleton shared by the trainers: settings declared once with their `--help`, the
registries, one batch rule, auto-resume / overwrite protection, one clean error under torchrun."""

import json
import os
import subprocess
import sys

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.rl.run_config import GRPORunConfig
from megatron_kaja.training.config import SFTConfig, load_config
from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.settings import RunSettings, build_parser
from tests.helpers import REPO

SHARED_IN_GRPO = (
    "adam_eps",
    "transformer_impl",
    "recompute_activations",
    "recompute_granularity",
    "exit_signal_handler",
    "wandb_exp_name",
    "dist_ckpt_optim_fully_reshardable",
    "auto_resume",
    "overwrite",
)


@pytest.mark.parametrize("model", [SFTConfig, GRPORunConfig])
def test_help_explains_every_flag_by_section(model):
    text = build_parser(model).format_help()
    assert "PydanticUndefined" not in text
    sections = ("model and tokenizer", "optimizer and schedule", "checkpoints and run control",
                "parallelism and memory", "metrics and logging", "launch and dry run")  # fmt: skip
    for title in sections:
        assert f"\n{title}:\n" in text, title
    assert "one of cosine, linear, constant; default: cosine" in " ".join(text.split())
    assert "[path; required]" in " ".join(text.split())  # --tokenizer
    assert "--no-auto-resume" in text and "--overwrite" in text
    undescribed = [name for name, f in model.model_fields.items() if not f.description]
    assert not undescribed


def test_trainers_share_one_declaration_with_their_own_defaults():
    for name in SHARED_IN_GRPO:
        assert GRPORunConfig.model_fields[name].description == (
            SFTConfig.model_fields[name].description
        )
    base = ["--tokenizer", "tok"]
    sft = load_config([*base, "--train-data", "a.jsonl"], SFTConfig)
    grpo_args = [*base, "--prompts", "p.jsonl:safety", "--reward", "refusal_with_reason",
                 "--adam-eps", "1e-6", "--recompute-granularity", "full"]  # fmt: skip
    grpo = load_config(grpo_args, GRPORunConfig)
    assert (sft.min_lr, sft.weight_decay, sft.adam_beta2, sft.global_batch_size) == (
        1e-7, 0.0, 0.95, 256
    )  # fmt: skip
    assert (grpo.min_lr, grpo.weight_decay, grpo.adam_beta2, grpo.global_batch_size) == (
        0.0, 0.1, 0.999, 512
    )  # fmt: skip
    assert (grpo.adam_eps, grpo.recompute_granularity) == (1e-6, "full")
    assert RunSettings.model_fields["min_lr"].default == 1e-7  # the base is not changed
    algo = grpo.grpo_config()
    assert (algo.min_lr, algo.weight_decay, algo.num_generations) == (0.0, 0.1, 8)
    assert "GRPO: the algorithm" not in build_parser(SFTConfig).format_help()


def test_one_global_batch_rule_names_the_unit():
    sft = load_config(["--tokenizer", "t", "--train-data", "a", "--global-batch-size", "12",
                       "--micro-batch-size", "2"])  # fmt: skip
    with pytest.raises(ConfigError, match="--micro-batch-size 2 x data-parallel size 4"):
        sft.check_world(4)
    grpo_args = ["--tokenizer", "t", "--prompts", "p:safety", "--reward", "refusal_with_reason",
                 "--global-batch-size", "24", "--num-generations", "4"]  # fmt: skip
    grpo = load_config(grpo_args, GRPORunConfig)
    assert grpo.check_world(2) == 2
    with pytest.raises(ConfigError, match="--num-generations 4 x data-parallel size 4: use a mul"):
        grpo.check_world(4)


def test_attention_backends_and_rollout_engines_are_registered():
    from megatron_kaja.models.llama.attention import attention_backend, attention_backend_names
    from megatron_kaja.rl.engines import build_rollout_engine, rollout_engine_names

    assert attention_backend_names() == ("local", "sdpa", "transformer_engine")
    assert attention_backend("transformer_engine").schedule_shape(96, 2) == (192, 1)
    assert attention_backend("sdpa").schedule_shape(96, 2) == (96, 2)
    with pytest.raises(ValueError, match="use one of local, sdpa, transformer_engine"):
        attention_backend("flash")
    assert rollout_engine_names() == ("builtin", "hf", "vllm")
    with pytest.raises(ValueError, match="use one of builtin, hf, vllm"):
        build_rollout_engine("sglang", None, None, None)


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("loop")
    rows = [{"text": f"質問{i}です。", "output": f"答え{i}です。" * (1 + i % 3)} for i in range(32)]
    (root / "train.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    hf_to_mcore(tiny_hf_dir, root / "mc", progress=False)
    return root


def _sft_args(root, tiny_hf_dir, *extra):
    return ["--load", str(root / "mc"), "--tokenizer", str(tiny_hf_dir),
            "--train-data", str(root / "train.jsonl"), "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4",
            "--data-cache-dir", str(root / "cache"), "--lr", "1e-4", *extra]  # fmt: skip


def _pretrain(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain_sft.py"), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_rerun_resumes_from_save_and_never_overwrites_silently(sft_files, tiny_hf_dir, tmp_path):
    """A requeued job repeats its command (`--load` the start, `--save` the run): it resumes
    from `--save`, says so, and refuses to overwrite checkpoints it would not resume."""
    save = tmp_path / "run"
    args = _sft_args(sft_files, tiny_hf_dir, "--save", str(save), "--train-iters", "2")
    first = _pretrain(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    args[args.index("--train-iters") + 1] = "3"
    again = _pretrain(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming the sft run in {save} at iteration 2" in again.stderr
    assert _steps(save / "metrics.jsonl") == [1, 2, 3]
    refused = _pretrain(*args, "--no-auto-resume")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"--save {save} already holds a checkpoint (iteration 3 of a sft run)" in refused.stderr
    assert "Traceback" not in refused.stderr
    # GRPO into an SFT run's folder: a run of another kind is never resumed nor overwritten.
    from megatron_kaja.training.loop import resolve_model_source

    grpo = load_config(["--load", str(save), "--save", str(save), "--tokenizer", "t",
                        "--prompts", "p:safety", "--reward", "refusal_with_reason"],
                       GRPORunConfig)  # fmt: skip
    with pytest.raises(ConfigError, match=r"of a sft run\): choose another --save, or pass --ov"):
        resolve_model_source(grpo, "grpo")
    grpo.overwrite = True
    source = resolve_model_source(grpo, "grpo")
    assert source.resume_from is None and source.weights == save / "iter_0000003"
    fresh = _pretrain(*args, "--no-auto-resume", "--overwrite", "--load", str(sft_files / "mc"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stderr


@pytest.mark.slow
def test_bad_input_under_torchrun_is_one_line_from_rank0(sft_files, tiny_hf_dir, tmp_path):
    """2 processes, a malformed data file: one error line naming file:line, every rank exits 2,
    no traceback from the ranks (torchrun's own report of the exit codes follows)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "質問", "output": "答え"}) + "\n{not json\n")
    args = _sft_args(sft_files, tiny_hf_dir, "--train-iters", "1")
    args[args.index("--train-data") + 1] = str(bad)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "pretrain_sft.py"), *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if f"{bad}:2" in line]
    assert len(errors) == 1, output[-4000:]
    assert "megatron_kaja" in errors[0]  # our logger's line, not a launcher's
    # torchrun reports each rank's exit code; its own traceback is the only one.
    assert output.count("exitcode  : 2") == 2, output[-4000:]
    assert output.count("Traceback (most recent call last)") <= 1, output[-4000:]
    assert "megatron_kaja/" not in output.replace(str(bad), ""), output[-4000:]
    assert "Connection closed by peer" not in output
