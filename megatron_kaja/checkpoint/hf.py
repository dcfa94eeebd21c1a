"""HF checkpoints: a lazy safetensors reader and a streaming sharded safetensors writer.

Neither side holds the model: the reader opens shards lazily and hands out one tensor at
a time; the writer plans the shard layout from known shapes, then streams each tensor's
bytes into place, so peak memory is the tensor in flight (a 26 GB llm-jp-3-13b converts on
a 24 GiB machine).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_kaja.models.llama.config import LlamaArch

SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: missing files, tensors, or wrong shapes."""


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor entries of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    unknown = {e["dtype"] for e in header.values()} - set(_DTYPES_BY_CODE)
    if unknown:
        raise CheckpointError(f"{path}: unsupported tensor dtypes {sorted(unknown)}")
    return header, 8 + length


class HFCheckpointReader:
    """Lazy access to the tensors of an HF checkpoint folder (safetensors only)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"HF checkpoint folder {self.dir} does not exist")
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} has no config.json")
        self.arch = LlamaArch.from_hf_config(self.dir)
        self.config = json.loads((self.dir / "config.json").read_text(encoding="utf-8"))
        index = self.dir / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            header, _ = read_safetensors_header(self.dir / "model.safetensors")
            weight_map = dict.fromkeys(header, "model.safetensors")
        else:
            found = sorted(p.name for p in self.dir.iterdir())
            raise CheckpointError(
                f"{self.dir}: no model.safetensors or {SAFETENSORS_INDEX} "
                f"(only safetensors checkpoints are read; found {found})"
            )
        for name in sorted(set(weight_map.values())):
            if not (self.dir / name).is_file():
                raise CheckpointError(f"{self.dir}: shard {name} named in the index is missing")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[dict, int]] = {}

    def _header(self, filename: str) -> tuple[dict, int]:
        if filename not in self._headers:
            self._headers[filename] = read_safetensors_header(self.dir / filename)
        return self._headers[filename]

    def _entry(self, key: str) -> dict:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {key} is missing")
        header, _ = self._header(self.weight_map[key])
        if key not in header:
            raise CheckpointError(f"{self.dir / self.weight_map[key]}: tensor {key} is missing")
        return header[key]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> str:
        return self._entry(key)["dtype"]

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor with plain file reads.

        Not through a memory map: touched mapped pages count as resident memory, so mapping
        a 26 GB checkpoint would show (and pressure) gigabytes of RSS while streaming it.
        """
        entry = self._entry(key)
        filename = self.weight_map[key]
        _, data_start = self._header(filename)
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=_DTYPES_BY_CODE[entry["dtype"]])
        buffer = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
        with open(self.dir / filename, "rb") as f:
            f.seek(data_start + begin)
            if buffer is not None and f.readinto(memoryview(buffer)) != end - begin:
                raise CheckpointError(f"{self.dir / filename}: tensor {key} is truncated")
        return tensor

    def validate(self, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError naming missing, unexpected and misshapen tensors."""
        present = set(self.weight_map)
        missing = [k for k in expected_shapes if k not in present]
        # HF may store non-persistent buffers; rotary inv_freq is recomputed, not converted.
        unexpected = sorted(
            k for k in present - set(expected_shapes) if not k.endswith("rotary_emb.inv_freq")
        )
        problems = []
        if missing:
            problems.append(
                f"missing tensors: {', '.join(missing[:8])}" + (" ..." * (len(missing) > 8))
            )
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}")
        for key, shape in expected_shapes.items():
            if key in present and self.shape(key) != tuple(shape):
                problems.append(
                    f"tensor {key} has shape {self.shape(key)}, expected {tuple(shape)}"
                )
        if problems:
            raise CheckpointError(f"{self.dir}: " + "; ".join(problems))

    def close(self) -> None:
        self._headers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(
    tensors: list[PlannedTensor], max_shard_size: str | int
) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most `max_shard_size` bytes each."""
    limit = _parse_size(max_shard_size)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _safetensors_header(shard: list[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_streaming(
    out_dir: Path,
    planned: list[PlannedTensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_size: str | int = "5GB",
) -> dict[str, str]:
    """Write `tensors` (yielded in `planned` order) as sharded safetensors plus the index.

    Each tensor is written as soon as it is produced and then dropped. Returns the weight map.
    """
    shards = plan_shards(planned, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for shard, filename in zip(shards, names, strict=True):
        with open(out_dir / filename, "wb") as f:
            f.write(_safetensors_header(shard))
            for planned_tensor in shard:
                name, tensor = next(stream)
                if name != planned_tensor.name or tuple(tensor.shape) != planned_tensor.shape:
                    raise RuntimeError(
                        f"tensor {name} {tuple(tensor.shape)} arrived where "
                        f"{planned_tensor.name} {planned_tensor.shape} was planned"
                    )
                data = tensor.to(planned_tensor.dtype).contiguous().view(torch.uint8)
                f.write(memoryview(data.numpy()))
                weight_map[name] = filename
    if next(stream, None) is not None:
        raise RuntimeError("more tensors were produced than planned")
    total = sum(t.nbytes for t in planned)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return weight_map


def write_hf_metadata(
    out_dir: Path, arch: LlamaArch, dtype: str, template_dir: Path | None
) -> None:
    """config.json, generation_config.json and (from the template) tokenizer files."""
    config = arch.to_hf_config(dtype)
    if template_dir is not None and (template_dir / "config.json").is_file():
        # Keep the template's other fields (e.g. its exact transformers version, extra ids).
        template = json.loads((template_dir / "config.json").read_text(encoding="utf-8"))
        template.update({k: v for k, v in config.items() if k != "rope_theta"})
        if "rope_parameters" not in template:
            template["rope_theta"] = arch.rope_theta
        config = template
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
    }
    if template_dir is not None and (template_dir / "generation_config.json").is_file():
        shutil.copy2(template_dir / "generation_config.json", out_dir / "generation_config.json")
    else:
        (out_dir / "generation_config.json").write_text(
            json.dumps(generation, indent=2) + "\n", encoding="utf-8"
        )
    if template_dir is not None:
        for name in TOKENIZER_FILES:
            if (template_dir / name).is_file():
                shutil.copy2(template_dir / name, out_dir / name)
