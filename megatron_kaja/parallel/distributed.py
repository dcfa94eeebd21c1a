"""Process-group set-up for torchrun / srun launches: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_kaja.extras import log_absent_packages
from megatron_kaja.parallel import cpu_bridge


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid."""

    world_size: int
    rank: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def compute_device() -> torch.device:
    """The device this process computes on: its CUDA device on a GPU machine, else the CPU.

    Under the CPU bridge this is "cuda" too (the bridge runs it on the CPU, and strict devices
    then treats what is put there as a GPU would), so one code path serves both machines.
    Every place in the project that picks a device for tensors or models asks this.
    """
    if torch.cuda.is_available() or cpu_bridge.is_active():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's (or SLURM srun's) environment.

    A plain `python script.py` becomes a world of one on a free loopback port.
    """
    if dist.is_initialized():
        return
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    init_method = None  # torchrun / srun: MASTER_ADDR and MASTER_PORT from the environment
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process (a converter, a plain `python pretrain_sft.py`) takes a free loopback
        # port without writing it into os.environ, which child processes would inherit.
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    elif "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    *,
    virtual_pipeline_parallel_size: int | None = None,
    context_parallel_size: int = 1,
) -> ParallelLayout:
    """Set up torch.distributed, megatron-core's parallel groups and its RNG streams.

    On a machine without CUDA the CPU bridge is activated first. Raises ValueError when the
    world size is not a multiple of TP x PP x CP. `virtual_pipeline_parallel_size` (model
    chunks per pipeline stage) selects megatron-core's interleaved 1F1B schedule.
    """
    cpu_bridge.activate()
    log_absent_packages()
    init_process_group(timeout_minutes)
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size * context_parallel_size):
        cp = f" x context-parallel-size {context_parallel_size}" * (context_parallel_size > 1)
        raise ValueError(
            f"world size {world} is not divisible by tensor-model-parallel-size "
            f"{tensor_parallel_size} x pipeline-model-parallel-size {pipeline_parallel_size}{cp}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size,
            context_parallel_size=context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def set_virtual_pipeline_size(size: int | None) -> None:
    """Model chunks per pipeline stage (None: one, no interleaving), once the architecture
    is known (after `initialize_model_parallel`, which cannot know the layer count)."""
    from megatron.core import parallel_state

    parallel_state.set_virtual_pipeline_model_parallel_world_size(size)
    rank = 0 if size else None
    if parallel_state.get_virtual_pipeline_model_parallel_rank() != rank:
        # megatron-core deprecates this global in favour of passing `vp_stage`, which every
        # call of ours does; its interleaved schedule still starts from the global's value.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "set_virtual_pipeline_model_parallel_rank")
            parallel_state.set_virtual_pipeline_model_parallel_rank(rank)


def current_layout() -> ParallelLayout:
    """The layout of the already initialized megatron parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def tensor_parallel_group():
    """`(group, world size, rank)` of this rank's tensor-parallel group."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
    )


def destroy_model_parallel() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
