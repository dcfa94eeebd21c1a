"""The merge recipe: a mergekit-like YAML schema, validated with pydantic.

```yaml
merge_method: ties
base_model: /models/llm-jp-3-13b-instruct
models:
  - model: /models/safety-sft
    parameters: {weight: 0.6, density: 0.5}
  - model: /models/helpful-sft
    parameters:
      weight: [0.2, 0.8]            # a gradient: interpolated from the first to the last layer
      density:
        - {filter: self_attn, value: 0.7}   # first filter that the tensor name contains wins
        - {value: 0.5}
parameters: {normalize: true}
out_dtype: bfloat16
seed: 0
hf_template: /models/llm-jp-3-13b-instruct  # only for Megatron inputs without megatron_kaja.json
```
Parameter resolution follows mergekit: a model's own setting, then the global one, then
the method's default; layer `i` of `L` sees a gradient at `t = i / (L - 1)`, tensors
outside the layers (embeddings, final norm, lm_head) at `t = 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_kaja.merge.methods import get_merge_method, merge_method_names

Scalar = float | bool
ScalarOrGradient = Scalar | list[Scalar]


class ConditionalParameter(BaseModel):
    """A value for the tensors whose name contains `filter` (all tensors when it is None/`*`)."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ScalarOrGradient | list[ConditionalParameter]

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]


class InputModel(BaseModel):
    """One model to merge and its own parameter settings."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParameterSetting] = Field(default_factory=dict)


class MergeConfig(BaseModel):
    """A whole merge: method, inputs, parameters and output options."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] = Field(default_factory=dict)
    # dtype the arithmetic runs in; inputs are upcast to it tensor by tensor.
    dtype: Literal["float32", "float64"] = "float32"
    # dtype written; None keeps each tensor's input dtype.
    out_dtype: DTypeName | None = None
    # Seeds the DARE drop masks; each tensor and model gets its own stream from it.
    seed: int = 0
    # Which model's tokenizer is copied; the default is the base model, else the first.
    tokenizer_source: str | None = None
    # An HF folder whose config.json describes Megatron inputs that have no
    # megatron_kaja.json (made by Megatron-LM); its tokenizer becomes theirs.
    hf_template: str | None = None

    @model_validator(mode="after")
    def _check_against_method(self) -> MergeConfig:
        if self.merge_method not in merge_method_names():
            raise ValueError(
                f"merge_method: unknown method {self.merge_method!r}; "
                f"choose one of {', '.join(merge_method_names())}"
            )
        method = get_merge_method(self.merge_method)
        if method.needs_base and self.base_model is None:
            raise ValueError(f"base_model: method {method.name!r} needs a base model")
        n_inputs = len(self.input_paths())
        others = n_inputs - (self.base_model is not None)
        if method.exact_inputs is not None and n_inputs != method.exact_inputs:
            raise ValueError(
                f"models: method {method.name!r} merges exactly {method.exact_inputs} models "
                f"(base included), got {n_inputs}"
            )
        if method.needs_base and others < 1:
            raise ValueError(f"models: method {method.name!r} needs a model besides the base")
        known = set(method.shared_params) | set(method.model_params)
        for name in self.parameters:
            if name not in known:
                raise ValueError(
                    f"parameters.{name}: not a parameter of {method.name!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        for i, entry in enumerate(self.models):
            for name in entry.parameters:
                if name not in method.model_params:
                    raise ValueError(
                        f"models[{i}].parameters.{name}: not a per-model parameter of "
                        f"{method.name!r} (per-model: {', '.join(sorted(method.model_params))})"
                    )
        for name, default in method.shared_params.items():
            if default is None and name not in self.parameters:
                raise ValueError(f"parameters.{name}: required by {method.name!r}")
        for name, default in method.model_params.items():
            if default is not None or name in self.parameters:
                continue
            for path in self.input_paths():
                if method.needs_base and path == self.base_model:
                    continue  # the base model takes no per-model parameters
                if name not in self.model_parameters(path):
                    raise ValueError(
                        f"{self._field_of(path)}.parameters.{name}: required by "
                        f"{method.name!r} for {path} (set it there or in the global parameters)"
                    )
        if self.tokenizer_source is not None and self.tokenizer_source not in self.input_paths():
            raise ValueError(f"tokenizer_source: {self.tokenizer_source} is not one of the inputs")
        return self

    def input_paths(self) -> list[str]:
        """All inputs in order, each once; a base model not listed in `models` comes last."""
        paths = list(dict.fromkeys(m.model for m in self.models))
        if self.base_model is not None and self.base_model not in paths:
            paths.append(self.base_model)
        return paths

    def _field_of(self, path: str) -> str:
        for i, entry in enumerate(self.models):
            if entry.model == path:
                return f"models[{i}]"
        return "base_model"

    def model_parameters(self, path: str) -> dict[str, ParameterSetting]:
        """The settings written on the `models` entry for `path` (empty for an unlisted base)."""
        for entry in self.models:
            if entry.model == path:
                return entry.parameters
        return {}


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML recipe; errors name the file and the offending field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with merge_method, models, ...")
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid merge config:\n{exc}") from exc


def merge_config_from_flags(
    method: str,
    models: list[str],
    base: str | None = None,
    weights: list[float] | None = None,
    density: float | None = None,
    t: float | None = None,
    normalize: bool | None = None,
    lambda_: float | None = None,
    seed: int = 0,
    out_dtype: str | None = None,
    hf_template: str | None = None,
) -> MergeConfig:
    """The `MergeConfig` that command-line flags describe (one weight per `--models` entry)."""
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"--weights: got {len(weights)} values for {len(models)} --models")
    entries = []
    for i, path in enumerate(models):
        params: dict = {}
        if weights is not None:
            params["weight"] = weights[i]
        if density is not None:
            params["density"] = density
        entries.append({"model": path, "parameters": params})
    shared = {"t": t, "normalize": normalize, "lambda": lambda_}
    raw = {
        "merge_method": method,
        "base_model": base,
        "models": entries,
        "parameters": {k: v for k, v in shared.items() if v is not None},
        "seed": seed,
        "out_dtype": out_dtype,
        "hf_template": hf_template,
    }
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"invalid merge flags:\n{exc}") from exc
