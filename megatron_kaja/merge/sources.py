"""Where merge inputs come from: a `TensorSource` per model, opened lazily.

The merger never holds a whole model. It asks each source for one tensor at a time, by
its Hugging Face name (`model.layers.3.self_attn.q_proj.weight`), so every source speaks
HF names whatever its files look like. Two formats are registered: HF safetensors
folders and Megatron checkpoints (torch_dist or legacy, any TP/PP, read through the
converter's readers without writing HF first); others plug in through
`register_source_format`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megatron_kaja.checkpoint.convert import (
    mcore_global_as_hf,
    mcore_layer_as_hf,
    open_mcore_checkpoint,
)
from megatron_kaja.checkpoint.hf import TOKENIZER_FILES, hf_config_dict
from megatron_kaja.checkpoint.safetensors_io import SafetensorsFolder
from megatron_kaja.models.llama.state_dict import (
    GLOBAL_MAPPINGS,
    LAYER_MAPPINGS,
    all_hf_keys,
    hf_keys,
    hf_shapes,
)


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


class HFSafetensorsSource(SafetensorsFolder):
    """An HF checkpoint folder: `model.safetensors` or shards + `model.safetensors.index.json`.

    Only the headers are read up front; `get` reads one tensor with plain file reads
    (see `megatron_kaja.checkpoint.safetensors_io` for why not a memory map).
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.name = str(path)

    def hf_config(self) -> dict:
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config}: missing (every HF checkpoint has one)")
        return json.loads(config.read_text())

    def tokenizer_dir(self) -> Path | None:
        return self.path if any((self.path / f).is_file() for f in TOKENIZER_FILES) else None


class MegatronSource:
    """A Megatron checkpoint (torch_dist or legacy, any TP/PP) read as HF tensors.

    Goes through the converter's readers (`open_mcore_checkpoint`) and its key map. A
    decoder layer is stored fused (QKV in one tensor, gate and up in fc1, TP slices
    apart in legacy files), so `get` loads a whole layer, splits it into its HF tensors
    and keeps those until each is asked for or another layer is: a merge that asks layer
    by layer (any HF-ordered reference does) loads each layer once and holds at most one.

    The architecture comes from the checkpoint's `megatron_kaja.json`, else from
    `hf_template`'s config.json (checkpoints made by Megatron-LM); the template's
    tokenizer, if it has one, is the checkpoint's.
    """

    def __init__(self, path: str | Path, hf_template: Path | None = None):
        self.path = Path(path)
        self.name = str(path)
        self.template = Path(hf_template) if hf_template is not None else None
        self.reader = open_mcore_checkpoint(self.path, self.template)
        self.arch = self.reader.arch
        self._shapes = hf_shapes(self.arch)
        self._dtype = self.reader.stored_dtype()
        self._global_of = {hf_keys(m)[0]: m for m in GLOBAL_MAPPINGS}
        self._layer_of = {
            key: layer
            for layer in range(self.arch.num_layers)
            for mapping in LAYER_MAPPINGS
            for key in hf_keys(mapping, layer)
        }
        self._layer: int | None = None
        self._layer_tensors: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return all_hf_keys(self.arch)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def get(self, key: str) -> torch.Tensor:
        # Cloned: merges work in place on what they get, and these are views into the
        # reader's tensors (for legacy checkpoints, into its memory-mapped rank files).
        if key in self._global_of:
            return mcore_global_as_hf(self.reader, self._global_of[key])[1].clone()
        layer = self._layer_of[key]
        if layer != self._layer or key not in self._layer_tensors:
            self._layer_tensors = {}  # let the previous layer go before loading the next
            self._layer_tensors = mcore_layer_as_hf(self.reader, layer)
            self._layer = layer
        return self._layer_tensors.pop(key).clone()

    def hf_config(self) -> dict:
        dtype = str(self._dtype).removeprefix("torch.")
        return hf_config_dict(self.arch, dtype, self.template)

    def tokenizer_dir(self) -> Path | None:
        template = self.template
        if template is not None and any((template / f).is_file() for f in TOKENIZER_FILES):
            return template
        return None


# name -> (detect(path) -> bool, open(path, hf_template) -> TensorSource), tried in order.
_SOURCE_FORMATS: dict[
    str, tuple[Callable[[Path], bool], Callable[[Path, Path | None], TensorSource]]
] = {}

MEGATRON_SOURCE_FORMAT = "megatron"


def register_source_format(
    name: str,
    detect: Callable[[Path], bool],
    open_source: Callable[[Path, Path | None], TensorSource],
) -> None:
    """Teach `open_tensor_source` a checkpoint format. Later registrations are tried last.

    `open_source(path, hf_template)` gets the merge's `hf_template` (an HF folder that
    describes checkpoints carrying no architecture of their own, or None).
    """
    if name in _SOURCE_FORMATS:
        raise ValueError(f"source format {name!r} is already registered")
    _SOURCE_FORMATS[name] = (detect, open_source)


def _is_hf_safetensors(path: Path) -> bool:
    return (path / "model.safetensors.index.json").is_file() or (
        path / "model.safetensors"
    ).is_file()


def _is_megatron_checkpoint(path: Path) -> bool:
    # torch_dist: metadata.json + .metadata (+ .distcp); legacy: iter_*/mp_rank_* and the
    # tracker file. Detected loosely on purpose: a damaged checkpoint then gets the
    # reader's message naming what is missing, not "not a model folder".
    return (
        (path / "latest_checkpointed_iteration.txt").is_file()
        or (path / "metadata.json").is_file()
        or any(path.glob("*.distcp"))
        or any(path.glob("iter_*"))
    )


register_source_format(
    "hf-safetensors", _is_hf_safetensors, lambda path, hf_template: HFSafetensorsSource(path)
)
register_source_format(MEGATRON_SOURCE_FORMAT, _is_megatron_checkpoint, MegatronSource)


def open_tensor_source(path: str | Path, hf_template: str | Path | None = None) -> TensorSource:
    """Open a model folder with the first registered format that recognises it.

    `hf_template` describes Megatron checkpoints without `megatron_kaja.json`.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder does not exist")
    template = Path(hf_template) if hf_template is not None else None
    for detect, open_source in _SOURCE_FORMATS.values():
        if detect(path):
            return open_source(path, template)
    raise FileNotFoundError(
        f"{path}: not a model folder this tool can read (expected model.safetensors, "
        "model.safetensors.index.json or a Megatron checkpoint; .bin checkpoints are not "
        "supported)"
    )
