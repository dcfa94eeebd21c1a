"""Safetensors files read and written one tensor at a time, never a whole model in memory.

Used by the converter (HF side), the merge tool's HF inputs and its output.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}} (plus an optional
`__metadata__`), padded with spaces to a multiple of 8 bytes, then the tensors' raw
little-endian bytes in header order. A sharded checkpoint adds
`model.safetensors.index.json` mapping each tensor to its file.

Reading: only headers are read up front; `get` reads one tensor's bytes with a plain file
read into a fresh tensor, not through a memory map (`safe_open`): touched pages of a
mapped file count as resident memory until unmapped, so streaming a 26 GB checkpoint
through a map shows (and pressures) RSS the size of the checkpoint.

Writing: every tensor's name, shape and dtype are known before any is computed, so the
shard layout and each file's header are written first and each tensor's bytes go
straight to disk as it is produced. Nothing accumulates (a writer that fills a shard
before saving holds up to a shard's worth of tensors).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.byte_copy import (
    ByteSource,
    StoredTensor,
    copy_sources,
    start_writeback,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# torch dtype <-> the safetensors header's dtype code
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors file and the byte offset where its data starts.

    Checks the header against itself and the file's size (every entry's dtype, shape and
    byte range, and that the file holds all the bytes the header promises), so a
    truncated or garbled file is named when a folder is opened, not when its last tensor
    is read.
    """
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors header (it claims {length} bytes, "
                f"the file holds {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_end = 0
    for name, entry in header.items():
        problem = _header_entry_problem(entry)
        if problem:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} {problem}")
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + length + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: its header places tensor data up to byte "
            f"{8 + length + data_end}, the file holds {size}"
        )
    return header, 8 + length


def _header_entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "lacks dtype, shape or data_offsets"
    if entry["dtype"] not in DTYPES_BY_CODE:
        return f"has unsupported dtype {entry['dtype']!r}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"has shape {shape!r}"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {offsets!r}"
    nbytes = math.prod(shape) * DTYPES_BY_CODE[entry["dtype"]].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return f"spans {offsets[1] - offsets[0]} bytes, its shape and dtype need {nbytes}"
    return None


def read_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor (`entry` from its file's header) read with plain file reads."""
    begin, end = entry["data_offsets"]
    tensor = torch.empty(entry["shape"], dtype=DTYPES_BY_CODE[entry["dtype"]])
    if end == begin:
        return tensor
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        done = 0
        while done < end - begin:  # one read() returns at most ~2 GiB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{path}: truncated while reading a tensor")
            done += n
    return tensor


class SafetensorsFolder:
    """The tensors of a folder holding `model.safetensors` or shards + the index.

    Reads every shard's header when opened (a few KB each) and checks them against the
    index, so a missing shard or tensor is reported before any tensor is read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {SAFETENSORS_INDEX} "
                f"(only safetensors checkpoints are read; found {found})"
            )
        self._entries: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        file_of: dict[str, str] = {}
        for file in files:
            if not (self.path / file).is_file():
                raise CheckpointError(f"{self.path}: shard {file} named in the index is missing")
            header, self._data_start[file] = read_safetensors_header(self.path / file)
            self._entries.update(header)
            file_of.update(dict.fromkeys(header, file))
        if weight_map is not None:
            for key, file in weight_map.items():
                if file_of.get(key) != file:
                    raise CheckpointError(
                        f"{self.path / file}: lacks tensor {key} named in the index"
                    )
            file_of = {key: file_of[key] for key in weight_map}
        self._file_of = file_of

    def _entry(self, key: str) -> dict:
        if key not in self._file_of:
            raise CheckpointError(f"{self.path}: tensor {key} is missing")
        return self._entries[key]

    def file_of(self, key: str) -> Path:
        """The file that holds `key` (for error messages)."""
        self._entry(key)
        return self.path / self._file_of[key]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES_BY_CODE[self._entry(key)["dtype"]]

    def stored(self, key: str) -> StoredTensor:
        """Where `key`'s raw bytes lie (for file-to-file copies)."""
        entry = self._entry(key)
        file = self._file_of[key]
        return StoredTensor(
            self.path / file,
            self._data_start[file] + entry["data_offsets"][0],
            tuple(entry["shape"]),
            DTYPES_BY_CODE[entry["dtype"]],
        )

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor holding `key` (the caller owns it)."""
        entry = self._entry(key)
        file = self._file_of[key]
        try:
            return read_tensor(self.path / file, self._data_start[file], entry)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} ({key})") from None


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of one tensor to write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1234 -> bytes (KB, MB, GB, TB decimal, as HF's
    `max_shard_size`; KiB, MiB, GiB binary)."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    units |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():  # "B" last: every unit ends with it
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(shard: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Writes `specs` into `out_dir` as safetensors shards plus the index, as HF names
    them: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`.

    Call `write(name, tensor)` once per tensor, in the order of `specs`, then `close()`.
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_size: str | int = "5GB"):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(specs, parse_size(max_shard_size))
        n = len(self.shards)
        self.file_names = (
            [SINGLE_FILE]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._open_shard: int | None = None
        self._file = None

    def _start_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.out_dir / self.file_names[index], "wb")  # noqa: SIM115
        self._file.write(_header_bytes(self.shards[index]))
        self._open_shard = index

    def _next_spec(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
        if self._next == len(self._queue):
            raise ValueError(f"writer expected no more tensors, got {name}")
        shard, spec = self._queue[self._next]
        if (name, shape, dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, got {name} {shape} {dtype}"
            )
        if shard != self._open_shard:
            self._start_shard(shard)
        self._next += 1
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, shape and dtype must match the plan."""
        self._next_spec(name, tuple(tensor.shape), tensor.dtype)
        # A flat byte view of the tensor: no copy for contiguous tensors (bf16 included).
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))

    def write_sources(self, name: str, spec_like: TensorSpec, sources: list[ByteSource]) -> None:
        """Append the next tensor as byte ranges of other files, copied file to file by the
        kernel (see `byte_copy`); `spec_like` gives its shape and dtype."""
        spec = self._next_spec(name, spec_like.shape, spec_like.dtype)
        if sum(s.length for s in sources) != spec.nbytes:
            raise ValueError(f"{name}: byte sources do not add up to {spec.nbytes} bytes")
        self._file.flush()
        at = self._file.tell()
        start_writeback(self._file.fileno(), at, copy_sources(self._file.fileno(), at, sources))
        self._file.seek(at + spec.nbytes)

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; all tensors must have been written.
        Returns the weight map."""
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map = {
            spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard
        }
        total = sum(spec.nbytes for _, spec in self._queue)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / SAFETENSORS_INDEX).write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
        return weight_map


def write_safetensors_streaming(
    out_dir: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor | list[ByteSource]]],
    max_shard_size: str | int = "5GB",
) -> dict[str, str]:
    """Write `tensors` (yielded in `specs` order, each dropped once written) as sharded
    safetensors plus the index. A tensor may come as a list of byte ranges of other files
    instead (copied by the kernel). Returns the weight map."""
    writer = ShardedSafetensorsWriter(out_dir, specs, max_shard_size)
    by_name = {spec.name: spec for spec in specs}
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            writer.write(name, tensor)
        else:
            if name not in by_name:
                raise ValueError(f"writer expected no tensor named {name}")
            writer.write_sources(name, by_name[name], tensor)
    return writer.close()
