"""`openai` backend: any OpenAI-compatible chat server (`vllm serve`, SGLang, the real API).

Async with a bounded number of requests in flight (an asyncio semaphore), per-request
timeouts, and retries with exponential backoff + jitter on the failures that are worth
retrying: 429, 5xx, timeouts and dropped connections. Other 4xx (a bad request) fail at
once. We retry ourselves (the client's own `max_retries` is 0) so that the policy is one
visible piece of code and the attempt count is reported per result.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from megatron_kaja.inference.registry import register_backend
from megatron_kaja.inference.types import GenerationRequest, GenerationResult

POOL_CONNECTIONS = 32  # connections per HTTP client; see `_ClientPool`


@dataclass
class OpenAIBackendConfig:
    """Settings of the `openai` backend.

    `choice_param` picks how `GenerationRequest.choices` is sent to vLLM: new releases take
    `structured_outputs: {choice: [...]}`, older ones `guided_choice: [...]`.
    """

    base_url: str
    model: str
    api_key: str = "EMPTY"  # vllm serve accepts any key unless started with --api-key
    max_concurrency: int = 32
    timeout_s: float = 120.0
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    choice_param: Literal["structured_outputs", "guided_choice"] = "structured_outputs"
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("openai backend: base_url is required (e.g. http://host:8000/v1)")
        if not self.model:
            raise ValueError("openai backend: model is required (the served model name)")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("openai backend: max_concurrency and max_attempts must be >= 1")
        if self.choice_param not in ("structured_outputs", "guided_choice"):
            raise ValueError(
                f"openai backend: choice_param must be 'structured_outputs' or 'guided_choice', "
                f"got {self.choice_param!r}"
            )


def _is_retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _retry_after_s(exc: Exception) -> float | None:
    """Seconds a 429/503 asks us to wait (`Retry-After`), when the server says so."""
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _ClientPool:
    """`max_concurrency` request slots spread over several clients of at most
    `POOL_CONNECTIONS` connections each, a request taking the least busy one.

    Why several: the HTTP client's connection pool scans all its connections and queued
    requests to place each request, so one pool of 256 connections spends more CPU per
    request than the request itself (bench/synth_client.py); pools of 32 do not.
    """

    def __init__(self, cfg: OpenAIBackendConfig) -> None:
        from openai import AsyncOpenAI

        n = math.ceil(cfg.max_concurrency / POOL_CONNECTIONS)
        self.clients = [
            AsyncOpenAI(
                base_url=cfg.base_url, api_key=cfg.api_key, timeout=cfg.timeout_s, max_retries=0
            )
            for _ in range(n)
        ]
        self.busy = [0] * n
        self.sem = asyncio.Semaphore(cfg.max_concurrency)

    @asynccontextmanager
    async def slot(self):
        async with self.sem:
            i = min(range(len(self.clients)), key=self.busy.__getitem__)
            self.busy[i] += 1
            try:
                yield self.clients[i]
            finally:
                self.busy[i] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.close()


@register_backend("openai")
class OpenAIBackend:
    """Chat completions against an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, config: OpenAIBackendConfig | None = None, **kwargs) -> None:
        self.config = config or OpenAIBackendConfig(**kwargs)

    def _request_body(self, req: GenerationRequest) -> dict:
        """The chat-completion JSON body. It is sent with `client.post` rather than
        `chat.completions.create`: the latter walks every parameter through the SDK's
        TypedDict transform, about 1 ms of CPU per request, which at hundreds of requests
        per second made the client, not the server, the bottleneck (bench/synth_client.py).
        vLLM's own fields (`structured_outputs`, `guided_choice`) go at the top level, as
        the SDK's `extra_body` would put them."""
        body: dict = {
            "model": self.config.model,
            "messages": list(req.messages),
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = list(req.stop)
        if req.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = req.top_logprobs
        if req.choices is not None:
            if self.config.choice_param == "structured_outputs":
                body["structured_outputs"] = {"choice": list(req.choices)}
            else:
                body["guided_choice"] = list(req.choices)
        return body

    @staticmethod
    def _to_result(response: dict, attempts: int) -> GenerationResult:
        """Read the response JSON as a plain dict: building the SDK's pydantic objects for
        every response is a measurable part of the client's CPU per request."""
        choice = response["choices"][0]
        top = None
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None:
            top = []
            for position in content:
                entries: dict[str, float] = {}
                for cand in position.get("top_logprobs") or []:
                    # The same text can appear twice (different ids); keep the likelier one.
                    entries[cand["token"]] = max(cand["logprob"], entries.get(cand["token"], -1e30))
                top.append(entries)
        usage = response.get("usage") or {}
        return GenerationResult(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            top_logprobs=top,
            attempts=attempts,
        )

    async def _one(self, pool: _ClientPool, req: GenerationRequest) -> GenerationResult:
        cfg = self.config
        last_error = ""
        for attempt in range(1, cfg.max_attempts + 1):
            async with pool.slot() as client:
                try:
                    response = await client.post(
                        "/chat/completions", body=self._request_body(req), cast_to=dict
                    )
                    return self._to_result(response, attempt)
                except Exception as exc:  # classified below; anything else is a bug -> raise
                    import openai

                    if not isinstance(exc, openai.OpenAIError):
                        raise
                    last_error = f"{type(exc).__name__}: {exc}"
                    if not _is_retryable(exc):
                        return GenerationResult(text=None, error=last_error, attempts=attempt)
                    delay = _retry_after_s(exc)
            if attempt < cfg.max_attempts:
                # Exponential backoff with jitter so that many clients do not retry in lockstep.
                backoff = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
                backoff *= random.uniform(0.5, 1.0)
                await asyncio.sleep(min(cfg.backoff_max_s, delay) if delay else backoff)
        return GenerationResult(text=None, error=last_error, attempts=cfg.max_attempts)

    @asynccontextmanager
    async def session(
        self,
    ) -> AsyncIterator[Callable[[GenerationRequest], Awaitable[GenerationResult]]]:
        """An open client for callers that schedule requests themselves and use each result
        as soon as it arrives (a two-stage pipeline, output appended as results come in).

        Yields `complete(request) -> GenerationResult` (a coroutine function) with the same
        retry policy as `generate`; at most `max_concurrency` requests are in flight across
        all callers of one session.

            async with backend.session() as complete:
                result = await complete(request)
        """
        pool = _ClientPool(self.config)

        async def complete(req: GenerationRequest) -> GenerationResult:
            return await self._one(pool, req)

        try:
            yield complete
        finally:
            await pool.aclose()

    async def agenerate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Async `generate`: all requests concurrently, at most `max_concurrency` in flight."""
        bar = tqdm(total=len(requests), desc="openai", disable=not self.config.progress)

        async def tracked(complete, req):
            result = await complete(req)
            bar.update(1)
            return result

        try:
            async with self.session() as complete:
                return list(await asyncio.gather(*(tracked(complete, r) for r in requests)))
        finally:
            bar.close()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests`; safe to call from code that already runs an event loop."""
        requests = list(requests)
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests))
        # Inside a running loop (a notebook, an async trainer): run on a private thread.
        out: list = []
        thread = threading.Thread(target=lambda: out.append(asyncio.run(self.agenerate(requests))))
        thread.start()
        thread.join()
        return out[0]

    def check(self) -> None:
        """Fail clearly when the server is unreachable or does not serve `model`."""
        import openai

        cfg = self.config
        client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            timeout=min(cfg.timeout_s, 10.0),
            max_retries=1,
        )
        try:
            served = [m.id for m in client.models.list()]
        except openai.OpenAIError as exc:
            raise ConnectionError(
                f"openai backend: no server reachable at {cfg.base_url} "
                f"({type(exc).__name__}: {exc}); "
                "start one with e.g. `vllm serve MODEL --served-model-name NAME`"
            ) from exc
        finally:
            client.close()
        if cfg.model not in served:
            raise ValueError(
                f"openai backend: the server at {cfg.base_url} does not serve model {cfg.model!r}; "
                f"it serves {served}"
            )

    def close(self) -> None:
        """Nothing held between calls: each `generate` opens and closes its own client."""
