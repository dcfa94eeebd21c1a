"""`vllm` backend: vLLM's offline engine (`vllm.LLM`) in this process, on the GPU.

Needs the `gpu` extra; vLLM is imported only when the backend is built. Choice requests
use structured outputs (`StructuredOutputsParams(choice=...)`, vLLM >= 0.10.2) and fall
back to `GuidedDecodingParams(choice=...)` on older releases that lack it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_kaja.extras import require
from megatron_kaja.inference.registry import register_backend
from megatron_kaja.inference.types import GenerationRequest, GenerationResult


@dataclass
class VLLMBackendConfig:
    """Settings passed to `vllm.LLM` (e.g. `quantization="awq"` for Llama-3-ELYZA-JP-8B-AWQ)."""

    model: str
    tokenizer: str | None = None
    quantization: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    seed: int = 0
    progress: bool = True


@register_backend("vllm")
class VLLMBackend:
    """Batched offline generation with `vllm.LLM.chat`."""

    name = "vllm"

    def __init__(self, config: VLLMBackendConfig | None = None, **kwargs) -> None:
        self.config = config or VLLMBackendConfig(**kwargs)
        self._vllm = require("vllm", "the offline vLLM generation backend")
        self.llm = None

    def check(self) -> None:
        """Build the engine (loads weights onto the GPU): fails here when it cannot."""
        if self.llm is None:
            cfg = self.config
            self.llm = self._vllm.LLM(
                model=cfg.model,
                tokenizer=cfg.tokenizer,
                quantization=cfg.quantization,
                dtype=cfg.dtype,
                tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
                seed=cfg.seed,
            )

    def _sampling_params(self, req: GenerationRequest):
        from vllm import SamplingParams

        kwargs = {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "stop": list(req.stop) or None,
            "logprobs": req.top_logprobs,
        }
        if req.choices is not None:
            try:
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(choice=list(req.choices))
            except ImportError:  # vLLM < 0.10.2
                from vllm.sampling_params import GuidedDecodingParams

                kwargs["guided_decoding"] = GuidedDecodingParams(choice=list(req.choices))
        return SamplingParams(**kwargs)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run all `requests` in one engine call (vLLM schedules and batches them)."""
        requests = list(requests)
        if not requests:
            return []
        self.check()
        outputs = self.llm.chat(
            [list(r.messages) for r in requests],
            [self._sampling_params(r) for r in requests],
            use_tqdm=self.config.progress,
        )
        results = []
        for req, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0]
            top = None
            if req.top_logprobs and completion.logprobs is not None:
                # One dict per generated position: token id -> Logprob(logprob, decoded_token).
                top = [
                    {lp.decoded_token: lp.logprob for lp in position.values()}
                    for position in completion.logprobs
                ]
            results.append(
                GenerationResult(
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(completion.token_ids),
                    top_logprobs=top,
                )
            )
        return results

    def close(self) -> None:
        self.llm = None
