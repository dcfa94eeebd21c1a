"""Load converted llm-jp-3 weights into this rank's GPTModel stage, at any TP / PP."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
from megatron_kaja.checkpoint.safe_load import safe_globals_context, vet_torch_dist
from megatron_kaja.models.llama.state_dict import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT_LAYER,
    layer_key,
    pad_vocab,
    tp_slice,
)


def load_torch_dist_weights(model, ckpt_dir: str | Path) -> None:
    """megatron-core's own resharding load of a torch_dist checkpoint folder into `model`.

    Every pickle megatron-core will read from the folder is vetted first (`vet_torch_dist`).
    """
    from megatron.core import dist_checkpointing

    vet_torch_dist(ckpt_dir)
    sharded = model.sharded_state_dict()
    with safe_globals_context():
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    # A training checkpoint's common state (iteration, optimizer settings, ...) comes back
    # merged in: keep the model's own entries.
    model.load_state_dict({k: v for k, v in loaded.items() if k in sharded})


def load_weights_from_reader(model, reader, transformer_impl: str = "local") -> None:
    """Slice global tensors from a checkpoint reader into this rank's stage of `model`."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    own = model.state_dict()
    state = {}

    def put(name: str, mapping, tensor: torch.Tensor) -> None:
        if mapping.is_vocab:
            tensor = pad_vocab(tensor[: reader.arch.vocab_size], model.vocab_size)
        local = tp_slice(mapping, tensor, tp, tp_rank)
        if tuple(local.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"tensor {name}: checkpoint slice has shape {tuple(local.shape)}, "
                f"model expects {tuple(own[name].shape)}"
            )
        state[name] = local

    if model.pre_process:
        put(EMBEDDING.name(transformer_impl), EMBEDDING, reader.load_global(EMBEDDING))
    per_stage = reader.arch.num_layers // pp
    for local_index in range(per_stage):
        global_layer = pp_rank * per_stage + local_index
        for mapping, tensor in reader.load_layer(global_layer).items():
            put(layer_key(mapping, local_index, transformer_impl), mapping, tensor)
    if model.post_process:
        for mapping in (FINAL_NORM, OUTPUT_LAYER):
            put(mapping.name(transformer_impl), mapping, reader.load_global(mapping))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"weights not loaded: missing {missing}, unexpected {unexpected}")


def load_mcore_weights(model, ckpt_dir: str | Path, transformer_impl: str = "local") -> None:
    """Load the weights of a megatron checkpoint (torch_dist or legacy, saved at any TP / PP,
    by this project or by Megatron-LM; a run folder or one iteration folder) into `model`.

    Weights only, as Megatron-LM's `--finetune`: optimizer and RNG state are not read.
    torch_dist goes through megatron-core's dist_checkpointing (which reshards); legacy
    through the per-rank reader. The model's padded vocabulary may differ from the
    checkpoint's: the rows up to the vocabulary size are copied and the padding is re-made
    (zeros), whatever the checkpoint's padding rows hold.
    """
    reader = open_mcore_checkpoint(Path(ckpt_dir))
    if reader.location.format == "torch_dist" and reader.padded_vocab == model.vocab_size:
        load_torch_dist_weights(model, reader.location.dir)
    else:
        load_weights_from_reader(model, reader, transformer_impl)
