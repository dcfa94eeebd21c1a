"""megatron-core torch_dist checkpoints of llm-jp-3 weights, written and read tensor by tensor.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are megatron's
sharded keys: global, TP-unsplit tensors, with decoder layers stacked on a leading axis
(`decoder.layers.self_attention.linear_qkv.weight` is `[num_layers, qkv, hidden]`), plus
`metadata.json` and `common.pt`. Any TP/PP layout loads it through
`megatron.core.dist_checkpointing.load`.

Writing plans the DCP items from shapes alone, exactly as megatron-core's torch_dist
strategy would lay out this model's sharded state dict; DCP writes the archives with their
data bytes skipped, and each tensor's bytes are then filled in, copied file to file from the
source (`byte_copy`) or from one tensor built at a time, so the whole model is never in
memory. Reading loads one layer's regions at a time through DCP, with the metadata read by
the restricted unpickler of `safe_load`, or hands out where a stored chunk's bytes lie.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.byte_copy import (
    ByteSource,
    StoredTensor,
    copy_sources,
    start_writeback,
    torch_save_data_offset,
)
from megatron_kaja.checkpoint.safe_load import (
    check_data_files,
    load_dcp_metadata,
    safe_filesystem_reader,
)
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.state_dict import (
    GLOBAL_MAPPINGS,
    LAYER_EXTRA_STATE_MODULES,
    LAYER_MAPPINGS,
    TensorMapping,
    dist_key,
    global_shape,
)

# (mapping, layer or None) -> the global tensor, in the dtype to store
GlobalTensorFn = Callable[[TensorMapping, "int | None"], torch.Tensor]
# (mapping, layer or None) -> the global tensor's bytes as ranges of source files, or None
GlobalSourcesFn = Callable[[TensorMapping, "int | None"], "list[ByteSource] | None"]


# megatron-core's metadata.json for a torch_dist checkpoint (dist_checkpointing.core.save_config)
TORCH_DIST_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def _write_plan(arch: LlamaArch, padded_vocab: int, dtype: torch.dtype, transformer_impl: str):
    """DCP write items for every tensor and `_extra_state` object, in the order an HF
    checkpoint stores them (the single-file writer writes in plan order, so the HF files are
    read front to back).

    Keys, chunks and byte items are what megatron-core's torch_dist strategy makes of a
    GPTModel's sharded state dict: a layer tensor is one chunk `[1, ...]` at offset
    `(layer, 0, ...)` of a `[num_layers, ...]` global tensor; an `_extra_state` object is a
    byte item `KEY/shard_{layer}_{num_layers}` (ShardedObject.unique_key).
    """
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    def tensor_item(key: str, offsets: tuple, sizes: tuple, global_size: tuple) -> WriteItem:
        return WriteItem(
            index=MetadataIndex(key, torch.Size(offsets)),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                properties=TensorProperties(dtype=dtype),
                size=torch.Size(global_size),
            ),
        )

    def global_item(mapping: TensorMapping) -> WriteItem:
        shape = global_shape(mapping, arch, padded_vocab)
        return tensor_item(dist_key(mapping), (0,) * len(shape), shape, shape)

    n = arch.num_layers
    items = [global_item(GLOBAL_MAPPINGS[0])]
    for layer in range(n):
        for mapping in LAYER_MAPPINGS:
            shape = global_shape(mapping, arch, padded_vocab)
            offsets = (layer,) + (0,) * len(shape)
            items.append(tensor_item(dist_key(mapping), offsets, (1, *shape), (n, *shape)))
    items += [global_item(m) for m in GLOBAL_MAPPINGS[1:]]
    for module in LAYER_EXTRA_STATE_MODULES[transformer_impl]:
        for layer in range(n):
            key = f"decoder.layers.{module}._extra_state/shard_{layer}_{n}"
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
    return items


def write_torch_dist(
    out_dir: Path,
    arch: LlamaArch,
    padded_vocab: int,
    dtype: torch.dtype,
    global_tensor: GlobalTensorFn,
    transformer_impl: str = "local",
    common: dict | None = None,
    global_sources: GlobalSourcesFn | None = None,
) -> None:
    """Write a torch_dist checkpoint whose tensors come from `global_tensor`, one at a time.

    Goes through torch's DCP writer directly (no megatron-core import, no process group:
    both cost seconds before the first byte moves); what it writes is what megatron-core
    writes for this model, which the tests check by loading it with
    `megatron.core.dist_checkpointing.load`.

    DCP writes each tensor as a `torch.save` archive; it is asked to leave each archive's
    data bytes as a hole (`torch.serialization.skip_data`), which are then filled in place:
    by a kernel file-to-file copy where `global_sources` gives the tensor as byte ranges of
    the source files, else with the bytes of `global_tensor`'s result. So no tensor is
    built (or checksummed) only to be copied, and the archives are what `torch.save` writes
    (their data records carry no CRC, which `torch.load` does not check).
    """
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

    by_key = {dist_key(m): m for m in (*GLOBAL_MAPPINGS, *LAYER_MAPPINGS)}
    items = _write_plan(arch, padded_vocab, dtype, transformer_impl)

    class PlaceholderPlanner(DefaultSavePlanner):
        """Plans from shapes alone; hands DCP untouched tensors (no page is ever written:
        their bytes are skipped, then filled in below)."""

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                # megatron-core stores a list of the objects' data; the local spec's is None
                torch.save([None], buffer)
                return buffer
            return torch.empty(write_item.tensor_data.chunk.sizes, dtype=dtype)

    class SeekableItemStream(io.RawIOBase):
        """DCP's per-item stream without extensions, but seekable: `skip_data` leaves a
        tensor's bytes as a hole by seeking past them (DCP's own wrapper cannot seek)."""

        def __init__(self, raw):
            super().__init__()
            self.raw = raw

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            return self.raw.write(b)

        def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
            return self.raw.seek(pos, whence)

        def tell(self) -> int:
            return self.raw.tell()

        def close(self) -> None:
            self.raw.flush()  # the file itself stays open for the next item

    class NoExtensions:
        def transform_save_stream(self, write_item, raw_stream):
            return SeekableItemStream(raw_stream), []

    writer = dcp.FileSystemWriter(out_dir, thread_count=1, single_file_per_rank=True)
    if not hasattr(writer, "transforms"):
        raise RuntimeError("this torch's FileSystemWriter has no item stream transforms")
    writer.transforms = NoExtensions()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.serialization.skip_data():
        metadata = dcp.save(
            {},
            storage_writer=writer,
            planner=PlaceholderPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            no_dist=True,
        )
    _fill_tensor_data(out_dir, metadata, by_key, dtype, global_tensor, global_sources)
    torch.save(common or {}, out_dir / "common.pt")
    (out_dir / "metadata.json").write_text(json.dumps(TORCH_DIST_CONFIG), encoding="utf-8")


def _fill_tensor_data(out_dir, metadata, by_key, dtype, global_tensor, global_sources) -> None:
    """Fill each tensor archive's skipped data bytes, in file order (so the sources are read
    front to back), then fsync each data file once."""
    items = sorted(
        (info.relative_path, info.offset, info.length, index)
        for index, info in metadata.storage_data.items()
        if index.fqn in by_key
    )
    fds: dict[str, int] = {}
    try:
        for name, offset, length, index in items:
            if name not in fds:
                fds[name] = os.open(out_dir / name, os.O_WRONLY)
            mapping = by_key[index.fqn]
            layer = index.offset[0] if mapping in LAYER_MAPPINGS else None
            data_at, placeholder = torch_save_data_offset(out_dir / name, offset, length)
            sources = global_sources(mapping, layer) if global_sources is not None else None
            if sources is not None and sum(s.length for s in sources) == placeholder.nbytes:
                start_writeback(fds[name], data_at, copy_sources(fds[name], data_at, sources))
                continue
            tensor = global_tensor(mapping, layer)
            if mapping in LAYER_MAPPINGS:
                tensor = tensor.unsqueeze(0)
            if tensor.shape != placeholder.shape:
                raise RuntimeError(
                    f"{mapping.te}: built {tuple(tensor.shape)}, planned {tuple(placeholder.shape)}"
                )
            data = tensor.to(dtype).contiguous().view(-1).view(torch.uint8).numpy()
            view, done = memoryview(data), 0
            while done < len(view):
                done += os.pwrite(fds[name], view[done:], data_at + done)
            start_writeback(fds[name], data_at, done)
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)


class TorchDistReader:
    """Reads the global tensors of an llm-jp-3 torch_dist checkpoint one layer at a time."""

    def __init__(self, ckpt_dir: Path, arch: LlamaArch):
        self.dir = Path(ckpt_dir)
        self.arch = arch
        metadata = load_dcp_metadata(self.dir)
        self.shapes = {
            k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")
        }
        self.dtypes = {
            k: v.properties.dtype
            for k, v in metadata.state_dict_metadata.items()
            if hasattr(v, "properties")
        }
        self._metadata = metadata
        if dist_key(GLOBAL_MAPPINGS[0]) not in self.shapes:
            raise CheckpointError(f"{self.dir}: no {dist_key(GLOBAL_MAPPINGS[0])} tensor")
        self.padded_vocab = self.shapes[dist_key(GLOBAL_MAPPINGS[0])][0]

    def validate(self) -> None:
        """Raise CheckpointError naming missing or truncated files, missing or misshapen
        tensors."""
        check_data_files(self.dir, self._metadata)
        problems = []
        for mapping in (*GLOBAL_MAPPINGS, *LAYER_MAPPINGS):
            key = dist_key(mapping)
            shape = global_shape(mapping, self.arch, self.padded_vocab)
            if mapping in LAYER_MAPPINGS:
                shape = (self.arch.num_layers, *shape)
            if key not in self.shapes:
                problems.append(f"tensor {key} is missing")
            elif self.shapes[key] != shape:
                problems.append(f"tensor {key} has shape {self.shapes[key]}, expected {shape}")
        if problems:
            raise CheckpointError(f"{self.dir}: " + "; ".join(problems))

    def _load_regions(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        """Load `{key: (offsets, sizes)}` regions of global tensors through DCP's reader."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class RegionLoadPlanner(DefaultLoadPlanner):
            """Reads one region of each tensor, from however the checkpoint chunked it."""

            def create_local_plan(self):
                items = []
                for key, (offsets, sizes) in regions.items():
                    chunk = ChunkStorageMetadata(
                        offsets=torch.Size(offsets), sizes=torch.Size(sizes)
                    )
                    md = self.metadata.state_dict_metadata[key]
                    items += create_read_items_for_chunk_list(key, md, [chunk])
                return LoadPlan(items)

            def resolve_tensor(self, read_item):
                target = self.state_dict[read_item.dest_index.fqn]
                for dim, (start, length) in enumerate(
                    zip(read_item.dest_offsets, read_item.lengths, strict=True)
                ):
                    target = target.narrow(dim, start, length)
                return target

        out = {
            key: torch.empty(sizes, dtype=self.dtypes[key]) for key, (_, sizes) in regions.items()
        }
        dcp.load(
            out,
            storage_reader=safe_filesystem_reader(self.dir),
            planner=RegionLoadPlanner(),
            no_dist=True,
        )
        return out

    def load_global(self, mapping: TensorMapping) -> torch.Tensor:
        """Embedding, final norm or output layer."""
        key = dist_key(mapping)
        shape = self.shapes[key]
        return self._load_regions({key: ((0,) * len(shape), shape)})[key]

    def stored_tensor(self, mapping: TensorMapping, layer: int | None = None):
        """Where the global tensor of `mapping` (one layer's, for a layer tensor) lies as raw
        bytes, when the checkpoint stores it as exactly one contiguous chunk (as this
        project and megatron-core at TP=1 write it); None otherwise (read it with
        `load_global` / `load_layer`)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        key = dist_key(mapping)
        shape = self.shapes[key]
        if layer is None:
            offsets, sizes = (0,) * len(shape), shape
        else:
            offsets, sizes = (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])
        chunks = self._metadata.state_dict_metadata[key].chunks
        if not any(tuple(c.offsets) == offsets and tuple(c.sizes) == sizes for c in chunks):
            return None
        info = self._metadata.storage_data.get(MetadataIndex(key, torch.Size(offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        path = self.dir / info.relative_path
        data_at, tensor = torch_save_data_offset(path, info.offset, info.length)
        if (
            tuple(tensor.shape) != sizes
            or tensor.dtype != self.dtypes[key]
            or not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or tensor.untyped_storage().nbytes() != tensor.nbytes
        ):
            return None
        return StoredTensor(
            path, data_at, tuple(sizes[1:] if layer is not None else sizes), tensor.dtype
        )

    def stored_dtype(self) -> torch.dtype:
        return self.dtypes[dist_key(LAYER_MAPPINGS[0])]

    def load_layer(self, layer: int) -> dict[TensorMapping, torch.Tensor]:
        """The global tensors of decoder layer `layer`."""
        regions = {}
        for mapping in LAYER_MAPPINGS:
            shape = self.shapes[dist_key(mapping)]
            regions[dist_key(mapping)] = ((layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))
        loaded = self._load_regions(regions)
        return {m: loaded[dist_key(m)][0] for m in LAYER_MAPPINGS}
