"""The scale flags: Megatron-LM's names, their rules checked before any compute (one line
naming the flag), transformer-engine settings refused without it naming the extra, what
GRPO refuses, and the dry run counting and recommending."""

import pytest

from megatron_kaja.extras import MissingExtraError, is_available
from megatron_kaja.training.config import ConfigError, load_config
from megatron_kaja.training.scale import check_scale_extras

BASE = ["--tokenizer", "tok", "--train-data", "a.jsonl"]


def test_megatron_flag_names_reach_the_build_keywords():
    cfg = load_config(
        [
            *BASE,
            "--tensor-model-parallel-size", "2", "--sequence-parallel",
            "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--ddp-bucket-size", "1000000", "--pipeline-model-parallel-size", "2",
            "--num-layers-per-virtual-pipeline-stage", "2",
            "--decoder-first-pipeline-num-layers", "4",
            "--recompute-granularity", "full", "--recompute-method", "block",
            "--recompute-num-layers", "3",
        ]
    )  # fmt: skip
    assert cfg.scale_build_settings() == {
        "sequence_parallel": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "ddp_bucket_size": 1000000,
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 3,
        "decoder_first_pipeline_num_layers": 4,
        "decoder_last_pipeline_num_layers": None,
        "fp8_format": None,
        "fp8_recipe": None,
    }
    assert "sequence parallel" in cfg.describe_scale()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--recompute-method", "block"], "need --recompute-granularity full"),
        (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "need --rec"),
        (["--fp8-recipe", "delayed"], "--fp8-recipe needs --fp8-format"),
        (["--fp8-format", "e4m3", "--transformer-impl", "local"], "--fp8-format needs --trans"),
        (["--context-parallel-size", "2", "--transformer-impl", "local"], "use --transformer-im"),
        (["--num-layers-per-virtual-pipeline-stage", "2"], "--pipeline-model-parallel-size >= 2"),
        (["--decoder-last-pipeline-num-layers", "2"], "--pipeline-model-parallel-size >= 2"),
        (["--fp8-format", "e5m2"], "--fp8-format"),
        (
            [
                "--use-distributed-optimizer",
                "--overlap-grad-reduce",
                "--dist-ckpt-optim-fully-reshardable",
            ],
            "zero-fills part of a bucketed buffer",
        ),
    ],
)
def test_inconsistent_scale_settings_fail_naming_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE + argv)


def test_world_rules_of_the_scale_settings():
    from megatron_kaja.models.llama.config import PRESETS

    sp = load_config([*BASE, "--tensor-model-parallel-size", "4", "--sequence-parallel",
                      "--seq-length", "4098", "--global-batch-size", "8",
                      "--micro-batch-size", "1"])  # fmt: skip
    with pytest.raises(ConfigError, match="--sequence-parallel needs --seq-length 4098"):
        sp.check_world(8)
    vpp = load_config([*BASE, "--pipeline-model-parallel-size", "4",
                       "--num-layers-per-virtual-pipeline-stage", "5",
                       "--global-batch-size", "6", "--micro-batch-size", "1"])  # fmt: skip
    with pytest.raises(ConfigError, match="6 micro-batches per step"):
        vpp.check_world(4)  # DP=1: 6 micro-batches, not a multiple of PP=4
    assert vpp.virtual_pipeline_size(PRESETS["llm-jp-3-13b"]) == 2  # 10 layers per stage / 5
    with pytest.raises(ConfigError, match="does not divide"):
        load_config([*BASE, "--pipeline-model-parallel-size", "4",
                     "--num-layers-per-virtual-pipeline-stage", "3"]).virtual_pipeline_size(
            PRESETS["llm-jp-3-13b"]
        )  # fmt: skip
    cp = load_config([*BASE, "--context-parallel-size", "2", "--global-batch-size", "8"])
    with pytest.raises(ConfigError, match="x context-parallel-size 2"):
        cp.check_world(3)


