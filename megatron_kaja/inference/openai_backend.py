"""`openai` backend: any OpenAI-compatible chat server (`vllm serve`, SGLang, the real API).

Async with a bounded number of requests in flight (an asyncio semaphore), and retries with
exponential backoff + jitter on the failures that are worth retrying: 429, 5xx, timeouts,
dropped connections and malformed replies (a 200 whose body is not a chat completion: an
HTML error page from a proxy, invalid JSON, `choices: []`). Other 4xx (a bad request) fail
at once. We retry ourselves (the client's own `max_retries` is 0) so that the policy is one
visible piece of code and the attempt count is reported per result.

Two clocks bound a request: `timeout_s` per network read (a stalled connection) and
`request_timeout_s` for the whole request, every attempt and backoff wait included (a
server that drips one byte every few seconds never trips a per-read timeout). A run-wide
`FailureStopRule` aborts with `ServerFailingError` when most recent requests failed, so
that a dead server stops a run in one deadline instead of one deadline per sample.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from megatron_kaja.inference.health import FailureStopRule, MalformedReplyError, reply_excerpt
from megatron_kaja.inference.registry import register_backend
from megatron_kaja.inference.types import GenerationRequest, GenerationResult

POOL_CONNECTIONS = 32  # connections per HTTP client; see `_ClientPool`
logger = logging.getLogger(__name__)


@dataclass
class OpenAIBackendConfig:
    """Settings of the `openai` backend.

    `choice_param` picks how `GenerationRequest.choices` is sent to vLLM: new releases take
    `structured_outputs: {choice: [...]}`, older ones `guided_choice: [...]`.
    `timeout_s` bounds each network read, `request_timeout_s` a whole request (all its
    attempts and waits; counted from when it is first sent, not while it queues for a
    slot). The stop rule aborts the run when more than `stop_failed_fraction` of the last
    `stop_window` finished requests failed (judged once `stop_min_requests` are in).
    """

    base_url: str
    model: str
    api_key: str = "EMPTY"  # vllm serve accepts any key unless started with --api-key
    max_concurrency: int = 32
    timeout_s: float = 120.0
    # A 13b judge on vLLM writes a 1024-token free-text verdict in well under a minute even
    # with dozens of requests queued; 300 s leaves room for a few retries of that.
    request_timeout_s: float = 300.0
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    choice_param: Literal["structured_outputs", "guided_choice"] = "structured_outputs"
    progress: bool = False
    stop_window: int = 32
    stop_min_requests: int = 4
    stop_failed_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("openai backend: base_url is required (e.g. http://host:8000/v1)")
        if not self.model:
            raise ValueError("openai backend: model is required (the served model name)")
        if self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("openai backend: max_concurrency and max_attempts must be >= 1")
        if self.timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("openai backend: timeout_s and request_timeout_s must be > 0")
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
        self.url = f"{self.config.base_url.rstrip('/')}/chat/completions"
        # One rule per backend: it spans every `generate` call and session of a run.
        self.stop_rule = FailureStopRule(
            self.url,
            window=self.config.stop_window,
            min_requests=self.config.stop_min_requests,
            max_failed_fraction=self.config.stop_failed_fraction,
        )

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
    def _to_result(text: str, attempts: int) -> GenerationResult:
        """Read a reply body as a plain dict: building the SDK's pydantic objects for every
        response is a measurable part of the client's CPU per request. Raises
        `MalformedReplyError` when the body is not a chat completion with a choice."""
        try:
            response = json.loads(text)
        except ValueError:
            raise MalformedReplyError(f"not JSON: {reply_excerpt(text)}") from None
        try:
            choice = response["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("message.content is not a string")
            top = None
            positions = (choice.get("logprobs") or {}).get("content")
            if positions is not None:
                top = []
                for position in positions:
                    entries: dict[str, float] = {}
                    for cand in position.get("top_logprobs") or []:
                        # The same text can appear twice (different ids); keep the likelier one.
                        token, logprob = cand["token"], float(cand["logprob"])
                        entries[token] = max(logprob, entries.get(token, -1e30))
                    top.append(entries)
            usage = response.get("usage") or {}
            return GenerationResult(
                text=content or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                top_logprobs=top,
                attempts=attempts,
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise MalformedReplyError(
                f"not a chat completion ({what}): {reply_excerpt(text)}"
            ) from None

    async def _one(self, pool: _ClientPool, req: GenerationRequest) -> GenerationResult:
        result = await self._attempts(pool, req)
        self.stop_rule.record(result.error)
        return result

    async def _attempts(self, pool: _ClientPool, req: GenerationRequest) -> GenerationResult:
        """One request with its retries, all within `request_timeout_s` of being sent."""
        import openai

        cfg = self.config
        deadline = None
        last_error = ""
        for attempt in range(1, cfg.max_attempts + 1):
            delay = None
            async with pool.slot() as client:
                now = time.monotonic()
                deadline = deadline or now + cfg.request_timeout_s
                try:
                    text = await asyncio.wait_for(
                        client.post("/chat/completions", body=self._request_body(req), cast_to=str),
                        timeout=deadline - now,
                    )
                    return self._to_result(text, attempt)
                except asyncio.TimeoutError:  # the deadline, not a read timeout (an OpenAIError)
                    return self._failed(
                        f"RequestTimeout: no complete reply within --request-timeout "
                        f"{cfg.request_timeout_s:g} s",
                        attempt,
                    )
                except MalformedReplyError as exc:
                    last_error = f"MalformedReply: {exc}"
                    logger.warning(
                        "%s: attempt %d/%d: malformed reply: %s",
                        self.url, attempt, cfg.max_attempts, exc,
                    )  # fmt: skip
                except openai.OpenAIError as exc:  # anything else is a bug: raise it
                    last_error = f"{type(exc).__name__}: {exc}"
                    if not _is_retryable(exc):
                        return self._failed(last_error, attempt)
                    delay = _retry_after_s(exc)
            if attempt < cfg.max_attempts:
                # Exponential backoff with jitter so that many clients do not retry in lockstep.
                backoff = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1))
                backoff *= random.uniform(0.5, 1.0)
                wait = min(cfg.backoff_max_s, delay) if delay else backoff
                if time.monotonic() + wait >= deadline:
                    return self._failed(f"{last_error} (no time left to retry)", attempt)
                await asyncio.sleep(wait)
        return self._failed(last_error, cfg.max_attempts)

    def _failed(self, error: str, attempts: int) -> GenerationResult:
        return GenerationResult(text=None, error=f"{error} [{self.url}]", attempts=attempts)

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
                tasks = [asyncio.ensure_future(tracked(complete, r)) for r in requests]
                try:
                    return list(await asyncio.gather(*tasks))
                except BaseException:
                    # The stop rule (or a bug) ends the call: send nothing more.
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
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
        # Inside a running loop (a notebook, an async trainer): run on a private thread, and
        # raise its error (the stop rule's) here.
        out: list = []

        def run() -> None:
            try:
                out.append(asyncio.run(self.agenerate(requests)))
            except BaseException as exc:
                out.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if isinstance(out[0], BaseException):
            raise out[0]
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
