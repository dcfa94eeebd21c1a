"""Stream tensors into sharded safetensors files, one tensor in memory at a time.

Every output tensor's name, shape and dtype are known before any is computed, so the
shard layout and each file's header can be written first; each tensor's bytes then go
straight to disk as it is produced. Nothing accumulates in memory (a writer that fills
a shard before saving holds up to a shard's worth of merged tensors).

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, padded with spaces to a
multiple of 8 bytes, then the tensors' raw little-endian bytes in header order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPE_NAMES = {
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

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedSafetensorsWriter:
    """Writes `specs` into `out_dir` as `model-0000i-of-0000n.safetensors` + index.

    Call `write(name, tensor)` once per tensor, in the order of `specs`, then `close()`.
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._open_shard: int | None = None
        self._file = None

    def _start_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.out_dir / self.file_names[index], "wb")  # noqa: SIM115
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._open_shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, shape and dtype must match the plan."""
        shard, spec = self._queue[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise ValueError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._open_shard:
            self._start_shard(shard)
        # A flat byte view of the tensor: no copy for contiguous tensors (bf16 included).
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and write the index; all tensors must have been written."""
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map = {
            spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard
        }
        total = sum(spec.nbytes for shard in self.shards for spec in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / 1234 -> bytes (decimal units, as HF's max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)
