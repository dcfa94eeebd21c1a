"""A server that misbehaves: 200 replies that are not chat completions, hangs and drips,
and a run whose requests keep failing. Scripted servers on loopback, each test bounded."""

import logging
import time

import pytest

from megatron_kaja.inference import GenerationRequest, build_backend
from megatron_kaja.inference.health import FailureStopRule, ServerFailingError
from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

MSG = [{"role": "user", "content": "日本の首都は?"}]
HTML = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
MALFORMED = {
    "invalid_json": ScriptedReply(raw_body='{"choices": [{"message": '),
    "empty_choices": ScriptedReply(raw_body='{"id": "x", "choices": []}'),
    "html_page": ScriptedReply(raw_body=HTML, content_type="text/html"),
    "choices_not_a_list": ScriptedReply(raw_body='{"choices": "oops"}'),
    "content_not_text": ScriptedReply(raw_body='{"choices": [{"message": {"content": 5}}]}'),
}


def backend(server, **kw):
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return build_backend("openai", base_url=server.base_url, model=server.model, **kw)


def request():
    return GenerationRequest(messages=MSG)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_200_reply_is_a_failed_attempt_retried_and_logged(name, caplog):
    with ScriptedOpenAIServer(replies=[MALFORMED[name], ScriptedReply(text="東京")]) as server:
        url = server.base_url
        with caplog.at_level(logging.WARNING, logger="megatron_kaja.inference"):
            [res] = backend(server).generate([request()])
    assert res.ok and res.text == "東京" and res.attempts == 2
    [line] = [r.getMessage() for r in caplog.records]
    assert f"{url}/chat/completions: attempt 1/5: malformed reply" in line
    assert MALFORMED[name].raw_body[:20] in line  # an excerpt of what came back


def test_always_malformed_is_a_missing_result_naming_url_and_excerpt():
    with ScriptedOpenAIServer(responder=lambda b: MALFORMED["html_page"]) as server:
        url = server.base_url
        [res] = backend(server, max_attempts=3).generate([request()])
    assert not res.ok and res.text is None and res.attempts == 3 and len(server.requests) == 3
    assert res.error.startswith("MalformedReply: not JSON: '<html><head><title>502 Bad Gateway")
    assert res.error.endswith(f"[{url}/chat/completions]")


def test_a_hanging_server_is_cut_at_the_request_deadline_retries_included():
    # Per-read timeout 2 s and 5 attempts would take over 10 s; the deadline is 1.5 s.
    with ScriptedOpenAIServer(responder=lambda b: ScriptedReply(text="x", delay_s=8)) as server:
        start = time.monotonic()
        [res] = backend(server, timeout_s=2, request_timeout_s=1.5).generate([request()])
        elapsed = time.monotonic() - start
    assert not res.ok and elapsed < 3.5, elapsed
    assert "no time left to retry" in res.error or "RequestTimeout" in res.error


def test_a_drip_feeding_server_is_cut_at_the_request_deadline():
    # One byte every 0.2 s never trips the 5 s per-read timeout; the body would take ~60 s.
    drip = ScriptedReply(text="東京" * 20, drip_s=0.2)
    with ScriptedOpenAIServer(replies=[drip]) as server:
        start = time.monotonic()
        [res] = backend(server, timeout_s=5, request_timeout_s=1.0).generate([request()])
        elapsed = time.monotonic() - start
    assert not res.ok and elapsed < 3.0, elapsed
    assert res.error.startswith("RequestTimeout: no complete reply within --request-timeout 1 s")
    assert res.attempts == 1 and len(server.requests) == 1


def test_the_deadline_counts_from_sending_not_from_queueing_for_a_slot():
    def slow(body):
        time.sleep(0.4)
        return ScriptedReply(text="ok")

    with ScriptedOpenAIServer(responder=slow) as server:
        results = backend(server, max_concurrency=1, request_timeout_s=1.0).generate(
            [request()] * 4
        )  # the last one waits ~1.2 s for its slot, then takes 0.4 s
    assert all(r.ok for r in results)


def test_stop_rule_aborts_a_run_whose_requests_keep_failing():
    with ScriptedOpenAIServer(responder=lambda b: ScriptedReply(status=503)) as server:
        client = backend(server, max_attempts=1, max_concurrency=1)
        with pytest.raises(ServerFailingError, match=r"4 of the last 4 requests to http://127"):
            client.generate([request()] * 50)
    assert len(server.requests) <= 5  # stopped after the 4th of 50 requests


def test_transient_errors_that_retries_fix_never_stop_a_run():
    count = {"n": 0}

    def flaky(body):  # every third attempt fails, as a loaded server's 500s would
        count["n"] += 1
        return ScriptedReply(status=500) if count["n"] % 3 == 0 else ScriptedReply(text="ok")

    with ScriptedOpenAIServer(responder=flaky) as server:
        results = backend(server, max_concurrency=4).generate([request()] * 60)
    assert all(r.ok for r in results) and len(server.requests) > 60


def test_stop_rule_counts_a_window_of_recent_outcomes():
    rule = FailureStopRule("http://h/v1", window=4, min_requests=2, max_failed_fraction=0.5)
    rule.record("err")  # 1 of 1: fewer than min_requests
    rule.record(None)  # 1 of 2: not more than half
    rule.record(None)
    rule.record("err")  # 2 of 4
    rule.record(None)  # window drops the first failure: 1 of 4
    rule.record("err")  # 2 of 4
    with pytest.raises(ServerFailingError, match=r"3 of the last 4 requests to http://h/v1"):
        rule.record("timeout")
    assert (rule.requests, rule.failed) == (7, 4)
    with pytest.raises(ValueError):
        FailureStopRule("u", window=2, min_requests=3)


def test_stop_rule_error_reaches_a_caller_inside_an_event_loop():
    import asyncio

    async def caller(client):  # e.g. a notebook: `generate` runs on a private thread
        return client.generate([request()] * 8)

    with ScriptedOpenAIServer(responder=lambda b: ScriptedReply(status=503)) as server:
        client = backend(server, max_attempts=1, max_concurrency=1)
        with pytest.raises(ServerFailingError):
            asyncio.run(caller(client))
