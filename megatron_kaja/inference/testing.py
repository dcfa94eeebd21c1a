"""A scripted OpenAI-compatible chat server on loopback, for tests of anything that talks
to `vllm serve` (the judge, the synthetic-data generator, GRPO rewards).

Replies are programmed: a FIFO of `ScriptedReply` (consumed first), then a `responder`
callable that sees the request body. Each reply can be a text, an HTTP error status, a
delay, a dropped connection, per-position `top_logprobs`, a raw body (an HTML page,
broken JSON) and a body dripped byte by byte. Every request body is kept
in `server.requests`, responder exceptions in `server.errors`
(answered as 500). Binds 127.0.0.1 only, on a free port; bodies over 1 MiB are refused.

    with ScriptedOpenAIServer(responder=lambda body: ScriptedReply(text="4")) as server:
        backend = build_backend("openai", base_url=server.base_url, model=server.model)
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20


class _LoopbackHTTPServer(ThreadingHTTPServer):
    """A thread per connection. The listen backlog is raised from socketserver's 5: with
    hundreds of clients connecting at once the kernel would drop SYNs, and clients would
    see connection errors (and back off) that a real server never causes."""

    daemon_threads = True
    request_queue_size = 1024


@dataclass
class ScriptedReply:
    """One programmed answer. `status != 200` sends an OpenAI-style error body;
    `drop=True` closes the connection without any response. `raw_body` replaces the
    completion JSON with these exact characters (sent as `content_type`); `drip_s > 0`
    sends the body one byte at a time, `drip_s` apart (a stalled proxy)."""

    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    drop: bool = False
    finish_reason: str = "stop"
    top_logprobs: list[dict[str, float]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] | None = None
    raw_body: str | None = None
    content_type: str = "application/json"
    drip_s: float = 0.0


def _logprobs_block(reply: ScriptedReply, k: int) -> dict:
    content = []
    for dist in reply.top_logprobs or []:
        ranked = sorted(dist.items(), key=lambda kv: kv[1], reverse=True)
        token, logprob = ranked[0]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in ranked[:k]
                ],
            }
        )
    return {"content": content}


def completion_body(body: dict, reply: ScriptedReply) -> dict:
    """The chat-completion JSON for `reply` to request `body` (OpenAI wire format)."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": reply.text},
        "finish_reason": reply.finish_reason,
        "logprobs": None,
    }
    if body.get("logprobs") and reply.top_logprobs is not None:
        choice["logprobs"] = _logprobs_block(reply, int(body.get("top_logprobs") or 1))
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    completion = reply.completion_tokens
    if completion is None:
        completion = len(reply.top_logprobs) if reply.top_logprobs else len(reply.text)
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else prompt_chars
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


class ScriptedOpenAIServer:
    """Serves `/v1/models` and `/v1/chat/completions` from a script, in a thread."""

    def __init__(
        self,
        responder: Callable[[dict], ScriptedReply] | None = None,
        replies: list[ScriptedReply] | None = None,
        model: str = "scripted-judge",
    ) -> None:
        self.model = model
        self.responder = responder
        self.requests: list[dict] = []
        self.errors: list[Exception] = []  # exceptions raised by the responder
        self._queue: deque[ScriptedReply] = deque(replies or [])
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def enqueue(self, *replies: ScriptedReply) -> None:
        """Append replies to be served, in order, before the responder is asked."""
        with self._lock:
            self._queue.extend(replies)

    def _next_reply(self, body: dict) -> ScriptedReply:
        with self._lock:
            self.requests.append(body)
            if self._queue:
                return self._queue.popleft()
        if self.responder is None:
            return ScriptedReply(status=500, text="no scripted reply left")
        try:
            return self.responder(body)
        except Exception as exc:  # a broken script must show up as an error, not a hang
            self.errors.append(exc)
            return ScriptedReply(status=500, text=f"responder failed: {exc!r}")

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive like vLLM's server: a client reuses its connections instead of
            # paying a TCP connect per request. Every reply carries a Content-Length.
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms on Linux) on every kept-alive request.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode()
                self._send(status, data, "application/json", headers)

            def _send(
                self, status: int, data: bytes, content_type: str, headers=None, drip_s=0.0
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not drip_s:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(drip_s)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    entry = {"id": server.model, "object": "model", "owned_by": "scripted"}
                    self._send_json(200, {"object": "list", "data": [entry]})
                else:
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True  # the unread body must not be parsed as a request
                    self._send_json(413, {"error": {"message": "request body too large"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send_json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(self.rfile.read(length) or b"{}")
                reply = server._next_reply(body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.status != 200:
                    error = {"message": reply.text or "scripted error", "type": "server_error"}
                    self._send_json(reply.status, {"error": error}, reply.headers)
                    return
                if reply.raw_body is not None:
                    data = reply.raw_body.encode()
                else:
                    data = json.dumps(completion_body(body, reply), ensure_ascii=False).encode()
                # The client may give up on a slow reply (its deadline): expected, not an error.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._send(200, data, reply.content_type, reply.headers, reply.drip_s)

        return Handler

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("ScriptedOpenAIServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ScriptedOpenAIServer:
        """Bind a free loopback port and serve in a daemon thread."""
        self._httpd = _LoopbackHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
