"""A teacher's or judge's backend from the flags every tool takes (`--backend` / `--judge-*`):
the one place that maps them onto the registered backends' settings."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_kaja.inference.registry import build_backend
from megatron_kaja.inference.types import GenerationBackend


def quantization_of(model: str) -> str | None:
    """The `quant_method` of a local checkpoint (e.g. "awq"), for vLLM's `quantization`."""
    path = Path(model) / "config.json"
    if path.is_file():
        quant = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
        return quant.get("quant_method")
    return None


def build_model_backend(
    kind: str,
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    batch_size: int | None = None,
    seed: int | None = None,
    **openai_options,
) -> GenerationBackend:
    """`openai` (a `vllm serve` endpoint), `vllm` (offline engine) or `hf` (in-process).

    `concurrency` bounds the requests in flight to a server; `batch_size` the prompts an
    in-process `hf` model generates at once (default: `concurrency`). `openai_options` are
    the OpenAI client's other settings (`timeout_s`, `max_attempts`, `choice_param`, ...).
    """
    seeded = {"seed": seed} if seed is not None else {}
    if kind == "openai":
        if not base_url:
            raise ValueError("the openai backend needs a base URL (e.g. http://host:8000/v1)")
        return build_backend(
            "openai",
            base_url=base_url,
            model=model,
            api_key=api_key or "EMPTY",  # `vllm serve` without --api-key accepts any key
            max_concurrency=concurrency,
            **openai_options,
        )
    if kind == "vllm":
        return build_backend("vllm", model=model, quantization=quantization_of(model), **seeded)
    if kind == "hf":
        return build_backend("hf", model=model, batch_size=batch_size or concurrency, **seeded)
    return build_backend(kind, model=model, **seeded)  # unknown: the registry names the choices
