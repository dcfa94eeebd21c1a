"""Where merge inputs come from: a `TensorSource` per model, opened lazily.

The merger never holds a whole model. It asks each source for one tensor at a time, by
its Hugging Face name (`model.layers.3.self_attn.q_proj.weight`), so every source speaks
HF names whatever its files look like. A source for another format (the Megatron
checkpoint reader from `megatron_kaja.checkpoint`) plugs in through
`register_source_format`; see `MEGATRON_SOURCE_FORMAT` below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# Files that make up an HF tokenizer; whichever exist are compared and copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)

# A file's name to the dtype torch reads it as (safetensors' header spelling).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@runtime_checkable
class TensorSource(Protocol):
    """One input model, read lazily. Keys are HF parameter names.

    `hf_config()` is the model's HF `config.json` as a dict (a Megatron reader derives it
    from its checkpoint args); `tokenizer_dir()` is a folder holding the tokenizer files,
    or None when the checkpoint carries none.
    """

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get(self, key: str) -> torch.Tensor: ...

    def hf_config(self) -> dict: ...

    def tokenizer_dir(self) -> Path | None: ...


class HFSafetensorsSource:
    """An HF checkpoint folder: `model.safetensors` or shards + `model.safetensors.index.json`.

    Files are opened with `safe_open` on first use and kept open (memory-mapped), so a
    `get` reads only the bytes of that one tensor; shapes and dtypes come from the headers.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.name = str(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json"
            )
        self._file_of = weight_map
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        for file in sorted(set(weight_map.values())):
            if not (self.path / file).is_file():
                raise FileNotFoundError(f"{self.path / file}: shard named in the index is missing")
            self._headers.update(_read_safetensors_header(self.path / file))
        for key, file in weight_map.items():
            if key not in self._headers:
                raise KeyError(f"{self.path / file}: tensor {key} is in the index but not the file")

    def file_of(self, key: str) -> Path:
        """The shard file that holds `key` (for error messages)."""
        return self.path / self._file_of[key]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._headers[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._headers[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._file_of[key]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file].get_tensor(key)

    def hf_config(self) -> dict:
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config}: missing (every HF checkpoint has one)")
        return json.loads(config.read_text())

    def tokenizer_dir(self) -> Path | None:
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else None


def _read_safetensors_header(file: Path) -> dict:
    """The tensor entries of a safetensors header, read without touching the data."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


# name -> (detect(path) -> bool, open(path) -> TensorSource), tried in insertion order.
_SOURCE_FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], TensorSource]]] = {}

# The name under which the Megatron checkpoint reader registers itself. It is pending:
# `megatron_kaja.checkpoint` (the converter) provides the reader; until it calls
# `register_source_format(MEGATRON_SOURCE_FORMAT, ...)`, Megatron folders are refused
# with a message saying so.
MEGATRON_SOURCE_FORMAT = "megatron"


def register_source_format(
    name: str, detect: Callable[[Path], bool], open_source: Callable[[Path], TensorSource]
) -> None:
    """Teach `open_tensor_source` a checkpoint format. Later registrations are tried last."""
    if name in _SOURCE_FORMATS:
        raise ValueError(f"source format {name!r} is already registered")
    _SOURCE_FORMATS[name] = (detect, open_source)


def _is_hf_safetensors(path: Path) -> bool:
    return (path / "model.safetensors.index.json").is_file() or (
        path / "model.safetensors"
    ).is_file()


def _looks_like_megatron(path: Path) -> bool:
    # torch_dist checkpoints have metadata.json + .distcp; legacy ones iter_*/mp_rank_*.
    return (
        (path / "latest_checkpointed_iteration.txt").is_file()
        or ((path / "metadata.json").is_file() and any(path.glob("*.distcp")))
        or any(path.glob("iter_*"))
    )


register_source_format("hf-safetensors", _is_hf_safetensors, HFSafetensorsSource)


def open_tensor_source(path: str | Path) -> TensorSource:
    """Open a model folder with the first registered format that recognises it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder does not exist")
    for detect, open_source in _SOURCE_FORMATS.values():
        if detect(path):
            return open_source(path)
    if _looks_like_megatron(path):
        raise NotImplementedError(
            f"{path}: looks like a Megatron checkpoint, but no reader is registered as "
            f"'{MEGATRON_SOURCE_FORMAT}' yet; convert it to HF first with "
            "tools/convert_checkpoint.py"
        )
    raise FileNotFoundError(
        f"{path}: not a model folder this tool can read (expected model.safetensors or "
        "model.safetensors.index.json; .bin checkpoints are not supported)"
    )
