"""`pretrain_sft.py` settings: the shared run settings plus SFT's data section.

The defaults are the seed's recipe: Adam, cosine lr 1e-5 -> 1e-7, no warmup, micro batch 4,
global batch 256, one epoch. Flags given on the command line win over the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.settings import (
    OptimizerName,
    RowSettings,
    build_parser,
    check_optimizer_flags,
)
from megatron_kaja.training.settings import load_config as _load_config

__all__ = [
    "ConfigError",
    "OptimizerName",
    "SFTConfig",
    "build_parser",
    "check_optimizer_flags",
    "load_config",
]


class SFTConfig(RowSettings):
    """Every setting of a `pretrain_sft.py` run (field names are the flags without dashes)."""

    SECTION: ClassVar[str] = "SFT data"
    # SFT data
    train_data: list[str] = Field(
        min_length=1, description="chat data files, optionally weighted: PATH [W PATH W ...]"
    )
    valid_data: list[str] | None = Field(default=None, description="validation data files")
    chat_template: Path | None = Field(
        default=None, description="jinja chat template (default: the tokenizer's)"
    )
    seq_length: int = Field(default=4096, gt=1, description="tokens per packed row")
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="what to do with a sample longer than --seq-length"
    )
    data_cache_dir: Path | None = Field(
        default=None,
        description="tokenization cache (default: $XDG_CACHE_HOME or ~/.cache, then "
        "megatron_kaja/sft_tokens)",
    )
    tokenizer_workers: int = Field(default=1, ge=1, description="processes that tokenize")
    eval_interval: int | None = Field(
        default=None, gt=0, description="validation loss every N steps (needs --valid-data)"
    )
    eval_iters: int = Field(default=10, gt=0, description="global batches per validation")
    peak_tflops: float | None = Field(
        default=None, gt=0, description="peak TFLOP/s per device for MFU (default: known GPUs)"
    )

    @model_validator(mode="after")
    def _sft_consistent(self) -> SFTConfig:
        if self.eval_interval is not None and not self.valid_data:
            raise ValueError("--eval-interval needs --valid-data")
        return self


def load_config(argv: list[str] | None = None, model: type[BaseModel] | None = None):
    """Parse flags (and the YAML recipe) of `model` (default: SFT's); raise ConfigError."""
    return _load_config(argv, model or SFTConfig)
