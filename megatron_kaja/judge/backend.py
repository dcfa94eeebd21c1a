"""The judge's generation backend, built the same way for evaluation and GRPO rewards."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_kaja.inference import build_backend


def quantization_of(model: str) -> str | None:
    """The `quant_method` of a local checkpoint (e.g. "awq"), for vLLM's `quantization`."""
    path = Path(model) / "config.json"
    if path.is_file():
        quant = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
        return quant.get("quant_method")
    return None


def build_judge_backend(
    kind: str,
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    choice_param: str = "structured_outputs",
    batch_size: int = 8,
    request_timeout_s: float = 300.0,
):
    """`openai` (a `vllm serve` endpoint), `vllm` (offline engine) or `hf` (in-process).
    `request_timeout_s` bounds each `openai` request, retries included."""
    if kind == "openai":
        if not base_url:
            raise ValueError(
                "--judge-backend openai needs --judge-base-url (e.g. http://host:8000/v1)"
            )
        return build_backend(
            "openai",
            base_url=base_url,
            model=model,
            api_key=api_key or "EMPTY",  # `vllm serve` without --api-key accepts any key
            max_concurrency=concurrency,
            choice_param=choice_param,
            request_timeout_s=request_timeout_s,
        )
    if kind == "vllm":
        return build_backend("vllm", model=model, quantization=quantization_of(model))
    if kind == "hf":
        return build_backend("hf", model=model, batch_size=batch_size)
    raise ValueError(f"judge backend {kind!r}: use openai, vllm or hf")
