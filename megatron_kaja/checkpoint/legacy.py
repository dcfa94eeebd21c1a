"""Megatron-LM's legacy per-rank checkpoint layout, for interop with Megatron-LM and llm-jp's fork.

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0000000/mp_rank_00/model_optim_rng.pt          (PP = 1)
    DIR/iter_0000000/mp_rank_00_000/model_optim_rng.pt      (PP > 1: TP rank, PP rank)

Each file holds `{"model": <one rank's GPTModel state dict>, "checkpoint_version": 3.0,
"iteration": N, "num_floating_point_operations_so_far": 0, "args": Namespace(...)}` (see
`megatron_args`); layer numbers are local to the pipeline stage. Files from Megatron-LM also
hold optimizer, scheduler and RNG state, which the reader ignores.
A rank's file holds that rank's slice, so writing needs one rank's weights in memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.layout import (
    LEGACY_FILE,
    iteration_dirname,
    write_tracker,
)
from megatron_kaja.checkpoint.megatron_args import megatron_lm_common_state
from megatron_kaja.checkpoint.safe_load import torch_load_safe
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.state_dict import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_EXTRA_STATE_MODULES,
    LAYER_MAPPINGS,
    OUTPUT_LAYER,
    TensorMapping,
    layer_key,
    stage_layers,
    tp_merge,
    tp_slice,
)


def rank_dir(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron-LM's per-rank folder name (get_checkpoint_name)."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def load_legacy_file(path: Path) -> dict:
    """One rank's `model_optim_rng.pt`, loaded with torch's weights-only unpickler and
    megatron-core's allowlist (args Namespace, megatron enums, numpy RNG state)."""
    checkpoint = torch_load_safe(path, str(path), mmap=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path}: no 'model' entry")
    return checkpoint


def write_legacy(
    out_dir: Path,
    arch: LlamaArch,
    padded_vocab: int,
    dtype: torch.dtype,
    global_tensor,
    tp: int,
    pp: int,
    transformer_impl: str = "local",
    iteration: int = 0,
    args=None,
) -> Path:
    """Write a run folder (tracker + `iter_*/`) with one `model_optim_rng.pt` per (TP, PP)
    rank from `global_tensor(mapping, layer)`; returns the iteration folder.

    Works stage by stage: a stage's global tensors are built once and sliced for each TP rank.
    Each file carries `args` (a Megatron-LM Namespace), `checkpoint_version` and `iteration`.
    """
    common = megatron_lm_common_state(args, iteration)
    ckpt_dir = out_dir / iteration_dirname(iteration)
    for pp_rank in range(pp):
        layers = stage_layers(arch.num_layers, pp, pp_rank)
        rank_states: list[dict] = [{} for _ in range(tp)]

        def put(name: str, mapping: TensorMapping, tensor: torch.Tensor, states=rank_states):
            tensor = tensor.to(dtype)
            for tp_rank, state in enumerate(states):
                state[name] = tp_slice(mapping, tensor, tp, tp_rank).clone()

        if pp_rank == 0:
            put(EMBEDDING.name(transformer_impl), EMBEDDING, global_tensor(EMBEDDING, None))
        for local_index, layer in enumerate(layers):
            for mapping in LAYER_MAPPINGS:
                put(
                    layer_key(mapping, local_index, transformer_impl),
                    mapping,
                    global_tensor(mapping, layer),
                )
            for module in LAYER_EXTRA_STATE_MODULES[transformer_impl]:
                for state in rank_states:
                    state[f"decoder.layers.{local_index}.{module}._extra_state"] = None
        if pp_rank == pp - 1:
            put(FINAL_NORM.name(transformer_impl), FINAL_NORM, global_tensor(FINAL_NORM, None))
            put(
                OUTPUT_LAYER.name(transformer_impl), OUTPUT_LAYER, global_tensor(OUTPUT_LAYER, None)
            )
            for state in rank_states:
                state["output_layer._extra_state"] = None
        for tp_rank, state in enumerate(rank_states):
            path = ckpt_dir / rank_dir(tp_rank, pp_rank, pp) / LEGACY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**common, "model": state}, path)
    write_tracker(out_dir, iteration)
    return ckpt_dir


