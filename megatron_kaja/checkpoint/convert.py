"""HF <-> megatron-core conversion of llm-jp-3 checkpoints, streamed tensor by tensor.

Conversion never builds the model: it maps tensors with the declarative key map in
`megatron_kaja.models.llama.state_dict`. Everything is validated before anything is written,
and output goes to a temporary folder beside the destination that is renamed at the end,
so a killed conversion leaves nothing at the destination. When the dtype does not change, no
tensor is built at all: each tensor's bytes are copied file to file by the kernel, in the
order the key map puts them (`byte_copy`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.byte_copy import ByteSource, row_sources
from megatron_kaja.checkpoint.hf import HFCheckpointReader, write_hf_metadata
from megatron_kaja.checkpoint.layout import (
    CheckpointLocation,
    iteration_dirname,
    locate_checkpoint,
    write_tracker,
)
from megatron_kaja.checkpoint.legacy import (
    LegacyReader,
    legacy_rank_files,
    load_legacy_file,
    write_legacy,
)
from megatron_kaja.checkpoint.megatron_args import (
    arch_from_megatron_args,
    megatron_lm_args,
    megatron_lm_common_state,
)
from megatron_kaja.checkpoint.safe_load import load_common_state, vet_torch_dist
from megatron_kaja.checkpoint.safetensors_io import TensorSpec, write_safetensors_streaming
from megatron_kaja.checkpoint.torch_dist import TorchDistReader, write_torch_dist
from megatron_kaja.models.llama.config import (
    LlamaArch,
    check_parallel_layout,
    padded_vocab_size,
)
from megatron_kaja.models.llama.model import TRANSFORMER_IMPLS
from megatron_kaja.models.llama.state_dict import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_MAPPINGS,
    OUTPUT_LAYER,
    TensorMapping,
    dist_key,
    hf_keys,
    hf_shapes,
)

META_FILE = "megatron_kaja.json"
FORMATS = ("torch_dist", "legacy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class McoreCheckpointMeta:
    """What a converted megatron checkpoint holds, stored beside it as megatron_kaja.json."""

    format: str
    arch: dict
    padded_vocab_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    transformer_impl: str
    dtype: str
    iteration: int = 0

    def save(self, ckpt_dir: Path) -> None:
        (ckpt_dir / META_FILE).write_text(
            json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, ckpt_dir: Path) -> McoreCheckpointMeta | None:
        path = Path(ckpt_dir) / META_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json / flag name of a torch dtype (float32, bfloat16, float16)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_dtype(reader: HFCheckpointReader) -> torch.dtype:
    name = reader.config.get("torch_dtype") or reader.config.get("dtype")
    if name in DTYPES:
        return DTYPES[name]
    dtype = reader.dtype(hf_keys(EMBEDDING)[0])
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "torch_dist",
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    transformer_impl: str = "local",
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
) -> McoreCheckpointMeta:
    """Convert an llm-jp-3 HF checkpoint folder into a megatron-core checkpoint at `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {FORMATS}")
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer impl {transformer_impl!r}: use one of {TRANSFORMER_IMPLS}")
    reader = HFCheckpointReader(hf_dir)
    arch = reader.arch
    check_parallel_layout(arch, tensor_parallel_size, pipeline_parallel_size)
    reader.validate(hf_shapes(arch))
    out_dtype = DTYPES[dtype] if dtype else _checkpoint_dtype(reader)
    padded = padded_vocab_size(arch.vocab_size, tensor_parallel_size, make_vocab_size_divisible_by)
    bar = tqdm(total=arch.num_layers + 3, desc="hf -> mcore", unit="layer", disable=not progress)

    def global_tensor(mapping: TensorMapping, layer: int | None) -> torch.Tensor:
        hf = [reader.get(k) for k in hf_keys(mapping, layer)]
        if mapping in (LAYER_MAPPINGS[-1], EMBEDDING, FINAL_NORM, OUTPUT_LAYER):
            bar.update()
        return mapping.global_from_hf(arch, hf, padded).to(out_dtype)

    def global_sources(mapping: TensorMapping, layer: int | None) -> list[ByteSource] | None:
        stored = [reader.stored(k) for k in hf_keys(mapping, layer)]
        if any(s.dtype != out_dtype for s in stored):
            return None
        plans = row_sources(lambda ts: mapping.global_from_hf(arch, ts, padded), stored)
        if plans is None:
            return None
        if mapping in (LAYER_MAPPINGS[-1], EMBEDDING, FINAL_NORM, OUTPUT_LAYER):
            bar.update()
        return plans[0]

    meta = McoreCheckpointMeta(
        format=fmt,
        arch=arch.to_dict(),
        padded_vocab_size=padded,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        transformer_impl=transformer_impl,
        dtype=dtype_name(out_dtype),
    )
    args = megatron_lm_args(
        arch,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        padded_vocab=padded,
        dtype=out_dtype,
        ckpt_format="torch_dist" if fmt == "torch_dist" else "torch",
        transformer_impl=transformer_impl,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    with atomic_output_dir(out) as tmp:
        if fmt == "torch_dist":
            write_torch_dist(
                tmp / iteration_dirname(0),
                arch,
                padded,
                out_dtype,
                global_tensor,
                transformer_impl,
                common=megatron_lm_common_state(args),
                global_sources=global_sources,
            )
            write_tracker(tmp, 0)
        else:
            write_legacy(
                tmp,
                arch,
                padded,
                out_dtype,
                global_tensor,
                tensor_parallel_size,
                pipeline_parallel_size,
                transformer_impl,
                args=args,
            )
        meta.save(tmp)  # beside the tracker (training runs keep one per iteration folder)
    bar.close()
    return meta


def detect_format(ckpt_dir: Path) -> str:
    """ "torch_dist" or "legacy" for a run folder, iteration folder or bare checkpoint."""
    return locate_checkpoint(ckpt_dir).format


def checkpoint_args(location: CheckpointLocation):
    """The Megatron-LM args Namespace a checkpoint carries (common.pt / rank 0's file), or
    None."""
    if location.format == "torch_dist":
        state = load_common_state(location.dir) if (location.dir / "common.pt").is_file() else {}
    else:
        state = load_legacy_file(legacy_rank_files(location.dir)[(0, 0)])
    return state.get("args")


def _checkpoint_arch(location: CheckpointLocation, hf_template: Path | None) -> LlamaArch:
    """The architecture: this project's megatron_kaja.json, else the checkpoint's own
    Megatron-LM args, else the HF template's config.json."""
    for folder in (location.dir, location.run_dir):
        meta = McoreCheckpointMeta.load(folder) if folder is not None else None
        if meta is not None:
            return LlamaArch(**meta.arch)
    args = checkpoint_args(location)
    if args is not None:
        template_vocab = None
        if hf_template is not None and getattr(args, "vocab_size", None) is None:
            template_vocab = LlamaArch.from_hf_config(hf_template).vocab_size
        arch, _ = arch_from_megatron_args(args, str(location.dir), template_vocab)
        return arch
    if hf_template is not None:
        return LlamaArch.from_hf_config(hf_template)
    raise CheckpointError(
        f"{location.dir} has no Megatron-LM args and no {META_FILE}: pass --hf-template "
        "with the model's HF config"
    )


def open_mcore_checkpoint(mcore_dir: str | Path, hf_template: str | Path | None = None):
    """A reader (TorchDistReader or LegacyReader) for any megatron checkpoint of llm-jp-3.

    `mcore_dir` is a run folder (tracker + `iter_*/`), one iteration folder, or a bare
    torch_dist folder. The architecture comes from the checkpoint's megatron_kaja.json, else
    from the Megatron-LM `args` it carries, else from `hf_template`'s config.json.
    """
    location = locate_checkpoint(mcore_dir)
    arch = _checkpoint_arch(location, Path(hf_template) if hf_template is not None else None)
    if location.format == "torch_dist":
        vet_torch_dist(location.dir)  # every pickle in it, before anyone reads it
        reader = TorchDistReader(location.dir, arch)
        reader.validate()
    else:
        reader = LegacyReader(location.dir, arch)
    if reader.padded_vocab < arch.vocab_size:
        raise CheckpointError(
            f"{location.dir}: vocabulary of {reader.padded_vocab} rows is smaller than the "
            f"model's vocab_size {arch.vocab_size}"
        )
    reader.location = location
    return reader


def mcore_global_as_hf(reader, mapping: TensorMapping) -> tuple[str, torch.Tensor]:
    """The embedding, final norm or output layer of a megatron checkpoint as its HF
    name and tensor (vocabulary padding dropped)."""
    (key,) = hf_keys(mapping)
    return key, mapping.hf_from_global(reader.arch, reader.load_global(mapping))[0]


def mcore_layer_as_hf(reader, layer: int) -> dict[str, torch.Tensor]:
    """Decoder layer `layer` of a megatron checkpoint as HF tensors (QKV and fc1 split)."""
    return {
        key: tensor
        for mapping, fused in reader.load_layer(layer).items()
        for key, tensor in zip(
            hf_keys(mapping, layer), mapping.hf_from_global(reader.arch, fused), strict=True
        )
    }


def hf_tensor_plan(arch: LlamaArch, dtype: torch.dtype) -> list[TensorSpec]:
    """Every HF tensor of `arch` in the order an HF checkpoint stores them (embedding,
    layers, final norm, lm_head), for the streaming writer to plan its shards."""
    shapes = hf_shapes(arch)
    order = list(hf_keys(EMBEDDING))
    for layer in range(arch.num_layers):
        order += [k for m in LAYER_MAPPINGS for k in hf_keys(m, layer)]
    order += [*hf_keys(FINAL_NORM), *hf_keys(OUTPUT_LAYER)]
    return [TensorSpec(k, shapes[k], dtype) for k in order]


def mcore_to_hf(
    mcore_dir: str | Path,
    out: str | Path,
    *,
    hf_template: str | Path | None = None,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
) -> Path:
    """Convert a megatron checkpoint (torch_dist or legacy, any TP/PP) into an HF folder."""
    template = Path(hf_template) if hf_template is not None else None
    if template is not None and not template.is_dir():
        raise CheckpointError(f"HF template folder {template} does not exist")
    reader = open_mcore_checkpoint(mcore_dir, template)
    arch = reader.arch
    out_dtype = DTYPES[dtype] if dtype else reader.stored_dtype()

    def as_sources(mapping: TensorMapping, layer: int | None):
        """`mapping`'s HF tensors as byte ranges of the checkpoint's files, or None."""
        if not isinstance(reader, TorchDistReader) or reader.dtypes[dist_key(mapping)] != out_dtype:
            return None
        stored = reader.stored_tensor(mapping, layer)
        if stored is None:
            return None
        plans = row_sources(lambda ts: mapping.hf_from_global(arch, ts[0]), [stored])
        if plans is None:
            return None
        return dict(zip(hf_keys(mapping, layer), plans, strict=True))

    def global_as_hf(mapping: TensorMapping):
        sources = as_sources(mapping, None)
        if sources is not None:
            return sources.items()
        key, tensor = mcore_global_as_hf(reader, mapping)
        return [(key, tensor.to(out_dtype))]

    def layer_as_hf(layer: int):
        plans = {m: as_sources(m, layer) for m in LAYER_MAPPINGS}
        if all(p is not None for p in plans.values()):
            return [item for p in plans.values() for item in p.items()]
        return [(k, t.to(out_dtype)) for k, t in mcore_layer_as_hf(reader, layer).items()]

    def tensors() -> Iterator[tuple[str, torch.Tensor | list[ByteSource]]]:
        with tqdm(
            total=arch.num_layers + 2, desc="mcore -> hf", unit="layer", disable=not progress
        ) as bar:
            yield from global_as_hf(EMBEDDING)
            bar.update()
            for layer in range(arch.num_layers):
                yield from layer_as_hf(layer)
                bar.update()
            yield from global_as_hf(FINAL_NORM)
            yield from global_as_hf(OUTPUT_LAYER)
            bar.update()

    with atomic_output_dir(out) as tmp:
        write_safetensors_streaming(tmp, hf_tensor_plan(arch, out_dtype), tensors(), max_shard_size)
        write_hf_metadata(tmp, arch, dtype_name(out_dtype), template)
    return Path(out)
