"""Where SFT data comes from, and with what weight: `DataSource` and its two spellings.

On the command line (Megatron style): ``--train-data a.jsonl 0.7 b.jsonl 0.3`` (a single
path needs no weight). In a YAML recipe::

    train_data:
      - {path: a.jsonl, weight: 0.7}
      - {path: llm-jp/AnswerCarefully, name: v2.0, split: test, weight: 0.3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


class DataSource(BaseModel):
    """One data file / HF dataset and its mixing weight (relative; weights need not sum to 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    name: str | None = None  # HF dataset config name, e.g. "v2.0"
    split: str = "train"  # HF dataset split


def parse_weighted_paths(tokens: list[str] | str) -> list[DataSource]:
    """Parse ``["a.jsonl", "0.7", "b.jsonl", "0.3"]`` (or the same as one string).

    A lone path without a weight is allowed (weight 1). Anything else that is not
    path/weight pairs raises `ValueError` naming the offending token.
    """
    if isinstance(tokens, str):
        tokens = tokens.split()
    if len(tokens) == 1:
        return [DataSource(path=tokens[0])]
    if len(tokens) % 2:
        raise ValueError(
            f"--train-data/--valid-data takes 'PATH WEIGHT PATH WEIGHT ...' pairs; got {tokens}"
        )
    sources = []
    for path, weight in zip(tokens[::2], tokens[1::2], strict=True):
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(
                f"the weight after '{path}' must be a number, got '{weight}' "
                "(expected 'PATH WEIGHT PATH WEIGHT ...')"
            ) from None
        sources.append(DataSource(path=path, weight=value))
    return sources


def data_sources_from_config(value: Any) -> list[DataSource]:
    """Read sources from a YAML recipe value: a string / list of path-weight tokens, or a
    list of mappings with `path`, `weight`, `name`, `split`."""
    if isinstance(value, str):
        return parse_weighted_paths(value)
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [DataSource(**v) for v in value]
    if isinstance(value, list):
        return parse_weighted_paths([str(v) for v in value])
    raise ValueError(f"data sources must be a string or a list, got {type(value).__name__}")


def load_data_sources_yaml(path: str | Path, key: str = "train_data") -> list[DataSource]:
    """Load the `key` entry of a YAML file as data sources (see module docstring)."""
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if key not in config:
        raise ValueError(f"{path}: no '{key}' entry")
    return data_sources_from_config(config[key])
