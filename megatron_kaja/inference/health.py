"""What a client does with a server that misbehaves: malformed replies and the stop rule.

A reply that is not a chat completion (an HTML page from a proxy, a truncated JSON body,
`choices: []`) is a `MalformedReplyError`: a failed attempt, retried like a 5xx. A run
whose recent requests mostly failed for good is stopped by `FailureStopRule` with a
`ServerFailingError`: retrying each remaining sample against a dead server costs a full
request deadline per sample and ends in a report of nothing.
"""

from __future__ import annotations

import threading
from collections import deque

EXCERPT_CHARS = 120  # of a bad reply, in the log and the error: enough to tell HTML from JSON


class MalformedReplyError(ValueError):
    """A 200 reply whose body is not a usable chat completion."""


class ServerFailingError(RuntimeError):
    """Most recent requests to a server failed after all their retries: stop the run."""


def reply_excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The start of a reply body on one line, quoted, for a log line or an error."""
    flat = " ".join(text.split())
    return repr(flat[:limit] + ("..." if len(flat) > limit else ""))


class FailureStopRule:
    """Counts finished requests (after their retries) and raises `ServerFailingError` when
    more than `max_failed_fraction` of the last `window` failed, once `min_requests` are in.

    Only final outcomes count: transient errors that a retry fixed are not a failing
    server. Safe to call from several threads (a backend may run on a private thread).
    """

    def __init__(
        self, url: str, window: int = 32, min_requests: int = 4, max_failed_fraction: float = 0.5
    ) -> None:
        if window < 1 or not 1 <= min_requests <= window:
            raise ValueError("stop rule: need window >= 1 and 1 <= min_requests <= window")
        if not 0 <= max_failed_fraction < 1:
            raise ValueError("stop rule: max_failed_fraction must be in [0, 1)")
        self.url = url
        self.min_requests = min_requests
        self.max_failed_fraction = max_failed_fraction
        self.recent: deque[bool] = deque(maxlen=window)  # True = failed
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()

    def record(self, error: str | None) -> None:
        """Count one finished request (`error` None when it succeeded); raise when tripped."""
        with self._lock:
            self.requests += 1
            self.failed += error is not None
            self.recent.append(error is not None)
            n, bad = len(self.recent), sum(self.recent)
            if error is None or n < self.min_requests or bad <= self.max_failed_fraction * n:
                return
        raise ServerFailingError(
            f"{bad} of the last {n} requests to {self.url} failed after all retries "
            f"(last: {error}); stopping the run. Check the server, then rerun the same "
            "command: finished work is kept"
        )
