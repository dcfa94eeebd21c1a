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
    """megatron-core's own resharding load of a torch_dist checkpoint folder into `model` (a
    model, or a rank's model chunks: loaded in one call, since a load must read every layer).

    Every pickle megatron-core will read from the folder is vetted first (`vet_torch_dist`).
    """
    from megatron.core import dist_checkpointing

    vet_torch_dist(ckpt_dir)
    chunks = model if isinstance(model, list) else [model]
    sharded = {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    with safe_globals_context():
        loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    # A training checkpoint's common state (iteration, optimizer settings, ...) comes back
    # merged in: keep the model's own entries.
    for name, chunk in zip(sharded, chunks, strict=True):
        chunk.load_state_dict({k: v for k, v in loaded[name].items() if k in sharded[name]})


def load_weights_from_reader(model, reader, transformer_impl: str = "local") -> None:
    """Slice global tensors from a checkpoint reader into this rank's stage of `model`."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
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
    # Each layer knows its global number (1-based), whatever the split: even or uneven
    # pipeline stages, interleaved model chunks.
    for local_index, layer in enumerate(model.decoder.layers):
        global_layer = layer.layer_number - 1
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
    by this project or by Megatron-LM; a run folder or one iteration folder) into `model` (a
    model, or the list of a rank's model chunks under an interleaved pipeline).

    Weights only, as Megatron-LM's `--finetune`: optimizer and RNG state are not read.
    torch_dist goes through megatron-core's dist_checkpointing (which reshards); legacy
    through the per-rank reader. The model's padded vocabulary may differ from the
    checkpoint's: the rows up to the vocabulary size are copied and the padding is re-made
    (zeros), whatever the checkpoint's padding rows hold.
    """
    chunks = model if isinstance(model, list) else [model]
    reader = open_mcore_checkpoint(Path(ckpt_dir))
    if reader.location.format == "torch_dist" and reader.padded_vocab == chunks[0].vocab_size:
        load_torch_dist_weights(chunks, reader.location.dir)
    else:
        for chunk in chunks:
            load_weights_from_reader(chunk, reader, transformer_impl)
