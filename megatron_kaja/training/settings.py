"""The settings every trainer shares, declared once, and the command line made from them.

A trainer's config is `RunSettings` plus its own section (`SFTConfig`, `GRPORunConfig`,
`DPOConfig`); a trainer whose recipe wants other defaults names them in `DEFAULTS` instead of
declaring the field again. Each field's `description` is its `--help` text; flags are the
field names with dashes, Megatron-LM's names where it has one (`--micro-batch-size`).
Sections are the classes that declare the fields: `--help` groups the flags by them.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

from megatron_kaja.models.llama.attention import attention_backend_names
from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.launch import LaunchSettings
from megatron_kaja.training.scale import ScaleSettings

# `--optimizer`, Megatron-LM's flag: megatron's Adam, or bitsandbytes' 8-bit AdamW
# (megatron_kaja/training/bnb_optimizer.py).
OptimizerName = Literal["adam", "adamw_8bit", "paged_adamw_8bit"]
AttentionBackendName = Literal[attention_backend_names()]  # type: ignore[valid-type]


class ModelSettings(BaseModel):
    """model and tokenizer"""

    load: Path | None = Field(
        default=None,
        description="where training starts: a converted checkpoint, or a training run's "
        "--save folder (a run of this kind resumes; another kind gives its latest weights)",
    )
    tokenizer: Path = Field(description="HF tokenizer folder (its chat template renders data)")
    transformer_impl: AttentionBackendName | None = Field(
        default=None,
        description="attention backend / layer spec (default: sdpa under "
        "--context-parallel-size > 1; else transformer_engine on a GPU that has it, sdpa on "
        "other GPUs, local on CPU)",
    )


class BatchSettings(BaseModel):
    """batches and length of training"""

    micro_batch_size: int = Field(default=4, gt=0, description="rows per forward/backward")
    global_batch_size: int = Field(
        default=256, gt=0, description="rows per optimizer step, over all data-parallel ranks"
    )
    train_epochs: int | None = Field(
        default=None, gt=0, description="passes over the data (default 1 without --train-iters)"
    )
    train_iters: int | None = Field(default=None, gt=0, description="optimizer steps in all")
    seed: int = Field(default=1234, description="seed of data order, sampling and RNG")


class OptimizerSettings(BaseModel):
    """optimizer and schedule"""

    lr: float = Field(default=1e-5, gt=0, description="peak learning rate")
    min_lr: float = Field(default=1e-7, ge=0, description="learning rate at the end of decay")
    lr_decay_style: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay from --lr to --min-lr over the run"
    )
    lr_warmup_iters: int = Field(default=0, ge=0, description="linear warmup steps from 0")
    weight_decay: float = Field(default=0.0, ge=0, description="decoupled weight decay")
    adam_beta1: float = Field(default=0.9, description="Adam beta1")
    adam_beta2: float = Field(default=0.95, description="Adam beta2")
    adam_eps: float = Field(default=1e-8, description="Adam epsilon")
    clip_grad: float = Field(default=1.0, ge=0, description="gradient-norm clip (0: none)")
    bf16: bool = Field(default=False, description="bf16 weights and compute")
    optimizer: OptimizerName = Field(
        default="adam",
        description="megatron's Adam, or bitsandbytes' 8-bit AdamW (one state per "
        "model-parallel rank)",
    )
    use_distributed_optimizer: bool = Field(
        default=False, description="shard optimizer state over data-parallel ranks"
    )


class ParallelSettings(BaseModel):
    """parallelism and memory"""

    tensor_model_parallel_size: int = Field(default=1, gt=0, description="TP size")
    pipeline_model_parallel_size: int = Field(default=1, gt=0, description="PP size")


class CheckpointSettings(BaseModel):
    """checkpoints and run control"""

    save: Path | None = Field(default=None, description="checkpoint folder of this run")
    save_interval: int | None = Field(default=None, gt=0, description="save every N steps")
    exit_interval: int | None = Field(
        default=None, gt=0, description="save and exit at multiples of N steps"
    )
    exit_signal_handler: bool = Field(
        default=True, description="on SIGTERM: save at the end of the step and exit"
    )
    dist_ckpt_optim_fully_reshardable: bool = Field(
        default=False,
        description="save the distributed optimizer's state so that it loads at any layout "
        "(default: it reshards over data-parallel ranks only)",
    )
    auto_resume: bool = Field(
        default=True,
        description="resume from --save when it already holds a checkpoint of this run kind",
    )
    overwrite: bool = Field(
        default=False,
        description="start afresh even though --save holds checkpoints (they are replaced)",
    )


class LoggingSettings(BaseModel):
    """metrics and logging"""

    log_interval: int = Field(default=1, gt=0, description="log metrics every N steps")
    metrics_file: Path | None = Field(
        default=None, description="JSONL of the logged steps (default: SAVE/metrics.jsonl)"
    )
    tensorboard_dir: Path | None = Field(default=None, description="TensorBoard log folder")
    wandb_project: str | None = Field(default=None, description="W&B project to log to")
    wandb_exp_name: str | None = Field(default=None, description="W&B run name")


def batch_division_error(
    global_batch: int, unit: int, unit_flag: str, data_parallel: int | None
) -> str | None:
    """The one global-batch rule of every trainer: a step splits into whole units (rows of
    `--micro-batch-size`, groups of `--num-generations`) per data-parallel rank."""
    need = unit * (data_parallel or 1)
    if global_batch % need == 0:
        return None
    if data_parallel is None:
        return f"--global-batch-size {global_batch} is not a multiple of {unit_flag} {unit}"
    return (
        f"--global-batch-size {global_batch} is not divisible by {unit_flag} {unit} x "
        f"data-parallel size {data_parallel}: use a multiple of {need}"
    )


class RunSettings(
    ModelSettings,
    BatchSettings,
    OptimizerSettings,
    ParallelSettings,
    ScaleSettings,
    CheckpointSettings,
    LoggingSettings,
    LaunchSettings,
):
    """What every trainer is configured with; a trainer's config adds its own section."""

    model_config = ConfigDict(extra="forbid")
    # Another trainer's recipe defaults (field name -> default), applied in place.
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # A trainer's own section in `--help` (the shared ones are titled by their docstrings).
    SECTION: ClassVar[str] = "settings"
    # The unit a global batch is made of, and its flag (see `batch_division_error`).
    BATCH_UNIT_FLAG: ClassVar[str] = "--micro-batch-size"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        defaults = cls.__dict__.get("DEFAULTS", {})
        for name, value in defaults.items():
            cls.model_fields[name].default = value
        if defaults:
            cls.model_rebuild(force=True)

    def batch_unit(self) -> int:
        return self.micro_batch_size

    @model_validator(mode="after")
    def _run_consistent(self):
        if self.train_iters is None and self.train_epochs is None:
            self.train_epochs = 1
        if self.train_iters is not None and self.train_epochs is not None:
            raise ValueError("give --train-iters or --train-epochs, not both")
        error = batch_division_error(
            self.global_batch_size, self.batch_unit(), self.BATCH_UNIT_FLAG, None
        )
        if error:
            raise ValueError(error)
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.save_interval is not None and self.save is None:
            raise ValueError("--save-interval needs --save DIR")
        check_optimizer_flags(self)
        if self.metrics_file is None and self.save is not None:
            self.metrics_file = self.save / "metrics.jsonl"
        return self

    def check_world(self, world_size: int) -> int:
        """The data-parallel size; raises ConfigError when the layout or batches do not fit."""
        model_parallel = self.model_parallel_size()  # TP x PP x CP
        if world_size % model_parallel:
            cp = self.context_parallel_size
            raise ConfigError(
                f"{world_size} processes cannot hold tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}"
                + (f" x context-parallel-size {cp}" if cp > 1 else "")
            )
        dp = world_size // model_parallel
        error = batch_division_error(
            self.global_batch_size, self.batch_unit(), self.BATCH_UNIT_FLAG, dp
        )
        if error:
            raise ConfigError(error)
        self.check_micro_batches(self.gradient_accumulation_steps(dp))
        return dp

    def gradient_accumulation_steps(self, data_parallel_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


class RowSettings(RunSettings):
    """The settings of a trainer whose batches are rows of `--seq-length` tokens (SFT, DPO):
    the subclass declares `seq_length`; the world check adds its length rule."""

    def check_world(self, world_size: int) -> int:
        """The shared layout rules, and the rows' length against sequence / context
        parallelism."""
        dp = super().check_world(world_size)
        self.check_sequence_length(self.seq_length)
        return dp


def check_optimizer_flags(cfg) -> None:
    """The `--optimizer` rules (raises ValueError).

    bitsandbytes' 8-bit optimizers keep one unsharded state per model-parallel rank:
    megatron's distributed optimizer does not apply to them.
    """
    if cfg.optimizer != "adam" and cfg.use_distributed_optimizer:
        raise ValueError(
            f"--optimizer {cfg.optimizer} keeps its own unsharded 8-bit state: drop "
            "--use-distributed-optimizer (or use --optimizer adam)"
        )


# --- the command line -------------------------------------------------------------------


def _field_kind(annotation) -> str:
    """ "flag" for bools, "list" for lists, "value" otherwise (Optional unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if annotation is bool or args == [bool]:
        return "flag"
    if typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args):
        return "list"
    return "value"


def _describe_type(annotation) -> tuple[str, list[str]]:
    """(type name, allowed choices) of a field for `--help` (Optional unwrapped)."""
    target = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        target = args[0] if len(args) == 1 else annotation
    if typing.get_origin(target) is Literal:
        return "choice", [str(c) for c in typing.get_args(target)]
    if typing.get_origin(target) is list:
        (item,) = typing.get_args(target) or (str,)
        return f"list of {_describe_type(item)[0]}", []
    names = {int: "int", float: "float", str: "str", bool: "switch", Path: "path"}
    return names.get(target, getattr(target, "__name__", str(target))), []


def _help(field) -> str:
    kind, choices = _describe_type(field.annotation)
    parts = ["one of " + ", ".join(choices)] if choices else [kind]
    if field.is_required():
        parts.append("required")
    elif field.default_factory is not None:
        parts.append(f"default: {' '.join(map(str, field.default_factory()))}")
    elif field.default not in (None, PydanticUndefined) and kind != "switch":
        parts.append(f"default: {field.default}")
    description = field.description or ""
    return f"{description} [{'; '.join(parts)}]".strip().replace("%", "%%")


def field_sections(model: type[BaseModel]) -> dict[str, list[str]]:
    """Section title -> field names. A section is the class that declares the fields (its
    docstring's first line): the shared sections in `RunSettings`' order, then the
    trainer's own."""
    classes = [k for k in model.__mro__ if issubclass(k, BaseModel) and k is not BaseModel]
    shared = [k for k in classes if not issubclass(k, RunSettings)]
    own = [k for k in reversed(classes) if issubclass(k, RunSettings)]
    sections: dict[str, list[str]] = {}
    seen: set[str] = set()
    for klass in shared + own:
        title = klass.__dict__.get("SECTION") or (klass.__doc__ or "").strip().splitlines()[0]
        for name in getattr(klass, "__annotations__", {}):
            if name in model.model_fields and name not in seen:
                seen.add(name)
                sections.setdefault(title, []).append(name)
    return sections


def build_parser(model: type[BaseModel], description: str | None = None):
    """Megatron-style flags (`--micro-batch-size`) for every field of `model`, grouped by
    section, each with its description, type, choices and default.

    Booleans are switches (`--bf16`; a True default gets `--no-NAME`), lists take several
    values. Defaults stay in the model: a flag not given does not override the YAML recipe.
    """
    parser = argparse.ArgumentParser(
        description=description or model.__doc__,
        usage="%(prog)s [--config YAML] [--FLAG VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML recipe; flags given here win")
    for title, names in field_sections(model).items():
        group = parser.add_argument_group(title)
        for name in names:
            field = model.model_fields[name]
            flag = "--" + name.replace("_", "-")
            kind = _field_kind(field.annotation)
            text = _help(field)
            if kind == "flag" and field.default is True:
                group.add_argument(
                    f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                    help=f"turn off: {text}",
                )  # fmt: skip
            elif kind == "flag":
                group.add_argument(flag, action="store_true", help=text)
            elif kind == "list":
                group.add_argument(flag, nargs="+", metavar="VALUE", help=text)
            else:
                group.add_argument(flag, metavar=name.upper(), help=text)
    parser.set_defaults(**dict.fromkeys(model.model_fields))
    return parser


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        flag = "--" + field.replace("_", "-") if err["loc"] else field
        lines.append(f"{flag}: {err['msg']}")
    return f"invalid settings ({source}): " + "; ".join(lines)


def load_config(argv: list[str] | None, model: type[BaseModel]):
    """Parse flags (and the YAML recipe), validate, and return the config or raise ConfigError."""
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
