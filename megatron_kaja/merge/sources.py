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

    Only the headers are read up front. `get` reads one tensor's bytes with a plain file
    read into a fresh tensor rather than through a memory map (`safe_open`): pages of a
    mapped file that were touched stay in the process's resident set until unmapped, so
    streaming a whole checkpoint through a map shows up as RSS the size of the inputs.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{self.path}: no model.safetensors or model.safetensors.index.json"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        file_of: dict[str, str] = {}
        for file in files:
            if not (self.path / file).is_file():
                raise FileNotFoundError(f"{self.path / file}: shard named in the index is missing")
            header, self._data_start[file] = _read_safetensors_header(self.path / file)
            self._headers.update(header)
            file_of.update(dict.fromkeys(header, file))
        if weight_map is not None:
            for key, file in weight_map.items():
                if file_of.get(key) != file:
                    raise KeyError(f"{self.path / file}: lacks tensor {key} named in the index")
            file_of = {key: file_of[key] for key in weight_map}
        self._file_of = file_of

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
        file = self._file_of[key]
        begin, end = self._headers[key]["data_offsets"]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        if end == begin:
            return tensor
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        with open(self.path / file, "rb", buffering=0) as f:
            f.seek(self._data_start[file] + begin)
            done = 0
            while done < end - begin:  # one read() returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path / file}: truncated while reading {key}")
                done += n
        return tensor

    def hf_config(self) -> dict:
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config}: missing (every HF checkpoint has one)")
        return json.loads(config.read_text())

    def tokenizer_dir(self) -> Path | None:
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else None


def _read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors header and where the data starts."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


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
