"""Run megatron-core on a machine without CUDA (tests, the CPU demo).

megatron-core 0.16.1 reaches for CUDA in a handful of places (see MCORE_ON_CPU.md in the
project's shared notes): tensors built with `device="cuda"` or `torch.cuda.current_device()`,
`torch.cuda.synchronize()`, the CUDA RNG state tracker, and type-name checks such as
`param.type() == "torch.cuda.FloatTensor"`. On a CPU-only build this module bridges each:

* a `TorchFunctionMode` (entered for the process, and around every Python autograd
  backward, which the autograd engine runs without the caller's modes) maps every CUDA
  device argument (`"cuda"`, `"cuda:0"`, an integer
  ordinal, `torch.device("cuda")`) to the CPU, makes `Tensor.cuda()` a no-op, drops
  `pin_memory=True` (no pinned allocator without CUDA), and reports CPU tensor types under
  their CUDA names so that megatron's dtype checks accept them;
* `torch.cuda.current_device / synchronize / current_stream / Event / nvtx ...` become
  CPU-safe stand-ins;
* the RNG tracker keeps its named states as CPU generator states, which is what a CPU
  kernel (dropout) draws from, so TP dropout streams and activation recompute replay work.

`activate()` does nothing when CUDA is available: GPU runs never see this module. It is
written against megatron-core `SUPPORTED_MEGATRON_CORE`; `activate()` warns on others.

Strict devices (`MEGATRON_KAJA_STRICT_DEVICES=1`; the test suite's default, off for users):
on a CPU "cuda" and host tensors are the same thing, so a GPU-only failure would pass
silently. In this mode each tensor made under the bridge is marked with where it would live
on a GPU (`device`: built on "cuda", moved there, or computed from such a tensor; `host`: a
factory call without a device, `torch.tensor(values)`, `torch.from_numpy`, `.cpu()`,
`torch.load` without a CUDA `map_location`). Tensors whose origin the bridge never saw (made
by the autograd engine or C++) stay unmarked and never raise. A device tensor reports
`cuda:0` as its `.device`, so `device=x.device` follows it as on a GPU. `StrictDeviceError`,
naming the call site, is raised where a GPU would fail:
* a marked host tensor in a collective on a group that is NCCL on a GPU (every group but
  those made with `backend="gloo"`);
* a generator drawing for a tensor of the other home (a CPU generator for a device tensor);
* an op mixing a device tensor with a host tensor of one or more dimensions (copies, moves
  and indexing excepted: a GPU accepts those, and host 0-dim tensors, too);
* `.numpy()` or `.pin_memory()` of a device tensor, and a host `.grad` for a device tensor.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import warnings

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.16.1"
STRICT_DEVICES_ENV = "MEGATRON_KAJA_STRICT_DEVICES"

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
        if kwargs.get("pin_memory"):
            # A CPU build has no pinned allocator: megatron-core's RoPE under context
            # parallelism makes its chunk index with torch.tensor(..., pin_memory=True).
            kwargs = {**kwargs, "pin_memory": False}
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


class StrictDeviceError(RuntimeError):
    """A GPU would fail here: a host tensor where a device tensor is needed, or the reverse."""


_HOME = "_kaja_home"  # instance attribute: "device" | "host"; absent = origin unknown
DEVICE, HOST = "device", "host"
_CUDA0 = torch.device("cuda", 0)
_TORCH_DIR = os.path.dirname(torch.__file__)
_METHOD_WRAPPER = type(torch.Tensor.device.__get__)  # how property access reaches the mode
_TENSOR_DEVICE = vars(torch._C.TensorBase)["device"]
_TENSOR_DATA = vars(torch._C.TensorBase)["data"]
_TENSOR_GRAD = vars(torch._C.TensorBase)["grad"]
# A GPU takes these with a host tensor beside a device one: copies, moves, indexing.
_MIXING_ALLOWED = frozenset(
    {
        torch.Tensor.copy_,
        torch.Tensor.to,
        torch.Tensor.cuda,
        torch.Tensor.cpu,
        torch.Tensor.type_as,
        torch.Tensor.__getitem__,
        torch.Tensor.__setitem__,
        torch.Tensor.set_,
        torch._has_compatible_shallow_copy_type,
    }
)


def home_of(tensor) -> str | None:
    """Where `tensor` would live on a GPU under strict devices: "device", "host" or None."""
    return tensor.__dict__.get(_HOME)


def _mark(value, home) -> None:
    if isinstance(value, torch.Tensor):
        if home is None:
            value.__dict__.pop(_HOME, None)
        else:
            value.__dict__[_HOME] = home
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                _mark(item, home)


def _call_site() -> str:
    """`file:line (function)` of the innermost frame outside torch and this module, and of
    the innermost one outside installed packages (the caller's own code) when that differs."""
    sites, frame = [], sys._getframe(1)
    while frame is not None and len(sites) < 2:
        name = frame.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name == __file__) and (
            not sites or "-packages" not in name
        ):
            sites.append(f"{name}:{frame.f_lineno} ({frame.f_code.co_name})")
            if "-packages" not in name:
                break
        frame = frame.f_back
    return ", called from ".join(sites) or "<unknown>"


