"""Requests and results shared by every text-generation backend.

One vocabulary for the teacher (synthetic data), the judge (rewards, evaluation) and
answer generation, so that a caller can swap `vllm serve`, offline vLLM and in-process
transformers without touching its own code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

ChatMessage = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion to make.

    `choices` constrains the output to exactly one of the given strings (vLLM structured
    outputs / guided choice; the `hf` backend scores each choice). `top_logprobs` asks for
    the k most likely tokens at every generated position.
    """

    messages: tuple[ChatMessage, ...] | list[ChatMessage]
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("GenerationRequest.messages is empty")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"GenerationRequest.messages[{i}] needs 'role' and 'content'")
        if self.max_tokens < 1:
            raise ValueError(f"GenerationRequest.max_tokens must be >= 1, got {self.max_tokens}")
        if self.choices is not None and len(self.choices) == 0:
            raise ValueError("GenerationRequest.choices must be None or non-empty")


@dataclass
class GenerationResult:
    """What a backend made of one request.

    `error` is set (and `text` is None) when the request failed for good after the
    backend's retries; callers decide what a failure means (the judge reports `None`).
    `top_logprobs[i]` maps token text -> log-probability at generated position i.
    `choice_logprobs` (backends that can score choices exactly, e.g. `hf`) maps each
    requested choice -> log p(choice | prompt) under the unconstrained model.
    """

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[dict[str, float]] | None = None
    choice_logprobs: dict[str, float] | None = None
    error: str | None = None
    attempts: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@runtime_checkable
class GenerationBackend(Protocol):
    """The interface every backend implements (see `megatron_kaja.inference.registry`)."""

    name: str

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` and return one result per request, in order."""
        ...

    def check(self) -> None:
        """Raise a clear error when the backend cannot serve (unreachable, model missing)."""
        ...

    def close(self) -> None:
        """Release clients, threads or GPU memory."""
        ...
