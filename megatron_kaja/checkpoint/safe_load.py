"""Reading checkpoint files from anywhere without running code from them.

A checkpoint is untrusted input: each of its pickles can name any callable, and unpickling
calls it. Every pickle we read goes through an allowlist:

* torch files (`common.pt`, legacy `model_optim_rng.pt`, byte items inside `.distcp` files)
  load with `torch.load(weights_only=True)`, which admits tensors and plain containers.
  Megatron-LM's own files also hold an `argparse.Namespace` of arguments with megatron enums
  (`AttnBackend`, `ModelType`, `signal.Signals`, ...) and numpy RNG state; those classes are
  admitted exactly as megatron-core lists them (`megatron/core/safe_globals.py`).
* torch_dist's `.metadata` is a plain pickle (torch's own reader calls `pickle.load` on it):
  it is read with an unpickler that admits only the classes DCP metadata is made of.

A file that names anything else is refused with a `CheckpointError` naming the file and the
class, before anything it names is imported or called.
"""

from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that names a class or function outside the allowlist."""


# Enough for what this project writes (args Namespace, dtypes); megatron-core's list is
# added only when a file needs it, because importing megatron-core costs seconds.
_BASE_GLOBALS = [argparse.Namespace]


def megatron_safe_globals() -> list:
    """The classes megatron-core admits in its checkpoints (megatron/core/safe_globals.py)."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    return [*_BASE_GLOBALS, *SAFE_GLOBALS]


def _allowing(classes: list):
    """torch's allowlist extended with `classes` for the block. torch's own `safe_globals`
    removes its classes on exit even when they were registered before (megatron-core registers
    its list at import), which would break megatron-core's later loads in this process: only
    the classes not yet allowed are added and removed."""
    registered = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([c for c in classes if c not in registered])


def torch_load_safe(source: str | Path | bytes, what: str, *, mmap: bool = False):
    """`torch.load(weights_only=True)` with megatron-core's allowlist; `what` names the file
    (or the item) in the error when it holds anything else."""
    last_error = None
    for allowed in (lambda: _BASE_GLOBALS, megatron_safe_globals):
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        try:
            with _allowing(allowed()):
                return torch.load(stream, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            last_error = exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{what}: unreadable ({str(exc).splitlines()[0]})") from None
    detail = str(last_error).splitlines()
    named = next((line.strip() for line in detail if "Unsupported global" in line), detail[0])
    raise UnsafeCheckpointError(f"{what}: refused to load: {named} (not allowed in a checkpoint)")


# (module, name) pairs a DCP `.metadata` pickle may name: the metadata dataclasses, torch's
# Size / dtypes / layout decoder, and the path type of `storage_meta.checkpoint_id`.
_DCP_METADATA_GLOBALS = (
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        # `all_local_plans`: each rank's save plan, kept by newer torch for a later save
        ("torch.distributed.checkpoint.planner", name)
        for name in (
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "BytesIOWriteData",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }
)


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to load: it names {module}.{name}, which torch_dist "
            "metadata never holds"
        )


def load_dcp_metadata(ckpt_dir: str | Path):
    """The DCP `Metadata` of a torch_dist checkpoint, read with the restricted unpickler."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(f, path).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a truncated or garbled pickle: any error, one message
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def safe_filesystem_reader(ckpt_dir: str | Path):
    """A DCP FileSystemReader whose metadata goes through the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = load_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(ckpt_dir))


def load_common_state(ckpt_dir: str | Path) -> dict:
    """A torch_dist checkpoint's `common.pt` (args, iteration, ...), loaded safely."""
    path = Path(ckpt_dir) / "common.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    common = torch_load_safe(path, str(path))
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: holds a {type(common).__name__}, not a dict")
    return common


def check_data_files(ckpt_dir: Path, metadata) -> None:
    """Raise CheckpointError naming every `.distcp` file that is missing or shorter than the
    metadata says, before any of them is read."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    problems = []
    for name, size in sorted(needed.items()):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            problems.append(f"data file {name} is missing")
        elif path.stat().st_size < size:
            problems.append(
                f"data file {name} is truncated ({path.stat().st_size} of {size} bytes)"
            )
    if problems:
        raise CheckpointError(f"{ckpt_dir}: " + "; ".join(problems))


def vet_torch_dist(ckpt_dir: str | Path) -> None:
    """Check that nothing megatron-core's loader will unpickle from `ckpt_dir` names code.

    megatron-core (through torch's DCP reader) unpickles `.metadata` with plain `pickle`,
    `common.pt` with torch's default and each byte item (RNG state, `_extra_state`) with
    `weights_only=False`. This reads each of them first through the allowlists above, so a
    planted file is refused here instead of run there.
    """
    ckpt_dir = Path(ckpt_dir)
    metadata = load_dcp_metadata(ckpt_dir)
    check_data_files(ckpt_dir, metadata)
    load_common_state(ckpt_dir)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {
        key
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, BytesStorageMetadata)
    }
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_keys:
            continue
        path = ckpt_dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{path}: truncated (item {index.fqn})")
        torch_load_safe(data, f"{path} (item {index.fqn})")


def safe_globals_context():
    """torch's allowlist extended with megatron-core's classes, for loads megatron-core
    makes itself (common.pt), after `vet_torch_dist` has checked the folder."""
    return _allowing(megatron_safe_globals())
