"""SFT settings: Megatron flag names, YAML recipes, and errors before any compute."""

import pytest

from megatron_kaja.training.config import ConfigError, load_config

BASE = ["--tokenizer", "tok", "--train-data", "a.jsonl"]


def test_seed_recipe_defaults():
    cfg = load_config(BASE)
    assert (cfg.lr, cfg.min_lr, cfg.lr_decay_style, cfg.lr_warmup_iters) == (
        1e-5,
        1e-7,
        "cosine",
        0,
    )
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.train_epochs) == (4, 256, 1)


def test_yaml_recipe_and_flags_win(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        "tokenizer: tok\ntrain-data: [a.jsonl, '0.7', b.jsonl, '0.3']\nlr: 2.0e-5\n"
        "micro_batch_size: 2\nsave: out\n"
    )
    cfg = load_config(["--config", str(recipe), "--lr", "3e-5"])
    assert cfg.lr == 3e-5 and cfg.micro_batch_size == 2
    assert cfg.train_data == ["a.jsonl", "0.7", "b.jsonl", "0.3"]
    assert str(cfg.metrics_file) == "out/metrics.jsonl"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size 10"),
        (["--min-lr", "1e-3"], "--min-lr"),
        (["--train-iters", "5", "--train-epochs", "1"], "not both"),
        (["--save-interval", "10"], "--save-interval needs --save"),
        (["--lr-decay-style", "wavy"], "--lr-decay-style"),
        (["--micro-batch-size", "0"], "--micro-batch-size"),
        (["--optimizer", "adamw_8bit", "--use-distributed-optimizer"], "drop --use-distributed"),
        (["--optimizer", "lion"], "--optimizer"),
    ],
)
def test_inconsistent_settings_fail_naming_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE + argv)


def test_every_optimizer_saves_under_bf16():
    """--bf16 --save with megatron's optimizer (distributed or not) and the 8-bit ones (whose
    state is saved beside the dist checkpoint); test_sft proves the resumes exact."""
    cfg = load_config([*BASE, "--bf16", "--save", "out", "--optimizer", "paged_adamw_8bit"])
    assert cfg.optimizer == "paged_adamw_8bit" and not cfg.use_distributed_optimizer
    cfg = load_config([*BASE, "--bf16", "--save", "out"])
    assert cfg.optimizer == "adam" and cfg.bf16 and not cfg.use_distributed_optimizer


def test_missing_required_settings_are_named():
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_config(["--train-data", "a.jsonl"])


def test_world_layout_checks():
    cfg = load_config([*BASE, "--global-batch-size", "12", "--micro-batch-size", "2"])
    assert cfg.check_world(2) == 2 and cfg.gradient_accumulation_steps(2) == 3
    with pytest.raises(
        ConfigError, match="not divisible by --micro-batch-size 2 x data-parallel size 4"
    ):
        cfg.check_world(4)
    cfg = load_config(
        [*BASE, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    )
    with pytest.raises(ConfigError, match="6 processes cannot hold"):
        cfg.check_world(6)