def _fail(message: str):
    raise StrictDeviceError(f"strict devices: {message} at {_call_site()}")


def _tensors(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def _alias(tensor):
    # On a CPU a move to the CPU returns the tensor itself; a new alias keeps the source's
    # home apart from the destination's, as the copy a GPU makes would.
    return tensor.view_as(tensor) if tensor.requires_grad else tensor.detach()


def _device_home(device) -> str:
    return DEVICE if _is_cuda_device(device) else HOST


def _move_target(args, kwargs):
    """The home a `Tensor.to` call moves to, or None when it changes the dtype only."""
    if "device" in kwargs and kwargs["device"] is not None:
        return _device_home(kwargs["device"])
    if len(args) > 1:
        first = args[1]
        if isinstance(first, torch.Tensor):
            return home_of(first)
        if isinstance(first, (str, torch.device)) or (
            isinstance(first, int) and not isinstance(first, bool)
        ):
            return _device_home(first)
    return None


class _StrictDeviceMode(_CudaToCpuMode):
    """The bridge's device mapping plus the checks and marks described in the module doc."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if type(func) is _METHOD_WRAPPER:  # a Tensor property's __get__ / __set__
            prop, access = func.__self__, func.__name__
            if prop is _TENSOR_DEVICE and access == "__get__":
                return _CUDA0 if home_of(args[0]) == DEVICE else func(*args)
            if prop is _TENSOR_DATA and access == "__set__":
                func(*args)
                _mark(args[0], home_of(args[1]))
                return None
            if prop is _TENSOR_GRAD and access == "__set__" and args[1] is not None:
                if home_of(args[0]) == DEVICE and home_of(args[1]) == HOST:
                    _fail("a host tensor assigned as the `.grad` of a device tensor")
                return func(*args)
        if func in (torch.Tensor.numpy, torch.Tensor.pin_memory) and home_of(args[0]) == DEVICE:
            _fail(f"`.{func.__name__}()` of a device tensor (only host tensors have it)")
        if func in (torch.Tensor.cuda, torch.Tensor.cpu):
            target = DEVICE if func is torch.Tensor.cuda else HOST
            out = _alias(args[0]) if home_of(args[0]) != target else args[0]
            _mark(out, target)
            return out
        target = None  # the home a device argument asks for
        if func is torch.Tensor.to:
            target = _move_target(args, kwargs)
        elif kwargs.get("device") is not None:
            target = _device_home(kwargs["device"])
        homes, host_nd = set(), False
        for tensor in _tensors(args, kwargs):
            home = home_of(tensor)
            homes.add(home)
            host_nd = host_nd or (home == HOST and tensor.dim() > 0)
        if host_nd and DEVICE in homes and func not in _MIXING_ALLOWED:
            _fail(f"`{_name(func)}` mixes a host tensor with a device tensor")
        if target is None:
            if DEVICE in homes:
                target = DEVICE
            elif homes == {HOST} or not homes:
                target = HOST  # all inputs host, or a factory call without a device
        generator = kwargs.get("generator")
        if generator is not None and target is not None:
            drawn_by = getattr(generator, _HOME, HOST)  # torch's own generators are CPU ones
            if drawn_by != target:
                _fail(f"a {drawn_by} generator draws for a {target} tensor in `{_name(func)}`")
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.to and out is args[0] and target != home_of(args[0]):
            out = _alias(out)
        if target is not None or homes:
            _mark(out, target)
        return out


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class _StrictGenerator(torch.Generator):
    """`torch.Generator(device="cuda")` on a CPU: a CPU generator that knows it is a device one."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls, "cpu")
        setattr(generator, _HOME, _device_home(device))
        return generator

    def __init__(self, device="cpu"):
        pass

    @property
    def device(self):
        return _CUDA0 if getattr(self, _HOME) == DEVICE else torch.device("cpu")


class _CpuGenerator(torch.Generator):
    """`torch.Generator(device="cuda")` on a CPU: a CPU generator. A generator is not a tensor,
    so the torch-function mode cannot move it; code that makes its generators on
    `compute_device()` (GRPO's per-completion streams) needs this."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu")

    def __init__(self, device="cpu"):
        pass


# Collectives whose tensors must be on the device when the group is NCCL.
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _checked_collective(name, collective, gloo_groups):
    signature = inspect.signature(collective)

    @functools.wraps(collective)
    def run(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        if bound.get("group") not in gloo_groups:
            for argument, value in bound.items():
                for tensor in _tensors((value,), {}):
                    if home_of(tensor) == HOST:
                        _fail(
                            f"a host tensor (`{argument}`) in `torch.distributed.{name}` on a "
                            f"group that is NCCL on a GPU"
                        )
        return collective(*args, **kwargs)

    return run


def _checked_p2p_batch(batch, gloo_groups):
    @functools.wraps(batch)
    def run(p2p_op_list):
        for op in p2p_op_list:
            if op.group not in gloo_groups and home_of(op.tensor) == HOST:
                _fail("a host tensor in `torch.distributed.batch_isend_irecv` (NCCL on a GPU)")
        return batch(p2p_op_list)

    return run


def _recording_new_group(new_group, gloo_groups):
    @functools.wraps(new_group)
    def run(*args, **kwargs):
        group = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if backend is not None and str(backend).lower() == "gloo":
            gloo_groups.add(group)
        return group

    return run


def _host_from_numpy(from_numpy):
    @functools.wraps(from_numpy)
    def run(array):
        tensor = from_numpy(array)
        _mark(tensor, HOST)
        return tensor

    return run


def _marking_load(load):
    @functools.wraps(load)
    def run(*args, **kwargs):
        result = load(*args, **kwargs)
        location = kwargs.get("map_location", args[1] if len(args) > 1 else None)
        if location is None or isinstance(location, (str, torch.device, int)):
            _mark_nested(result, _device_home(location) if location is not None else HOST)
        return result  # a mapping or callable map_location: left unmarked

    return run


def _mark_nested(value, home) -> None:
    if isinstance(value, torch.Tensor):
        _mark(value, home)
    elif isinstance(value, dict):
        for item in value.values():
            _mark_nested(item, home)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _mark_nested(item, home)


def _parameter_new(new):
    # nn.Parameter(t) makes a new tensor object; it lives where `t` lives.
    @functools.wraps(new)
    def run(cls, data=None, requires_grad=True):
        param = new(cls, data, requires_grad)
        if data is not None:
            _mark(param, home_of(data))
        return param

    return run


def _strict_patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every patch strict devices installs."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    gloo_groups: set = set()
    patches = [
        (dist, name, _checked_collective(name, getattr(dist, name), gloo_groups))
        for name in _COLLECTIVES
        if hasattr(dist, name)
    ]
    # `P2POp` accepts only the functions c10d itself names isend / irecv: name ours there too.
    patches += [(distributed_c10d, p[1], p[2]) for p in patches if p[1] in ("isend", "irecv")]
    patches += [
        (dist, "batch_isend_irecv", _checked_p2p_batch(dist.batch_isend_irecv, gloo_groups)),
        (dist, "new_group", _recording_new_group(dist.new_group, gloo_groups)),
        (torch, "Generator", _StrictGenerator),
        (torch, "from_numpy", _host_from_numpy(torch.from_numpy)),
        (torch, "load", _marking_load(torch.load)),
        (torch.nn.Parameter, "__new__", staticmethod(_parameter_new(torch.nn.Parameter.__new__))),
    ]
    return patches


def strict_devices_requested() -> bool:
    """Whether `MEGATRON_KAJA_STRICT_DEVICES` asks for strict devices (off unless "1")."""
    return os.environ.get(STRICT_DEVICES_ENV, "0") == "1"


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


def is_strict() -> bool:
    """Whether the active bridge checks devices (`MEGATRON_KAJA_STRICT_DEVICES=1`)."""
    return bool(_ACTIVE) and isinstance(_ACTIVE["mode"], _StrictDeviceMode)


def activate(strict: bool | None = None) -> bool:
    """Install the bridge if this process has no CUDA; idempotent.

    `strict` turns strict devices on (default: `MEGATRON_KAJA_STRICT_DEVICES`). Returns
    True when the bridge is active after the call.
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
    if strict is None:
        strict = strict_devices_requested()
    mode_class = _StrictDeviceMode if strict else _CudaToCpuMode
    patches = _strict_patches() if strict else [(torch, "Generator", _CpuGenerator)]
    patched = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    mode = mode_class()
    mode.__enter__()
    # The autograd engine runs backward without the caller's torch-function modes, yet
    # megatron's custom Functions (activation recompute, TP collectives) build CUDA tensors
    # in backward: run every Python autograd backward under the mode as well.
    from torch.autograd.function import BackwardCFunction

    backward_apply = BackwardCFunction.apply

    def apply_backward_on_cpu(self, *args):
        with mode_class():
            return backward_apply(self, *args)

    BackwardCFunction.apply = apply_backward_on_cpu
    _ACTIVE.update(
        mode=mode,
        cuda=originals,
        rng=rng_originals,
        backward_apply=backward_apply,
        patched=patched,
    )
    logger.info(
        "megatron-core CPU bridge active (no CUDA in this process)%s",
        "; strict devices" if strict else "",
    )
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
    for owner, name, value in _ACTIVE["patched"]:
        setattr(owner, name, value)
    _ACTIVE.clear()
