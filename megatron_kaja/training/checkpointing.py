"""Training checkpoints: megatron dist checkpoints with optimizer, schedule, data position, RNG.

Layout (Megatron-LM's, so its tools recognise it)::

    SAVE/latest_checkpointed_iteration.txt
    SAVE/iter_0000100/   torch_dist: model + optimizer tensors, common.pt, megatron_kaja.json
    SAVE/iter_0000100/bnb_optimizer/tp000_pp000.pt   with an 8-bit --optimizer: its state,
                         one file per model-parallel rank (not in the torch_dist tensors)

A save writes `SAVE/.iter_0000100.tmp`, renames it into place and only then rewrites the
tracker file (itself via an atomic rename), so a kill at any moment leaves the previous
checkpoint loadable. A save that fails (a full disk) raises `CheckpointSaveError` naming
the cause, the path and the checkpoint that is still intact; the temporary folders it
leaves are removed at the next start (`remove_stale_temporaries`). Model tensors use the
same keys as converted checkpoints: a training checkpoint converts to HF with
`tools/convert_checkpoint.py mcore-to-hf` directly.

bitsandbytes' 8-bit optimizer state (`--optimizer adamw_8bit / paged_adamw_8bit`) is
quantized in blocks of 256 values of each rank's own shard: it cannot be resharded exactly,
so it is saved per TP x PP rank (by data-parallel rank 0: the DP ranks hold the same state)
with plain `torch.save`, and a resume must keep TP and PP. The weights still go through the
dist checkpoint and reshard as usual.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_kaja.checkpoint.convert import McoreCheckpointMeta
from megatron_kaja.checkpoint.megatron_args import megatron_lm_args, megatron_lm_common_state
from megatron_kaja.checkpoint.safe_load import (
    load_common_state,
    safe_globals_context,
    vet_torch_dist,
)
from megatron_kaja.training.bnb_optimizer import BNB_OPTIMIZERS
from megatron_kaja.training.errors import ConfigError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
logger = logging.getLogger("megatron_kaja.train")


class CheckpointSaveError(RuntimeError):
    """A save failed; the message names the cause, the folder and what is still intact."""


def remove_stale_temporaries(root: Path | None) -> list[Path]:
    """Remove the `.iter_N.tmp` folders of saves that never finished (a kill, a full disk)
    under `root`, on rank 0; they are never loaded, and one can hold a checkpoint's size."""
    if root is None or (dist.is_initialized() and dist.get_rank() != 0):
        return []
    stale = sorted(Path(root).glob(".iter_*.tmp")) if Path(root).is_dir() else []
    for path in stale:
        logger.info("removing %s, left by a save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _is_disk_full(exc: BaseException) -> bool:
    """Whether a save failed for want of space, however megatron-core wrapped the OSError
    (a worker process's error comes back as an exception object or only as its text)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        stack += [e.__cause__, e.__context__]
        stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        failures = getattr(e, "failures", None)  # torch DCP's CheckpointException
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return False


def _save_failed(exc: BaseException, root: Path, iteration: int) -> CheckpointSaveError:
    tmp = root / f".{iteration_dir(root, iteration).name}.tmp"
    cause = "no space left on device" if _is_disk_full(exc) else f"{type(exc).__name__}: {exc}"
    if _is_disk_full(exc):
        free = shutil.disk_usage(root).free / 2**30
        cause += f" ({free:.1f} GiB free on the filesystem of {root})"
    previous = latest_iteration(root)
    intact = (
        f"the previous checkpoint {iteration_dir(root, previous)} is intact"
        if previous is not None
        else f"there is no earlier checkpoint in {root}"
    )
    return CheckpointSaveError(
        f"saving iteration {iteration} to {tmp} failed: {cause}; {intact}. The unfinished "
        f"{tmp.name} is removed at the next start"
    )


def _shield_writer_queue_from_sigterm() -> None:
    """Start megatron-core's checkpoint-writer results queue in a process that ignores
    SIGTERM, before megatron-core starts its own.

    megatron-core 0.16.1 (`filesystem_async._get_write_results_queue`) keeps the writers'
    results in a `multiprocessing.Manager` queue, a spawned process in the trainer's process
    group. `torchrun` answers a SIGTERM by sending SIGTERM to each worker's whole group: the
    manager dies at once, and the save that the trainer then makes (its own SIGTERM handler
    only sets a flag) fails with BrokenPipeError. The forked writer processes inherit the
    trainer's handler and survive; the manager is the one that needs shielding. It still
    stops with the trainer (the manager's finalizer) or with torchrun's SIGKILL.
    """
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=torch.multiprocessing.get_context("spawn"))
    # A partial of builtins pickles by reference: the spawned manager imports nothing of ours.
    manager.start(initializer=functools.partial(signal.signal, signal.SIGTERM, signal.SIG_IGN))
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._sigterm_shielded_manager = manager  # keeps it alive with the module


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_checkpoint(root: Path) -> tuple[int, str | None] | None:
    """(iteration, run kind: "sft" / "grpo") of the newest complete training checkpoint under
    `root`, or None when `root` holds none (e.g. a converted checkpoint)."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        return None
    iteration = int(text)
    ckpt = iteration_dir(root, iteration)
    if not (ckpt / "common.pt").is_file():
        return None  # a legacy (converted) checkpoint or a foreign layout: not a training run
    common = load_common_state(ckpt)
    if "iteration" not in common or "sampler" not in common:
        return None  # a converted checkpoint or a Megatron-LM run: weights to start from
    return iteration, common.get("run_kind")


def latest_iteration(root: Path, run_kind: str | None = None) -> int | None:
    """The iteration of the newest training checkpoint under `root` (of a `run_kind` run,
    when given), if any."""
    found = latest_checkpoint(root)
    if found is None or run_kind not in (None, found[1]):
        return None
    return found[0]


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data=None):
    """Each rank's RNG state, saved under its global rank."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject(
        "rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0
    )


def _model_keys(stack) -> list[str]:
    """Where each model chunk's tensors sit in the state: "model", or "model0", "model1", ...
    under an interleaved pipeline (Megatron-LM's names). The tensors inside carry global
    layer numbers, so a checkpoint saved with one chunk layout loads into another."""
    if len(stack.model_chunks) == 1:
        return ["model"]
    return [f"model{i}" for i in range(len(stack.model_chunks))]


def _state_template(stack, is_loading: bool, optimizer_sharding: str) -> dict:
    state = {
        key: chunk.sharded_state_dict()
        for key, chunk in zip(_model_keys(stack), stack.model_chunks, strict=True)
    }
    if stack.optimizer_kind == "adam":  # an 8-bit optimizer saves its own files
        state["optimizer"] = stack.optimizer.sharded_state_dict(
            {key: state[key] for key in _model_keys(stack)},
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_sharding},
        )
    return state


def _optimizer_info(stack) -> dict:
    """What a resume needs to know of the optimizer that saved: its kind and the TP x PP
    layout its per-rank state belongs to (kept in the common state)."""
    from megatron.core import parallel_state as ps

    return {
        "kind": stack.optimizer_kind,
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
    }


def bnb_state_file(ckpt: Path, tp_rank: int, pp_rank: int) -> Path:
    """The file of one model-parallel rank's 8-bit optimizer state in checkpoint `ckpt`."""
    return Path(ckpt) / "bnb_optimizer" / f"tp{tp_rank:03d}_pp{pp_rank:03d}.pt"


def check_optimizer_resumable(ckpt: Path, saved: dict | None, current: dict) -> None:
    """Refuse, naming both sides, a resume whose optimizer state this run cannot use.

    The two 8-bit kinds keep the same state (paging only decides where it lives), so they
    resume each other; megatron's Adam and bitsandbytes' do not. 8-bit state resumes only at
    the TP x PP layout that saved it; the data-parallel size may change.
    """
    saved = saved or {"kind": "adam"}  # checkpoints from before --optimizer
    if (saved["kind"] in BNB_OPTIMIZERS) != (current["kind"] in BNB_OPTIMIZERS):
        raise ConfigError(
            f"{ckpt} holds the state of --optimizer {saved['kind']}, which --optimizer "
            f"{current['kind']} cannot resume: resume with --optimizer {saved['kind']}, or "
            f"start a new run from its weights with --load {ckpt}"
        )
    if current["kind"] not in BNB_OPTIMIZERS:
        return

    def layout(record: dict) -> str:
        return f"TP={record['tensor_parallel']} PP={record['pipeline_parallel']}"

    if layout(saved) != layout(current):
        raise ConfigError(
            f"{ckpt}: its --optimizer {saved['kind']} state was saved at {layout(saved)}, "
            f"this run is {layout(current)}; block-quantized 8-bit states cannot be "
            f"resharded: resume at {layout(saved)}, or start a new run from its weights "
            f"(which reshard) with --load {ckpt}"
        )


def save_checkpoint(root: Path, iteration: int, stack, **kwargs) -> Path:
    """Save a resumable checkpoint of `iteration` under `root` (collective: all ranks call;
    keywords as `_save_checkpoint`). Raises `CheckpointSaveError` naming the cause, the
    folder and the checkpoint left intact when the save fails."""
    root = Path(root)
    try:
        return _save_checkpoint(root, iteration, stack, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        raise _save_failed(exc, root, iteration) from exc


def _save_checkpoint(
    root: Path,
    iteration: int,
    stack,
    *,
    arch,
    sampler_state: dict,
    config: dict,
    run_kind: str = "sft",
    optimizer_fully_reshardable: bool = False,
) -> Path:
    """Save a resumable checkpoint of `iteration` under `root` (collective: all ranks call)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    _shield_writer_queue_from_sigterm()
    # The distributed optimizer's state: "dp_reshardable" saves fully in parallel and
    # reshards across DP only; "fully_reshardable" gathers per DP group and loads at any layout.
    sharding = "fully_reshardable" if optimizer_fully_reshardable else "dp_reshardable"
    stack.sync_params()  # --overlap-param-gather: the step left other ranks' shards stale
    state = _state_template(stack, is_loading=False, optimizer_sharding=sharding)
    state["rng_state"] = _rng_object(_rng_state())
    model = stack.model_chunks[0]
    # Megatron-LM's own entries, so that its `--load` (with `--finetune`, or
    # `--use-checkpoint-args`) reads a training run folder as it reads its own.
    args = megatron_lm_args(
        arch,
        tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        padded_vocab=model.vocab_size,
        dtype=torch.bfloat16 if model.config.bf16 else torch.float32,
        ckpt_format="torch_dist",
        transformer_impl=stack.transformer_impl,
        iteration=iteration,
        seq_length=config.get("seq_length"),
    )
    state.update(megatron_lm_common_state(args, iteration))
    state.update(
        iteration=iteration,
        world_size=dist.get_world_size(),
        optimizer_sharding=sharding,
        run_kind=run_kind,
        optimizer_info=_optimizer_info(stack),  # beside "optimizer", the state itself
        scheduler=stack.scheduler.state_dict(),
        sampler=sampler_state,
        config=config,
    )
    dist_checkpointing.save(state, str(tmp))
    if stack.optimizer_kind != "adam" and ps.get_data_parallel_rank() == 0:
        # No temporary file needed: the iteration folder only appears, renamed, once every
        # rank has written.
        path = bnb_state_file(
            tmp, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        )
        path.parent.mkdir(exist_ok=True)
        torch.save(stack.optimizer.state_dict(), path)
    dist.barrier()
    if dist.get_rank() == 0:
        McoreCheckpointMeta(
            format="torch_dist",
            arch=asdict(arch),
            padded_vocab_size=stack.model_chunks[0].vocab_size,
            tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            transformer_impl=stack.transformer_impl,
            dtype="bfloat16" if stack.model_chunks[0].config.bf16 else "float32",
            iteration=iteration,
        ).save(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        tracker_tmp = root / f".{TRACKER_FILE}.tmp"
        tracker_tmp.write_text(f"{iteration}\n", encoding="utf-8")
        os.replace(tracker_tmp, root / TRACKER_FILE)
    dist.barrier()
    return final


def _materialize_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer its state tensors before a load.

    Without apex / transformer-engine, megatron's distributed optimizer wraps torch Adam,
    whose state exists only after a step, and its checkpoint template needs that state.
    megatron-core's own helper fills it with placeholders that the load then overwrites.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if init is not None and not inner.optimizer.state:
            init()


@contextlib.contextmanager
def _fully_reshardable_step_fix(optimizer):
    """Let megatron-core 0.16.1 load a `fully_reshardable` distributed-optimizer state.

    Without apex / transformer-engine the distributed optimizer wraps torch Adam, whose
    per-parameter state holds a "step" tensor. `load_parameter_state_from_fully_reshardable`
    leaves "step" out of the tensors it hands to `_set_main_param_and_optimizer_states`,
    which then copies every key of the parameter's current state, "step" included:
    `KeyError: 'step'`. Here the missing "step" is filled with a placeholder (the copy goes
    into the step tensor, which `_restore_adam_steps` then replaces from the param groups).
    """
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, original=original):
            original(model_param, {"step": torch.zeros(()), **tensors})

        inner._set_main_param_and_optimizer_states = set_states
        patched.append(inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # the class's method again


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own, correct torch-Adam `step` after a load.

    megatron-core 0.16.1's distributed optimizer, without apex / transformer-engine, keeps
    the step count in its param groups but leaves torch Adam's per-parameter `step` tensors
    as they were before the load (here: the placeholder step), or one tensor shared by all
    parameters, which torch increments once per parameter. Either way the bias correction of
    a resumed run is wrong; setting one counter per parameter from its group fixes both.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        for group in getattr(torch_optimizer, "param_groups", []):
            if "step" not in group:
                continue
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state is not None and torch.is_tensor(state.get("step")):
                    # torch Adam keeps `step` on the host unless capturable / fused.
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def load_checkpoint(root: Path, stack, run_kind: str | None = None) -> dict:
    """Restore model, optimizer, schedule and RNG from the newest checkpoint under `root`.

    Returns the common state (`iteration`, `sampler`, `config`, ...). RNG states are
    restored only when the world size matches the one that saved them.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    iteration = latest_iteration(root, run_kind)
    if iteration is None:
        raise FileNotFoundError(f"{root}: no {run_kind or 'training'} checkpoint to resume")
    ckpt = iteration_dir(root, iteration)
    vet_torch_dist(ckpt)  # every pickle megatron-core reads below, through allowlists first
    common = load_common_state(ckpt)
    check_optimizer_resumable(ckpt, common.get("optimizer_info"), _optimizer_info(stack))
    megatron_optimizer = stack.optimizer_kind == "adam"
    sharding = common.get("optimizer_sharding", "dp_reshardable")
    if megatron_optimizer:
        _materialize_optimizer_state(stack.optimizer)
    template = _state_template(
        stack,
        is_loading=True,
        optimizer_sharding=sharding,
    )
    same_world = common.get("world_size") == dist.get_world_size()
    if same_world:
        template["rng_state"] = _rng_object()
    with safe_globals_context():
        loaded = dist_checkpointing.load(template, str(ckpt))
    for key, chunk in zip(_model_keys(stack), stack.model_chunks, strict=True):
        chunk.load_state_dict(loaded[key])
    if megatron_optimizer:
        # The fp32 main params come from the checkpoint, not from the loaded weights: no
        # `reload_model_params()` here. megatron-core 0.16.1's optimizers hand out their live
        # main params as load targets (the distributed optimizer's `dp_reshardable` format:
        # `get_parameter_state_dp_reshardable`, "without any copies"; the bf16 optimizer's
        # `fp32_from_fp16_params`), so `dist_checkpointing.load` has already restored them in
        # place; copying the bf16 weights over them would round every master weight to bf16
        # (a resume that drifts from the uninterrupted run from its second step on).
        with torch.no_grad(), _fully_reshardable_step_fix(stack.optimizer):
            stack.optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(stack.optimizer)
    else:
        path = bnb_state_file(
            ckpt, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        )
        stack.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    stack.scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng_state"])
    return loaded
