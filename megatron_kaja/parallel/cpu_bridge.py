"""Run megatron-core on a machine without CUDA (tests, the CPU demo).

megatron-core 0.16.1 reaches for CUDA in a handful of places (see MCORE_ON_CPU.md in the
project's shared notes): tensors built with `device="cuda"` or `torch.cuda.current_device()`,
`torch.cuda.synchronize()`, the CUDA RNG state tracker, and type-name checks such as
`param.type() == "torch.cuda.FloatTensor"`. On a CPU-only build this module bridges each:

* a `TorchFunctionMode` (entered for the process, and around every Python autograd
  backward, which the autograd engine runs without the caller's modes) maps every CUDA
  device argument (`"cuda"`, `"cuda:0"`, an integer
  ordinal, `torch.device("cuda")`) to the CPU, makes `Tensor.cuda()` a no-op, and reports CPU
  tensor types under their CUDA names so that megatron's dtype checks accept them;
* `torch.cuda.current_device / synchronize / current_stream / Event / nvtx ...` become
  CPU-safe stand-ins;
* the RNG tracker keeps its named states as CPU generator states, which is what a CPU
  kernel (dropout) draws from, so TP dropout streams and activation recompute replay work.

`activate()` does nothing when CUDA is available: GPU runs never see this module. It is
written against megatron-core `SUPPORTED_MEGATRON_CORE`; `activate()` warns on others.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.16.1"

logger = logging.getLogger(__name__)

_ACTIVE: dict = {}  # the installed mode and the originals it replaced; empty when inactive


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Without CUDA an integer device can only be a CUDA ordinal (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            # megatron checks e.g. `param.type() == "torch.cuda.FloatTensor"`.
            name = func(*args, **kwargs)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _CpuEvent:
    """`torch.cuda.Event` stand-in: CPU work is synchronous, so events are instant."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CpuStream(_CpuEvent):
    """`torch.cuda.Stream` stand-in."""

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()


_CPU_STREAM = _CpuStream()


class _NvtxNoop:
    @staticmethod
    def range_push(msg):
        return 0

    @staticmethod
    def range_pop():
        return 0

    @staticmethod
    @contextlib.contextmanager
    def range(msg, *args, **kwargs):
        yield


def _cuda_stand_ins() -> dict:
    """The `torch.cuda` attributes replaced while the bridge is active."""
    return {
        "current_device": lambda: 0,
        "synchronize": lambda device=None: None,
        "current_stream": lambda device=None: _CPU_STREAM,
        "default_stream": lambda device=None: _CPU_STREAM,
        "set_stream": lambda stream: None,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "set_device": lambda device: None,
        "device_count": lambda: 0,
        "empty_cache": lambda: None,
        "nvtx": _NvtxNoop,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "manual_seed": _seed_cpu_generator,
        "manual_seed_all": _seed_cpu_generator,
    }


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. this function.
    torch.default_generator.manual_seed(seed)


def _make_cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mpu_random

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """The CUDA RNG tracker's named streams, kept as CPU generator states.

        On CPU the "CUDA generator" megatron forks for tensor-parallel regions *is* the
        CPU default generator (dropout on CPU tensors draws from it), so forking swaps the
        CPU generator's state in and out.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def is_active() -> bool:
    """Whether the bridge is installed in this process."""
    return bool(_ACTIVE)


def activate() -> bool:
    """Install the bridge if this process has no CUDA; idempotent.

    Returns True when the bridge is active after the call.
    """
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False
    import megatron.core
    from megatron.core.tensor_parallel import random as mpu_random

    version = getattr(megatron.core, "__version__", "unknown")
    if version != SUPPORTED_MEGATRON_CORE:
        warnings.warn(
            f"the CPU bridge was written against megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"found {version}: CPU runs may fail where megatron-core changed",
            stacklevel=2,
        )
    originals = {name: getattr(torch.cuda, name) for name in _cuda_stand_ins()}
    for name, value in _cuda_stand_ins().items():
        setattr(torch.cuda, name, value)
    rng_originals = {
        "_get_cuda_rng_state": mpu_random._get_cuda_rng_state,
        "_set_cuda_rng_state": mpu_random._set_cuda_rng_state,
        "_CUDA_RNG_STATE_TRACKER": mpu_random._CUDA_RNG_STATE_TRACKER,
        "_CUDA_RNG_STATE_TRACKER_INITIALIZED": mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
    }
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mpu_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker_class()()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mode = _CudaToCpuMode()
    mode.__enter__()
    # The autograd engine runs backward without the caller's torch-function modes, yet
    # megatron's custom Functions (activation recompute, TP collectives) build CUDA tensors
    # in backward: run every Python autograd backward under the mode as well.
    from torch.autograd.function import BackwardCFunction

    backward_apply = BackwardCFunction.apply

    def apply_backward_on_cpu(self, *args):
        with _CudaToCpuMode():
            return backward_apply(self, *args)

    BackwardCFunction.apply = apply_backward_on_cpu
    _ACTIVE.update(mode=mode, cuda=originals, rng=rng_originals, backward_apply=backward_apply)
    logger.info("megatron-core CPU bridge active (no CUDA in this process)")
    return True


def deactivate() -> None:
    """Undo `activate()` (used by tests; a training process keeps the bridge for its life)."""
    if not _ACTIVE:
        return
    from megatron.core.tensor_parallel import random as mpu_random

    _ACTIVE["mode"].__exit__(None, None, None)
    from torch.autograd.function import BackwardCFunction

    BackwardCFunction.apply = _ACTIVE["backward_apply"]
    for name, value in _ACTIVE["cuda"].items():
        setattr(torch.cuda, name, value)
    for name, value in _ACTIVE["rng"].items():
        setattr(mpu_random, name, value)
    _ACTIVE.clear()
