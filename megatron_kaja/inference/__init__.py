"""Text-generation backends behind one interface: `openai` (any OpenAI-compatible server,
e.g. `vllm serve`), `vllm` (offline engine) and `hf` (in-process transformers, the CPU
default). Used by the judge, the evaluation and the synthetic-data generator.

    backend = build_backend("openai", base_url="http://host:8000/v1", model="judge")
    [result] = backend.generate([GenerationRequest(messages=[{"role": "user", "content": "..."}])])
"""

from megatron_kaja.inference.registry import backend_names, build_backend, register_backend
from megatron_kaja.inference.types import (
    ChatMessage,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
)

__all__ = [
    "ChatMessage",
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResult",
    "backend_names",
    "build_backend",
    "register_backend",
]
