"""Plan and run a merge: check every input first, then stream tensors to a temp folder.

`plan_merge` opens the inputs lazily and fails with the file's or tensor's name on any
mismatch (architecture, tensor set, shape, tokenizer) and on unresolvable parameters,
before anything is written. `run_merge` then computes one tensor at a time (each input
read, upcast, merged, cast, written, freed), copies config and tokenizer, and renames the
temp folder to the output only when everything succeeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_kaja.checkpoint.hf import TOKENIZER_FILES
from megatron_kaja.checkpoint.safetensors_io import ShardedSafetensorsWriter, TensorSpec
from megatron_kaja.merge.config import MergeConfig
from megatron_kaja.merge.methods import MergeInputs, MergeMethod, get_merge_method
from megatron_kaja.merge.parameters import layer_index, layer_position, resolve_parameter
from megatron_kaja.merge.sources import TensorSource, open_tensor_source

# config.json fields that fix the shape of the network: inputs must agree on all of them.
ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)

# Tokenizer files whose content decides the token ids (compared between inputs).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")


class MergeInputError(ValueError):
    """The inputs cannot be merged as asked; raised before anything is written."""


@dataclass(frozen=True)
class TensorTask:
    """One output tensor and its resolved parameters."""

    spec: TensorSpec
    shared: dict
    per_model: list[dict]


@dataclass
class MergePlan:
    """Everything checked and resolved; `run_merge` only computes and writes."""

    config: MergeConfig
    method: MergeMethod
    sources: dict[str, TensorSource]
    base: str | None  # input path playing the base role, if the method has one
    merged: list[str]  # input paths passed to the method as `tensors`, in order
    reference: str  # input whose config, dtypes and tensor order the output follows
    tokenizer_from: Path | None
    tasks: list[TensorTask]


def _where(source: TensorSource, key: str) -> str:
    file_of = getattr(source, "file_of", None)
    return str(file_of(key)) if file_of else source.name


def _architecture_value(config: dict, field: str):
    """`field` of an HF config, or what LlamaConfig takes when it is absent: configs saved
    by older transformers (llm-jp-3's releases) have no head_dim, while the configs that
    Megatron inputs derive from their arguments spell everything out."""
    value = config.get(field)
    heads = config.get("num_attention_heads")
    if value is None and field == "head_dim" and heads:
        return config.get("hidden_size", 0) // heads
    if value is None and field == "num_key_value_heads":
        return heads
    return value


def _config_file(path: str) -> str:
    config = Path(path) / "config.json"
    return str(config) if config.is_file() else f"{path} (Megatron checkpoint)"


def _check_architectures(sources: dict[str, TensorSource], reference: str) -> None:
    ref_config = sources[reference].hf_config()
    for path, source in sources.items():
        config = source.hf_config()
        for field in ARCHITECTURE_FIELDS:
            value, ref_value = (_architecture_value(c, field) for c in (config, ref_config))
            if value != ref_value:
                raise MergeInputError(
                    f"architecture mismatch: {_config_file(path)} has {field}={value!r}, "
                    f"{_config_file(reference)} has {ref_value!r}"
                )


def _check_tensors(sources: dict[str, TensorSource], reference: str) -> None:
    ref = sources[reference]
    ref_keys = ref.keys()
    for path, source in sources.items():
        keys = set(source.keys())
        missing = [k for k in ref_keys if k not in keys]
        if missing:
            raise MergeInputError(
                f"missing tensor: {missing[0]} is in {_where(ref, missing[0])} but not in "
                f"{path}" + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        extra = sorted(keys - set(ref_keys))
        if extra:
            raise MergeInputError(
                f"unexpected tensor: {extra[0]} is in {_where(source, extra[0])} but not in "
                f"{reference}"
            )
        for key in ref_keys:
            if source.shape(key) != ref.shape(key):
                raise MergeInputError(
                    f"shape mismatch: tensor {key} is {list(source.shape(key))} in "
                    f"{_where(source, key)} but {list(ref.shape(key))} in {_where(ref, key)}"
                )
            if not source.dtype(key).is_floating_point:
                raise MergeInputError(
                    f"tensor {key} in {_where(source, key)} is {source.dtype(key)}; "
                    "only floating-point tensors can be merged"
                )


def _vocabulary(file: Path):
    """What in a tokenizer file decides token ids (tokenizer.json: model + added tokens)."""
    if file.suffix == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        return data.get("model"), data.get("added_tokens")
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _check_tokenizers(config: MergeConfig, sources: dict[str, TensorSource]) -> Path | None:
    dirs = {path: s.tokenizer_dir() for path, s in sources.items()}
    chosen = config.tokenizer_source or config.base_model or config.input_paths()[0]
    if dirs.get(chosen) is None:
        if config.tokenizer_source is not None:
            raise MergeInputError(f"tokenizer_source: {chosen} has no tokenizer files")
        chosen = next((p for p, d in dirs.items() if d is not None), None)
    if chosen is None:
        return None
    ref_dir = dirs[chosen]
    for tok_dir in dirs.values():
        if tok_dir is None:
            continue
        for name in VOCABULARY_FILES:
            a, b = ref_dir / name, tok_dir / name
            if a.is_file() and b.is_file() and _vocabulary(a) != _vocabulary(b):
                raise MergeInputError(
                    f"tokenizer mismatch: {b} differs from {a}; models with different "
                    "vocabularies cannot be merged tensor by tensor"
                )
    return ref_dir


def _num_layers(source: TensorSource) -> int:
    layers = source.hf_config().get("num_hidden_layers")
    if layers is None:
        names = source.keys()
        indices = [layer_index(k) for k in names]
        layers = max((i for i in indices if i is not None), default=-1) + 1
    return layers


def _derive_seed(seed: int, tensor_name: str, model: int) -> int:
    # A stable hash (not Python's salted hash()) so masks repeat across runs and processes
    # and do not depend on the order in which tensors are merged.
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def plan_merge(config: MergeConfig, out_dir: str | Path) -> MergePlan:
    """Open and check all inputs and resolve every tensor's parameters; write nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeInputError(f"{out_dir}: output exists and is not an empty folder")
    method = get_merge_method(config.merge_method)
    paths = config.input_paths()
    for path in paths:
        if Path(path).resolve() == out_dir.resolve():
            raise MergeInputError(f"{out_dir}: the output cannot be one of the inputs")
    try:
        sources = {path: open_tensor_source(path, config.hf_template) for path in paths}
    except (FileNotFoundError, KeyError, ValueError) as exc:  # CheckpointError is a ValueError
        raise MergeInputError(str(exc).strip("'\"")) from exc
    reference = config.base_model or paths[0]
    _check_architectures(sources, reference)
    _check_tensors(sources, reference)
    tokenizer_from = _check_tokenizers(config, sources)

    base = config.base_model if method.needs_base else None
    merged = [p for p in paths if p != base]
    num_layers = _num_layers(sources[reference])
    out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else None
    tasks = []
    tensor_names = sources[reference].keys()
    try:
        for key in tensor_names:
            t = layer_position(key, num_layers)
            shared = {
                name: resolve_parameter(name, default, [config.parameters], key, t, "the merge")
                for name, default in method.shared_params.items()
            }
            per_model = [
                {
                    name: resolve_parameter(
                        name, default, [config.model_parameters(p), config.parameters], key, t, p
                    )
                    for name, default in method.model_params.items()
                }
                for p in merged
            ]
            spec = TensorSpec(
                key, sources[reference].shape(key), out_dtype or sources[reference].dtype(key)
            )
            tasks.append(TensorTask(spec, shared, per_model))
    except ValueError as exc:
        raise MergeInputError(str(exc)) from exc
    return MergePlan(config, method, sources, base, merged, reference, tokenizer_from, tasks)


def merge_tensor(plan: MergePlan, task: TensorTask) -> torch.Tensor:
    """Read one tensor from every input, merge it in the compute dtype, cast for output."""
    dtype = getattr(torch, plan.config.dtype)
    name = task.spec.name

    def generator(model: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derive_seed(plan.config.seed, name, model))

    inputs = MergeInputs(
        tensors=[plan.sources[p].get(name).to(dtype) for p in plan.merged],
        base=plan.sources[plan.base].get(name).to(dtype) if plan.base else None,
        shared=task.shared,
        per_model=task.per_model,
        generator=generator,
    )
    return plan.method.fn(inputs).to(task.spec.dtype)


def _write_config(plan: MergePlan, out: Path) -> None:
    config = dict(plan.sources[plan.reference].hf_config())
    if plan.config.out_dtype:
        # transformers 5 writes `dtype`; older releases wrote `torch_dtype`.
        for field in ("dtype", "torch_dtype"):
            if field in config:
                config[field] = plan.config.out_dtype
        config.setdefault("dtype", plan.config.out_dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    reference_dir = Path(plan.reference)
    if (reference_dir / "generation_config.json").is_file():
        shutil.copy2(reference_dir / "generation_config.json", out / "generation_config.json")
    if plan.tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (plan.tokenizer_from / name).is_file():
                shutil.copy2(plan.tokenizer_from / name, out / name)


def run_merge(
    config: MergeConfig,
    out_dir: str | Path,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> Path:
    """Merge as `config` says into `out_dir` (must not exist or be empty). Returns it."""
    out_dir = Path(out_dir)
    plan = plan_merge(config, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writer = ShardedSafetensorsWriter(tmp, [t.spec for t in plan.tasks], max_shard_size)
        bar = tqdm(plan.tasks, desc=f"merge ({config.merge_method})", disable=not progress)
        for task in bar:
            writer.write(task.spec.name, merge_tensor(plan, task))
        writer.close()
        _write_config(plan, tmp)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty in plan_merge
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
