"""The judge's generation backend, built the same way for evaluation and GRPO rewards."""

from __future__ import annotations

from megatron_kaja.inference.models import build_model_backend, quantization_of

__all__ = ["build_judge_backend", "quantization_of"]


def build_judge_backend(
    kind: str,
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int = 32,
    choice_param: str = "structured_outputs",
    batch_size: int = 8,
):
    """`openai` (a `vllm serve` endpoint), `vllm` (offline engine) or `hf` (in-process)."""
    if kind == "openai" and not base_url:
        raise ValueError("--judge-backend openai needs --judge-base-url (e.g. http://host:8000/v1)")
    if kind not in ("openai", "vllm", "hf"):
        raise ValueError(f"judge backend {kind!r}: use openai, vllm or hf")
    options = {"choice_param": choice_param} if kind == "openai" else {}
    return build_model_backend(
        kind,
        model,
        base_url=base_url,
        api_key=api_key,
        concurrency=concurrency,
        batch_size=batch_size,
        **options,
    )
