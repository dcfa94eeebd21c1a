"""Merge methods, one small file each, registered by name.

A method is a function `(MergeInputs) -> Tensor` plus the parameters it takes: `shared`
ones (one value per tensor, e.g. SLERP's `t`) and `per_model` ones (one value per input
model, e.g. `weight`, `density`). A default of None marks a parameter as required.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method sees for one tensor, already in the compute dtype.

    `tensors` are the inputs other than the base (all inputs for methods without a base
    role), `per_model[i]` the resolved per-model parameters of `tensors[i]`, and
    `generator(i)` a seeded `torch.Generator` private to this tensor and model `i`.
    The tensors are fresh copies owned by the method: it may (and, to keep peak memory
    low, should) compute in place in them.
    """

    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    shared: dict[str, float | bool]
    per_model: list[dict[str, float | bool]]
    generator: Callable[[int], torch.Generator]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and the parameters it accepts (name -> default)."""

    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    needs_base: bool
    exact_inputs: int | None = None
    shared_params: dict[str, float | bool | None] = field(default_factory=dict)
    model_params: dict[str, float | bool | None] = field(default_factory=dict)


_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    needs_base: bool,
    exact_inputs: int | None = None,
    shared: dict[str, float | bool | None] | None = None,
    per_model: dict[str, float | bool | None] | None = None,
) -> Callable:
    """Decorator: register `fn` under `name` with its parameters and their defaults."""

    def wrap(fn: Callable[[MergeInputs], torch.Tensor]) -> Callable:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _METHODS[name] = MergeMethod(
            name, fn, needs_base, exact_inputs, dict(shared or {}), dict(per_model or {})
        )
        return fn

    return wrap


def get_merge_method(name: str) -> MergeMethod:
    """The method registered as `name`."""
    if name not in _METHODS:
        raise KeyError(f"unknown merge method {name!r}; choose one of {merge_method_names()}")
    return _METHODS[name]


def merge_method_names() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


# Importing the modules registers the methods.
from megatron_kaja.merge.methods import (  # noqa: E402
    dare_linear,
    dare_ties,
    linear,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = [
    "MergeInputs",
    "MergeMethod",
    "dare_linear",
    "dare_ties",
    "get_merge_method",
    "linear",
    "merge_method_names",
    "register_merge_method",
    "slerp",
    "task_arithmetic",
    "ties",
]
