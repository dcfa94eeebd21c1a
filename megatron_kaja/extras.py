"""Lazy imports of optional packages, with an error that names the extra to install."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

# module name -> (pip extra that brings it, what it is needed for)
OPTIONAL_MODULES = {
    "transformer_engine": ("gpu", "the transformer-engine layer spec"),
    "vllm": ("gpu", "vLLM generation backends"),
    "awq": ("gpu", "AWQ-quantized judges (autoawq)"),
    "bitsandbytes": ("bnb", "8-bit optimizers"),  # in the gpu extra too; also runs on CPU
    "apex": (None, "apex fused kernels"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed."""


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import `module` or raise `MissingExtraError` saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, default_feature = OPTIONAL_MODULES.get(module.split(".")[0], (None, module))
        what = feature or default_feature
        if extra is None:
            how = "NVIDIA apex is built from source on GPU machines; see docs/cluster.md"
        else:
            how = f"install it with `pip install 'megatron-kaja[{extra}]'`"
        raise MissingExtraError(
            f"{what} needs the package '{module}', which is missing: {how}"
        ) from exc


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it twice on success)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


# Warnings that megatron-core 0.16.1 and torch 2.13 print on every import, model build or
# checkpoint load although the run is correct: the absence of apex / transformer-engine
# (torch norms and optimizers are used instead; `absent_packages_note` says so once),
# megatron-core's own deprecated default (cuda_graph_scope "full") and import shim, a
# CUDA-only tuning hint, deprecations inside megatron-core's torch_dist loader, its
# TransformerLayer (it never passes a dense MLP's ffn_hidden_size, then reads the config's) and
# its parallel linears (a layer built before the process group keeps the default TP group),
# torch's own jit, and torch's distributed checkpoint announcing the single-process save/load
# the converter asks for with `no_dist=True`. (message regex, category); tests/conftest.py
# gives pytest the same list.
KNOWN_HARMLESS_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning),
    (r"full scope is deprecated\. Use empty cuda_graph_scope", UserWarning),
    (r"When using async grad allreduce it is recommended to set the environment", UserWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
    (r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning),
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    (r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'", DeprecationWarning),
    (r"MLP requires ffn_hidden_size, but it was not provided", DeprecationWarning),
    (r"Warning. tp_group is None, using default tp group", DeprecationWarning),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming", UserWarning),
)


def silence_known_warnings() -> None:
    """Ignore `KNOWN_HARMLESS_WARNINGS` in this process (any other warning still shows)."""
    import warnings

    for message, category in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@functools.cache
def absent_packages_note() -> str | None:
    """One line naming the absent optional GPU packages and what their absence means, or
    None when all are installed. Cached: `log_absent_packages` says it once per process."""
    absent = [m for m in ("apex", "transformer_engine") if not is_available(m)]
    if not absent:
        return None
    return (
        f"optional packages absent: {', '.join(absent)} - megatron-core uses torch norms and "
        "optimizers instead (correct everywhere, slower on GPUs; on a GPU cluster install "
        "the gpu extra and NVIDIA apex)"
    )


@functools.cache
def log_absent_packages(logger_name: str = "megatron_kaja") -> None:
    """Log `absent_packages_note` once per process (the warnings it replaces are silenced)."""
    note = absent_packages_note()
    if note:
        logging.getLogger(logger_name).info(note)
