"""megatron-core torch_dist checkpoints of llm-jp-3 weights, written and read tensor by tensor.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) whose keys are megatron's
sharded keys: global, TP-unsplit tensors, with decoder layers stacked on a leading axis
(`decoder.layers.self_attention.linear_qkv.weight` is `[num_layers, qkv, hidden]`), plus
`metadata.json` and `common.pt`. Any TP/PP layout loads it through
`megatron.core.dist_checkpointing.load`.

Writing goes through megatron's own translation of `ShardedTensor`s into DCP items, with
*meta* tensors as placeholders, and a save planner that builds each layer's tensor only when
the DCP writer asks for it (DCP's single-threaded writer resolves items one at a time), so
the whole model is never in memory. Reading asks megatron's loader for one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.safe_load import load_dcp_metadata, safe_filesystem_reader
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


@contextlib.contextmanager
def _process_group():
    """megatron's DCP translation asks for ranks: give a lone converter a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    from megatron_kaja.parallel.distributed import init_process_group

    init_process_group()
    try:
        yield
    finally:
        dist.destroy_process_group()


def _meta_sharded_state_dict(arch: LlamaArch, padded_vocab: int, dtype: torch.dtype):
    """megatron ShardedTensors for every weight, one per layer, with *meta* placeholders: the
    plan needs only shapes, and the real tensors are built when the writer asks for them."""
    from megatron.core.dist_checkpointing import ShardedTensor

    sharded = {}
    for mapping in GLOBAL_MAPPINGS:
        shape = global_shape(mapping, arch, padded_vocab)
        sharded[dist_key(mapping)] = ShardedTensor.from_rank_offsets(
            dist_key(mapping), torch.empty(shape, dtype=dtype, device="meta"), replica_id=0
        )
    num_layers = arch.num_layers
    for layer in range(num_layers):
        for mapping in LAYER_MAPPINGS:
            shape = global_shape(mapping, arch, padded_vocab)
            sharded[f"{dist_key(mapping)}.{layer}"] = ShardedTensor.from_rank_offsets(
                dist_key(mapping),
                torch.empty(shape, dtype=dtype, device="meta"),
                (0, layer, num_layers),
                replica_id=0,
                prepend_axis_num=1,
            )
    return sharded


def _extra_state_objects(arch: LlamaArch, transformer_impl: str) -> dict:
    """The per-layer `_extra_state` objects megatron's GPTModel checkpoints carry (None)."""
    from megatron.core.dist_checkpointing import ShardedObject

    objects = {}
    for module in LAYER_EXTRA_STATE_MODULES[transformer_impl]:
        key = f"decoder.layers.{module}._extra_state"
        for layer in range(arch.num_layers):
            obj = ShardedObject(key, None, (arch.num_layers,), (layer,), replica_id=0)
            objects[obj.unique_key] = obj
    return objects


def write_torch_dist(
    out_dir: Path,
    arch: LlamaArch,
    padded_vocab: int,
    dtype: torch.dtype,
    global_tensor: GlobalTensorFn,
    transformer_impl: str = "local",
    common: dict | None = None,
) -> None:
    """Write a torch_dist checkpoint whose tensors come from `global_tensor`, one at a time."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    by_key = {dist_key(m): m for m in (*GLOBAL_MAPPINGS, *LAYER_MAPPINGS)}

    class LazyGlobalTensorPlanner(MCoreSavePlanner):
        """Builds each tensor when the writer reaches it, instead of holding them all."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            mapping = by_key[write_item.index.fqn]
            layer = write_item.index.offset[0] if mapping in LAYER_MAPPINGS else None
            tensor = global_tensor(mapping, layer)
            if mapping in LAYER_MAPPINGS:
                tensor = tensor.unsqueeze(0)
            expected = tuple(write_item.tensor_data.chunk.sizes)
            if tuple(tensor.shape) != expected:
                raise RuntimeError(f"{mapping.te}: built {tuple(tensor.shape)}, planned {expected}")
            return tensor.to(dtype).contiguous()

    sharded = _meta_sharded_state_dict(arch, padded_vocab, dtype)
    sharded.update(_extra_state_objects(arch, transformer_impl))
    grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _process_group():
        pyt_state_dict = mcore_to_pyt_state_dict(grouped, is_loading=False)
        dcp.save(
            pyt_state_dict,
            storage_writer=dcp.FileSystemWriter(out_dir, thread_count=1, single_file_per_rank=True),
            planner=LazyGlobalTensorPlanner(can_run_decentralized_global_plan=False),
        )
    torch.save(common or {}, out_dir / COMMON_STATE_FNAME)
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(out_dir))


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
        # Bytes each data file must hold, so a missing or truncated .distcp file is reported
        # when the checkpoint is opened rather than when its tensors are first read.
        self.file_sizes: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = info.offset + info.length
            self.file_sizes[info.relative_path] = max(
                self.file_sizes.get(info.relative_path, 0), end
            )
        if dist_key(GLOBAL_MAPPINGS[0]) not in self.shapes:
            raise CheckpointError(f"{self.dir}: no {dist_key(GLOBAL_MAPPINGS[0])} tensor")
        self.padded_vocab = self.shapes[dist_key(GLOBAL_MAPPINGS[0])][0]

    def validate(self) -> None:
        """Raise CheckpointError naming missing or truncated files, missing or misshapen
        tensors."""
        problems = []
        for name, size in sorted(self.file_sizes.items()):
            path = self.dir / name
            if not path.is_file():
                problems.append(f"data file {name} is missing")
            elif path.stat().st_size < size:
                problems.append(
                    f"data file {name} is truncated ({path.stat().st_size} of {size} bytes)"
                )
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
