"""Backends registered by name, imported lazily so that `openai`/`vllm`/`torch` load on use."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from megatron_kaja.inference.types import GenerationBackend

# name -> module that registers it on import; kept here so that listing names imports nothing.
_BACKEND_MODULES = {
    "openai": "megatron_kaja.inference.openai_backend",
    "vllm": "megatron_kaja.inference.vllm_backend",
    "hf": "megatron_kaja.inference.hf_backend",
}
_BACKENDS: dict[str, Callable[..., GenerationBackend]] = {}


def register_backend(name: str):
    """Class decorator: make a backend buildable as `build_backend(name, **config)`."""

    def wrap(cls):
        _BACKENDS[name] = cls
        return cls

    return wrap


def backend_names() -> list[str]:
    """Names accepted by `build_backend`."""
    return sorted(set(_BACKEND_MODULES) | set(_BACKENDS))


def build_backend(name: str, **config) -> GenerationBackend:
    """Build backend `name` from keyword settings (its config dataclass fields)."""
    if name not in _BACKENDS and name in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[name])
    if name not in _BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; choose one of {backend_names()}")
    return _BACKENDS[name](**config)
