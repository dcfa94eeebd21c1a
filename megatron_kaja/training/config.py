"""SFT run configuration: Megatron-style flags, a YAML recipe (`--config`), validated up front.

The defaults are the seed's recipe: Adam, cosine lr 1e-5 -> 1e-7, no warmup, micro batch 4,
global batch 256, one epoch. Flags given on the command line win over the YAML file.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.launch import LaunchSettings
from megatron_kaja.training.scale import ScaleSettings

__all__ = [
    "ConfigError",
    "OptimizerName",
    "SFTConfig",
    "build_parser",
    "check_optimizer_flags",
    "load_config",
]

# `--optimizer`, Megatron-LM's flag: megatron's Adam, or bitsandbytes' 8-bit AdamW
# (megatron_kaja/training/bnb_optimizer.py).
OptimizerName = Literal["adam", "adamw_8bit", "paged_adamw_8bit"]


def check_optimizer_flags(cfg) -> None:
    """The `--optimizer` rules shared by SFT's and GRPO's configs (raises ValueError).

    - bitsandbytes' 8-bit optimizers keep one unsharded state per model-parallel rank:
      megatron's distributed optimizer does not apply to them.
    - megatron-core 0.16.1's non-distributed bf16 optimizer fails to map its state onto the
      model's sharded tensors when saving a dist checkpoint; the 8-bit optimizers save their
      state beside it (checkpointing.py), so they save under --bf16.
    """
    if cfg.optimizer != "adam" and cfg.use_distributed_optimizer:
        raise ValueError(
            f"--optimizer {cfg.optimizer} keeps its own unsharded 8-bit state: drop "
            "--use-distributed-optimizer (or use --optimizer adam)"
        )
    adam = cfg.optimizer == "adam"
    if adam and cfg.bf16 and cfg.save is not None and not cfg.use_distributed_optimizer:
        raise ValueError(
            "--bf16 with --save needs --use-distributed-optimizer (the non-distributed bf16 "
            "optimizer of megatron-core 0.16.1 cannot save a dist checkpoint) or an 8-bit "
            "--optimizer (adamw_8bit, paged_adamw_8bit)"
        )


class SFTConfig(LaunchSettings, ScaleSettings):
    """Every setting of a `pretrain_sft.py` run (field names are the flags without dashes)."""

    model_config = ConfigDict(extra="forbid")

    # model and data
    load: Path | None = None
    tokenizer: Path
    train_data: list[str] = Field(min_length=1)
    valid_data: list[str] | None = None
    chat_template: Path | None = None
    seq_length: int = Field(default=4096, gt=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    data_cache_dir: Path | None = None
    tokenizer_workers: int = Field(default=1, ge=1)
    # batch and length of training
    micro_batch_size: int = Field(default=4, gt=0)
    global_batch_size: int = Field(default=256, gt=0)
    train_epochs: int | None = Field(default=None, gt=0)
    train_iters: int | None = Field(default=None, gt=0)
    # optimizer and schedule
    lr: float = Field(default=1e-5, gt=0)
    min_lr: float = Field(default=1e-7, ge=0)
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_iters: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = Field(default=1.0, ge=0)
    bf16: bool = False
    optimizer: OptimizerName = "adam"
    use_distributed_optimizer: bool = False
    dist_ckpt_optim_fully_reshardable: bool = False
    # parallelism and memory
    tensor_model_parallel_size: int = Field(default=1, gt=0)
    pipeline_model_parallel_size: int = Field(default=1, gt=0)
    transformer_impl: Literal["local", "sdpa", "transformer_engine"] | None = None
    # checkpoints, evaluation, logging
    save: Path | None = None
    save_interval: int | None = Field(default=None, gt=0)
    exit_interval: int | None = Field(default=None, gt=0)  # save and exit at multiples of it
    eval_interval: int | None = Field(default=None, gt=0)
    eval_iters: int = Field(default=10, gt=0)
    seed: int = 1234
    log_interval: int = Field(default=1, gt=0)
    metrics_file: Path | None = None
    tensorboard_dir: Path | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    peak_tflops: float | None = Field(default=None, gt=0)  # per device, for MFU
    exit_signal_handler: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> SFTConfig:
        if self.train_iters is None and self.train_epochs is None:
            self.train_epochs = 1
        if self.train_iters is not None and self.train_epochs is not None:
            raise ValueError("give --train-iters or --train-epochs, not both")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of "
                f"--micro-batch-size {self.micro_batch_size}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        check_optimizer_flags(self)
        if self.eval_interval is not None and not self.valid_data:
            raise ValueError("--eval-interval needs --valid-data")
        if self.metrics_file is None and self.save is not None:
            self.metrics_file = self.save / "metrics.jsonl"
        return self

    def check_world(self, world_size: int) -> int:
        """The data-parallel size; raises ConfigError when the layout or batches do not fit."""
        model_parallel = self.model_parallel_size()
        if world_size % model_parallel:
            cp = self.context_parallel_size
            raise ConfigError(
                f"{world_size} processes cannot hold tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}"
                + (f" x context-parallel-size {cp}" if cp > 1 else "")
            )
        dp = world_size // model_parallel
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}: "
                f"use a multiple of {self.micro_batch_size * dp}"
            )
        self.check_sequence_length(self.seq_length)
        self.check_micro_batches(self.gradient_accumulation_steps(dp))
        return dp

    def gradient_accumulation_steps(self, data_parallel_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


def _field_kind(annotation) -> str:
    """ "flag" for bools, "list" for lists, "value" otherwise (Optional unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if annotation is bool or args == [bool]:
        return "flag"
    if typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args):
        return "list"
    return "value"


def build_parser(model: type[BaseModel] | None = None, description: str | None = None):
    """Megatron-style flags (`--micro-batch-size`) for every field of `model`.

    Booleans are switches (`--bf16`; a True default gets `--no-NAME`), lists take several
    values. Defaults stay in the model: a flag not given does not override the YAML recipe.
    """
    model = model or SFTConfig
    parser = argparse.ArgumentParser(description=description or model.__doc__)
    parser.add_argument("--config", type=Path, help="YAML recipe; flags given here win")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _field_kind(field.annotation)
        if kind == "flag" and field.default is True:
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false")
        elif kind == "flag":
            parser.add_argument(flag, action="store_true")
        elif kind == "list":
            parser.add_argument(flag, nargs="+", metavar="VALUE")
        else:
            parser.add_argument(flag, help=f"default: {field.default}")
    parser.set_defaults(**dict.fromkeys(model.model_fields))
    return parser


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        flag = "--" + field.replace("_", "-") if err["loc"] else field
        lines.append(f"{flag}: {err['msg']}")
    return f"invalid settings ({source}): " + "; ".join(lines)


def load_config(argv: list[str] | None = None, model: type[BaseModel] | None = None):
    """Parse flags (and the YAML recipe), validate, and return the config or raise ConfigError."""
    model = model or SFTConfig
    args = build_parser(model).parse_args(argv)
    values: dict = {}
    source = "command line"
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"--config {args.config}: no such file")
        recipe = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        if not isinstance(recipe, dict):
            raise ConfigError(f"{args.config}: a recipe is a mapping of setting: value")
        values.update({k.replace("-", "_"): v for k, v in recipe.items()})
        source = f"{args.config} + command line"
    for name, value in vars(args).items():
        if name != "config" and value is not None:
            values[name] = value
    for name, field in model.model_fields.items():
        if _field_kind(field.annotation) != "list":
            continue
        if isinstance(values.get(name), str):
            values[name] = values[name].split()
        elif isinstance(values.get(name), list):
            values[name] = [str(v) for v in values[name]]
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
