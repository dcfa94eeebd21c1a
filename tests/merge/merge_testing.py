"""Helpers for the merge tests: read all tensors of a folder, write altered copies, load
the command-line tool."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_kaja.merge.evaluation import REPO_ROOT


def load_merge_cli():
    """`tools/merge_models.py` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "merge_models_cli", REPO_ROOT / "tools" / "merge_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors folder (all shards)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_altered_copy(
    src: Path,
    dst: Path,
    alter: Callable[[str, torch.Tensor], torch.Tensor | None] = lambda name, t: t,
) -> Path:
    """Copy an HF folder's non-weight files and write its tensors, each passed through
    `alter` (None drops the tensor), as one `model.safetensors`."""
    dst.mkdir(parents=True)
    for file in Path(src).iterdir():
        if not file.name.startswith("model"):
            shutil.copy2(file, dst / file.name)
    tensors = {}
    for name, tensor in load_tensors(src).items():
        altered = alter(name, tensor)
        if altered is not None:
            tensors[name] = altered.contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
