"""Lazy imports of optional packages, with an error that names the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
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
            how = "NVIDIA apex is built from source on GPU machines; see the README"
        else:
            how = f"install it with `pip install 'megatron-kaja[{extra}]'`"
        raise MissingExtraError(
            f"{what} needs the package '{module}', which is missing: {how}"
        ) from exc


def is_available(module: str) -> bool:
    """True when `module` can be imported (without importing it twice on success)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None
