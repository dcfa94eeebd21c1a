"""Checkpoint I/O: safetensors, megatron-core torch_dist and Megatron-LM legacy layouts."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted: missing files, tensors, wrong shapes."""