def legacy_rank_files(ckpt_dir: Path) -> dict[tuple[int, int], Path]:
    """{(TP rank, PP rank): model_optim_rng.pt} of a legacy checkpoint folder."""
    ranks = {}
    for child in Path(ckpt_dir).iterdir():
        match = _RANK_RE.match(child.name)
        if match and (child / LEGACY_FILE).is_file():
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = child / LEGACY_FILE
    if not ranks:
        raise CheckpointError(f"{ckpt_dir}: no mp_rank_*/{LEGACY_FILE} files")
    if (0, 0) not in ranks:
        raise CheckpointError(f"{ckpt_dir}: rank folder mp_rank_00 is missing")
    return ranks


# mp_rank_TT, mp_rank_TT_PPP; an expert-parallel rank would add _EEE (not llm-jp-3's)
_RANK_RE = re.compile(r"mp_rank_(\d+)(?:_(\d+))?$")


class LegacyReader:
    """Reads global tensors from a legacy checkpoint folder at any TP / PP (files
    memory-mapped). `ckpt_dir` is the `iter_*` (or `release`) folder."""

    def __init__(self, ckpt_dir: Path, arch: LlamaArch):
        self.dir = Path(ckpt_dir)
        self.iter_dir = self.dir
        self.arch = arch
        ranks = legacy_rank_files(self.dir)
        self._paths = ranks
        self._states: dict[tuple[int, int], dict] = {}
        # The saved arguments know the layout even when the last rank's folder is gone.
        args = self._load(0, 0).get("args")
        self.tp = getattr(args, "tensor_model_parallel_size", None) or 1 + max(t for t, _ in ranks)
        self.pp = getattr(args, "pipeline_model_parallel_size", None) or 1 + max(
            p for _, p in ranks
        )
        missing = [
            rank_dir(t, p, self.pp)
            for t in range(self.tp)
            for p in range(self.pp)
            if (t, p) not in ranks
        ]
        if missing:
            raise CheckpointError(f"{self.dir}: rank folders missing: {', '.join(missing)}")
        if arch.num_layers % self.pp:
            raise CheckpointError(
                f"{self.dir}: {arch.num_layers} layers cannot sit on {self.pp} pipeline stages"
            )
        self.transformer_impl = "local"
        first = self._state(0, 0)
        if any(k.endswith("layer_norm_weight") for k in first):
            self.transformer_impl = "transformer_engine"

    def _load(self, tp_rank: int, pp_rank: int) -> dict:
        return load_legacy_file(self._paths[(tp_rank, pp_rank)])

    def _state(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) not in self._states:
            self._states[(tp_rank, pp_rank)] = self._load(tp_rank, pp_rank)["model"]
        return self._states[(tp_rank, pp_rank)]

    def _merged(self, mapping: TensorMapping, name: str, pp_rank: int) -> torch.Tensor:
        shards = []
        for tp_rank in range(self.tp):
            state = self._state(tp_rank, pp_rank)
            if name not in state:
                raise CheckpointError(
                    f"{self._paths[(tp_rank, pp_rank)]}: tensor {name} is missing"
                )
            shards.append(state[name])
        return tp_merge(mapping, shards)

    def load_global(self, mapping: TensorMapping) -> torch.Tensor:
        """Embedding (first stage), final norm or output layer (last stage)."""
        pp_rank = 0 if mapping is EMBEDDING else self.pp - 1
        return self._merged(mapping, mapping.name(self.transformer_impl), pp_rank)

    def load_layer(self, layer: int) -> dict[TensorMapping, torch.Tensor]:
        per_stage = self.arch.num_layers // self.pp
        pp_rank, local = divmod(layer, per_stage)
        return {
            m: self._merged(m, layer_key(m, local, self.transformer_impl), pp_rank)
            for m in LAYER_MAPPINGS
        }

    @property
    def padded_vocab(self) -> int:
        return self._state(0, 0)[EMBEDDING.name(self.transformer_impl)].shape[0] * self.tp

    def stored_dtype(self) -> torch.dtype:
        return self._state(0, 0)[EMBEDDING.name(self.transformer_impl)].dtype
