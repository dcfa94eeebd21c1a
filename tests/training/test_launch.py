"""`--dry-run` of the trainers: layout and memory without a GPU or torch.distributed; missing
files, layouts that cannot split, memory that does not fit and preset mismatches fail."""

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.training.config import ConfigError, load_config
from megatron_kaja.training.launch import world_size_for_plan
from megatron_kaja.training.sft import main as sft_main

PLAN = ["--tokenizer", "nowhere/tok", "--train-data", "nowhere/sft.jsonl", "--load", "nowhere/mc",
        "--model-preset", "llm-jp-3-13b", "--dry-run", "--bf16", "--use-distributed-optimizer",
        "--recompute-granularity", "full", "--tensor-model-parallel-size", "2"]  # fmt: skip


def test_dry_run_prints_layout_and_memory(capsys):
    rc = sft_main([*PLAN, "--world-size", "8", "--allow-missing-files"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "TP=2 x PP=1 x DP=4" in out and "16 accumulation steps" in out
    assert "fits in 80 GiB" in out and "NOT ON THIS MACHINE" in out


def test_missing_files_and_memory_fail_the_dry_run(capsys):
    assert sft_main([*PLAN, "--world-size", "8"]) == 1
    assert "missing: --load nowhere/mc" in capsys.readouterr().out
    assert sft_main([*PLAN, "--world-size", "8", "--allow-missing-files",
                     "--gpu-memory-gb", "40"]) == 1  # fmt: skip
    assert "does not fit in --gpu-memory-gb 40" in capsys.readouterr().out


def test_layout_errors_are_named(capsys, caplog):
    assert sft_main([*PLAN, "--world-size", "5", "--allow-missing-files"]) == 2
    assert "5 processes cannot hold" in caplog.text
    assert sft_main([*PLAN, "--world-size", "8", "--tensor-model-parallel-size", "3",
                     "--allow-missing-files"]) == 2  # fmt: skip
    assert "not divisible by tensor-model-parallel-size 3" in caplog.text
    with pytest.raises(ConfigError, match="--model-preset 'llm-jp-3-7b' is unknown"):
        load_config([*PLAN[:-9], "--model-preset", "llm-jp-3-7b"])
    with pytest.raises(ConfigError, match="--allow-missing-files only applies"):
        load_config([*PLAN[:6], "--allow-missing-files"])


def test_world_size_from_flags_then_environment():
    cfg = load_config(PLAN)
    assert world_size_for_plan(cfg, {"WORLD_SIZE": "16"})[0] == 16
    slurm = {"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"}
    assert world_size_for_plan(cfg, slurm)[0] == 32
    flags = load_config([*PLAN, "--nnodes", "2", "--nproc-per-node", "8"])
    assert world_size_for_plan(flags, {"WORLD_SIZE": "16"}) == (
        16, "--nnodes 2 x --nproc-per-node 8"
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--world-size 8 != --nnodes 2"):
        load_config([*PLAN, "--world-size", "8", "--nnodes", "2", "--nproc-per-node", "8"])


def test_local_checkpoint_and_tokenizer_are_read(tmp_path, tiny_hf_dir, capsys, caplog):
    mc = tmp_path / "mc"
    hf_to_mcore(tiny_hf_dir, mc, progress=False)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"text": "質問", "output": "答え"}\n')
    argv = ["--tokenizer", str(tiny_hf_dir), "--train-data", str(data), "--load", str(mc),
            "--dry-run", "--world-size", "1"]  # fmt: skip
    assert sft_main(argv) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {mc}" in out and "tokenizer:" in out and "result: OK" in out
    # A preset that does not describe the checkpoint is refused, naming the fields.
    assert sft_main([*argv, "--model-preset", "llm-jp-3-13b"]) == 2
    assert "does not match" in caplog.text and "hidden_size 5120" in caplog.text
