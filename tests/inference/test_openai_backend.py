import threading
import time

import pytest

from megatron_kaja.inference import GenerationRequest, build_backend
from megatron_kaja.inference.testing import ScriptedOpenAIServer, ScriptedReply

MSG = [{"role": "user", "content": "日本の首都は?"}]


def backend(server, **kw):
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return build_backend("openai", base_url=server.base_url, model=server.model, **kw)


def test_good_reply_with_logprobs_and_structured_choice():
    dist = {"4": -0.2, "5": -1.9, "3": -3.0}
    with ScriptedOpenAIServer(replies=[ScriptedReply(text="4", top_logprobs=[dist])]) as server:
        req = GenerationRequest(messages=MSG, max_tokens=2, choices=("3", "4", "5"), top_logprobs=2)
        [res] = backend(server).generate([req])
    assert res.ok and res.text == "4" and res.finish_reason == "stop" and res.attempts == 1
    assert res.top_logprobs == [{"4": -0.2, "5": -1.9}]  # the k=2 most likely
    body = server.requests[0]
    assert body["structured_outputs"] == {"choice": ["3", "4", "5"]}
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and body["max_tokens"] == 2


def test_guided_choice_setting_for_old_vllm():
    with ScriptedOpenAIServer(responder=lambda body: ScriptedReply(text="1")) as server:
        req = GenerationRequest(messages=MSG, choices=("0", "1"))
        backend(server, choice_param="guided_choice").generate([req])
    assert server.requests[0]["guided_choice"] == ["0", "1"]
    assert "structured_outputs" not in server.requests[0]


def test_retries_500_429_and_dropped_connections_then_succeeds():
    replies = [
        ScriptedReply(status=500),
        ScriptedReply(status=429, headers={"Retry-After": "0"}),
        ScriptedReply(drop=True),
        ScriptedReply(text="東京です。"),
    ]
    with ScriptedOpenAIServer(replies=replies) as server:
        [res] = backend(server).generate([GenerationRequest(messages=MSG)])
    assert res.ok and res.text == "東京です。" and res.attempts == 4
    assert len(server.requests) == 4


def test_gives_up_after_max_attempts_and_does_not_retry_bad_requests():
    with ScriptedOpenAIServer(responder=lambda body: ScriptedReply(status=503)) as server:
        [res] = backend(server, max_attempts=3).generate([GenerationRequest(messages=MSG)])
    assert not res.ok and res.text is None and "InternalServerError" in res.error
    assert res.attempts == 3 and len(server.requests) == 3
    with ScriptedOpenAIServer(responder=lambda body: ScriptedReply(status=400)) as server:
        [res] = backend(server).generate([GenerationRequest(messages=MSG)])
    assert not res.ok and res.attempts == 1 and len(server.requests) == 1


def test_timeout_is_retried():
    replies = [ScriptedReply(text="late", delay_s=1.0), ScriptedReply(text="ok")]
    with ScriptedOpenAIServer(replies=replies) as server:
        [res] = backend(server, timeout_s=0.3).generate([GenerationRequest(messages=MSG)])
    assert res.text == "ok" and res.attempts == 2


def test_concurrency_is_bounded():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def slow(body):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return ScriptedReply(text=body["messages"][0]["content"])

    prompts = [f"質問{i}" for i in range(8)]
    with ScriptedOpenAIServer(responder=slow) as server:
        reqs = [GenerationRequest(messages=[{"role": "user", "content": p}]) for p in prompts]
        results = backend(server, max_concurrency=2).generate(reqs)
    assert [r.text for r in results] == prompts  # in request order
    assert state["peak"] == 2


def test_check_names_unreachable_server_and_missing_model():
    with ScriptedOpenAIServer() as server:
        url = server.base_url
        backend(server).check()
        with pytest.raises(ValueError, match="does not serve model 'other'"):
            build_backend("openai", base_url=url, model="other").check()
    with pytest.raises(ConnectionError, match="no server reachable"):
        build_backend("openai", base_url=url, model="x", timeout_s=1).check()


def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="choice_param"):
        build_backend("openai", base_url="http://x/v1", model="m", choice_param="regex")
    with pytest.raises(ValueError, match="unknown generation backend"):
        build_backend("tgi")


def test_session_results_arrive_as_completed_and_the_bound_spans_all_clients():
    """`session()` hands each result over when it is in (a slow request holds up nothing
    else), and the in-flight bound holds across the several HTTP clients it spreads over."""
    import asyncio

    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def responder(body):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(1.5 if body["messages"][0]["content"] == "slow" else 0.2)
        with lock:
            state["now"] -= 1
        return ScriptedReply(text=body["messages"][0]["content"])

    async def run(server):
        order = []
        async with backend(server, max_concurrency=40).session() as complete:

            async def one(text):
                result = await complete(
                    GenerationRequest(messages=[{"role": "user", "content": text}])
                )
                order.append(result.text)

            await asyncio.gather(one("slow"), *(one(f"fast{i}") for i in range(79)))
        return order

    with ScriptedOpenAIServer(responder=responder) as server:
        order = asyncio.run(run(server))
    assert order[-1] == "slow"  # sent first, in last: the 79 others did not wait for it
    assert sorted(order) == sorted(["slow", *(f"fast{i}" for i in range(79))])
    assert state["peak"] == 40  # 40 in flight over two clients of 20, never more
