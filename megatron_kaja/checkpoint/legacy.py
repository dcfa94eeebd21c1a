"""Megatron-LM's legacy per-rank checkpoint layout, for interop with Megatron-LM and llm-jp's fork.

    DIR/latest_checkpointed_iteration.txt
    DIR/iter_0000000/mp_rank_00/model_optim_rng.pt          (PP = 1)
    DIR/iter_0000000/mp_rank_00_000/model_optim_rng.pt      (PP > 1: TP rank, PP rank)

Each file holds `{"model": <one rank's GPTModel state dict>, "checkpoint_version": 3.0,
"iteration": N, "args": Namespace(...)}`; layer numbers are local to the pipeline stage.
A rank's file holds that rank's slice, so writing needs one rank's weights in memory.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from megatron_kaja.checkpoint.hf import CheckpointError
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

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_NAME = "model_optim_rng.pt"


def rank_dir(iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return f"iter_{iteration:07d}/{name}"


def megatron_lm_args(arch: LlamaArch, tp: int, pp: int, padded_vocab: int, dtype: torch.dtype):
    """The subset of Megatron-LM's arguments that describes this model (`--use-checkpoint-args`)."""
    return argparse.Namespace(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        normalization="RMSNorm",
        norm_epsilon=arch.norm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        padded_vocab_size=padded_vocab,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


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
) -> None:
    """Write one `model_optim_rng.pt` per (TP, PP) rank from `global_tensor(mapping, layer)`.

    Works stage by stage: a stage's global tensors are built once and sliced for each TP rank.
    """
    args = megatron_lm_args(arch, tp, pp, padded_vocab, dtype)
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
            path = out_dir / rank_dir(iteration, tp_rank, pp_rank, pp) / CHECKPOINT_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = {
                "model": state,
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "args": args,
            }
            torch.save(checkpoint, path)
    (out_dir / TRACKER_FILE).write_text(f"{iteration}\n", encoding="utf-8")


class LegacyReader:
    """Reads global tensors from a legacy checkpoint at any TP / PP (files memory-mapped)."""

    _RANK_RE = re.compile(r"mp_rank_(\d+)(?:_(\d+))?$")

    def __init__(self, ckpt_dir: Path, arch: LlamaArch):
        self.dir = Path(ckpt_dir)
        self.arch = arch
        tracker = self.dir / TRACKER_FILE
        if not tracker.is_file():
            raise CheckpointError(
                f"{self.dir}: no {TRACKER_FILE} (not a legacy Megatron checkpoint)"
            )
        text = tracker.read_text(encoding="utf-8").strip()
        self.iter_dir = self.dir / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not self.iter_dir.is_dir():
            raise CheckpointError(
                f"{self.dir}: {TRACKER_FILE} names {self.iter_dir.name}, which is missing"
            )
        ranks = {}
        for child in self.iter_dir.iterdir():
            match = self._RANK_RE.match(child.name)
            if match and (child / CHECKPOINT_NAME).is_file():
                ranks[(int(match.group(1)), int(match.group(2) or 0))] = child / CHECKPOINT_NAME
        if not ranks:
            raise CheckpointError(f"{self.iter_dir}: no mp_rank_*/{CHECKPOINT_NAME} files")
        if (0, 0) not in ranks:
            raise CheckpointError(f"{self.iter_dir}: rank folder mp_rank_00 is missing")
        self._paths = ranks
        self._states: dict[tuple[int, int], dict] = {}
        # The saved arguments know the layout even when the last rank's folder is gone.
        args = self._load(0, 0).get("args")
        self.tp = getattr(args, "tensor_model_parallel_size", None) or 1 + max(t for t, _ in ranks)
        self.pp = getattr(args, "pipeline_model_parallel_size", None) or 1 + max(
            p for _, p in ranks
        )
        missing = [
            rank_dir(0, t, p, self.pp).split("/")[1]
            for t in range(self.tp)
            for p in range(self.pp)
            if (t, p) not in ranks
        ]
        if missing:
            raise CheckpointError(f"{self.iter_dir}: rank folders missing: {', '.join(missing)}")
        if arch.num_layers % self.pp:
            raise CheckpointError(
                f"{self.dir}: {arch.num_layers} layers cannot sit on {self.pp} pipeline stages"
            )
        self.transformer_impl = "local"
        first = self._state(0, 0)
        if any(k.endswith("layer_norm_weight") for k in first):
            self.transformer_impl = "transformer_engine"

    def _load(self, tp_rank: int, pp_rank: int) -> dict:
        path = self._paths[(tp_rank, pp_rank)]
        # Megatron-LM stores its arguments as an argparse.Namespace: allow just that.
        with torch.serialization.safe_globals([argparse.Namespace, torch.dtype]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "model" not in checkpoint:
            raise CheckpointError(f"{path}: no 'model' entry")
        return checkpoint

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