@pytest.mark.skipif(is_available("transformer_engine"), reason="transformer-engine installed")
def test_transformer_engine_settings_are_refused_without_it_naming_the_extra():
    cfg = load_config([*BASE, "--fp8-format", "hybrid"])
    with pytest.raises(MissingExtraError, match=r"megatron-kaja\[gpu\]"):
        check_scale_extras(cfg)
    # Context parallelism runs on the sdpa backend: no extra needed.
    check_scale_extras(load_config([*BASE, "--context-parallel-size", "2"]))


def test_grpo_refuses_what_its_sampler_cannot_take():
    from megatron_kaja.rl.run_config import GRPORunConfig
    from megatron_kaja.training.settings import load_config as load_settings

    base = ["--load", "m", "--tokenizer", "tok", "--prompts", "p.jsonl:safety",
            "--reward", "length"]  # fmt: skip
    for argv, flag in (
        (["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"], "--fp8-format"),
    ):
        with pytest.raises(ConfigError, match=f"{flag}: not supported by train_grpo.py"):
            load_settings(base + argv, GRPORunConfig)
    # What GRPO takes: sequence parallelism, overlapped grad reduce and param gather,
    # recompute, uneven stages, an interleaved pipeline at any micro-batch count (the step
    # fills the schedule's last group itself: 16 completions in micro-batches of 3 pass).
    vpp = load_settings(
        [*base, "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
         "1", "--num-generations", "4", "--global-batch-size", "16", "--micro-batch-size", "3"],
        GRPORunConfig,
    )  # fmt: skip
    assert vpp.check_world(2) == 1
    cfg = load_settings(
        [*base, "--recompute-granularity", "full", "--use-distributed-optimizer",
         "--overlap-param-gather", "--overlap-grad-reduce", "--pipeline-model-parallel-size", "2",
         "--decoder-first-pipeline-num-layers", "1", "--tensor-model-parallel-size", "2",
         "--sequence-parallel"],
        GRPORunConfig,
    )  # fmt: skip
    assert cfg.recompute_granularity == "full" and cfg.overlap_param_gather
    assert cfg.sequence_parallel and cfg.overlap_grad_reduce


def test_dry_run_counts_the_scale_settings_and_recommends(capsys, monkeypatch):
    from megatron_kaja.training.sft import main

    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    common = ["--model-preset", "llm-jp-3-13b", "--load", "nowhere", "--tokenizer", "nowhere",
              "--train-data", "nowhere.jsonl", "--dry-run", "--allow-missing-files", "--bf16",
              "--use-distributed-optimizer", "--world-size", "8",
              "--tensor-model-parallel-size", "4"]  # fmt: skip
    assert main(common) == 1  # TP=4 without SP and recompute does not fit 80 GiB
    plain = capsys.readouterr().out
    assert "DOES NOT FIT" in plain
    assert "recommended layout: TP=4 PP=1 DP=2 --sequence-parallel (69.3 GiB)" in plain
    assert main([*common, "--sequence-parallel"]) == 0
    sp = capsys.readouterr().out
    assert "scale: sequence parallel" in sp and "total (peak)" in sp and "69.31 GiB" in sp


def test_grpo_dry_run_shows_context_parallel_and_the_interleaved_schedules_micro_batches(
    capsys, monkeypatch
):
    from megatron_kaja.rl.trainer import main

    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(var, raising=False)
    # 16 completions per DP rank in micro-batches of 3: 6 micro-batches, run as 8 (groups of
    # PP=4 under the interleaved schedule); CP=2 on 32 ranks of TP=2 x PP=4 leaves DP=2.
    argv = ["--model-preset", "llm-jp-3-13b", "--load", "nowhere", "--tokenizer", "nowhere",
            "--prompts", "nowhere.jsonl:safety", "--reward", "length", "--dry-run",
            "--allow-missing-files", "--bf16", "--use-distributed-optimizer",
            "--world-size", "32", "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage",
            "5", "--context-parallel-size", "2", "--num-generations", "8",
            "--global-batch-size", "32", "--micro-batch-size", "3"]  # fmt: skip
    main(argv)
    out = capsys.readouterr().out
    assert "layout: TP=2 x PP=4 x DP=2 x CP=2;" in out, out
    assert "micro-batch 3 x 8 accumulation steps (+2 empty: groups of PP)" in out, out
    assert "scale: " in out and "CP=2" in out.split("scale: ")[1], out
