"""ChatClient against a real HTTP server on 127.0.0.1 through the real openai client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cag.remote.chat import (
    ChatClient,
    ChatRequest,
    ChatResult,
    cache_key,
    image_to_data_url,
    parse_retry_after,
)
from experiments.benchmarks.fake_chat_api import FaultInjector, OpenAICompatServer, Reply

FAKE_KEY = "sk-test-LEAKCANARY-7f3a9c1e5b"


@pytest.fixture(autouse=True)
def _fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def prompt_of(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content


def int_answer(text: str) -> int:
    value = json.loads(text)["n"]
    if not isinstance(value, int):
        raise ValueError("n is not an int")
    return value


def reqs(n: int, prefix: str = "item") -> list[ChatRequest]:
    return [ChatRequest(f"{prefix}{i}", [{"role": "user", "content": f"{prefix}{i}"}]) for i in range(n)]


def fast_client(server: OpenAICompatServer, **kw: Any) -> ChatClient:
    opts: dict[str, Any] = dict(backoff_base_s=0.005, backoff_max_s=0.02, max_retries=4)
    opts.update(kw)
    return ChatClient("judge-model", base_url=server.base_url, **opts)


def good(body: dict[str, Any], i: int) -> Reply:
    return Reply.answer(json.dumps({"n": len(prompt_of(body))}))


def test_stops_at_first_accepted_answer_with_one_call_per_request() -> None:
    with OpenAICompatServer(good) as server:
        client = fast_client(server)
        results = client.run(reqs(20), int_answer)
        assert [r.status for r in results] == ["ok"] * 20
        assert all(r.attempts == 1 and not r.cached for r in results)
        assert len(server.calls) == 20 == client.calls_made
        assert results[3].value == len("item3")
        assert results[3].model_reported == "fake-judge-1"


def test_invalid_answers_are_retried_and_counted_as_attempts() -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def flaky(body: dict[str, Any], i: int) -> Reply:
        p = prompt_of(body)
        with lock:
            seen[p] = seen.get(p, 0) + 1
            k = seen[p]
        if k == 1:
            return Reply.answer("sorry, no JSON today")
        if k == 2:
            return Reply.answer('{"n": "seven"}')
        return Reply.answer('{"n": 7}')

    with OpenAICompatServer(flaky) as server:
        (res,) = fast_client(server).run(reqs(1), int_answer)
    assert res.status == "ok" and res.value == 7
    assert res.attempts == 3
    assert res.raw == ["sorry, no JSON today", '{"n": "seven"}', '{"n": 7}']


def test_transient_http_errors_are_retried_until_success() -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        return (
            [Reply.http_error(429, "slow down"), Reply.http_error(503, "busy")][i] if i < 2 else good(body, i)
        )

    with OpenAICompatServer(responder) as server:
        (res,) = fast_client(server).run(reqs(1), int_answer)
    assert res.status == "ok" and res.attempts == 3 and res.error is None


def test_permanent_server_error_fails_with_reason_and_no_value() -> None:
    with OpenAICompatServer(lambda b, i: Reply.http_error(500, "kaputt")) as server:
        client = fast_client(server, max_retries=3)
        (res,) = client.run(reqs(1), int_answer)
        assert len(server.calls) == 4  # 1 + max_retries, the openai client's own retries are off
    assert res.status == "failed"
    assert res.value is None
    assert res.attempts == 4
    assert "500" in (res.error or "") and "kaputt" in (res.error or "")


def test_retries_exhausted_by_invalid_answers_fail_without_a_value() -> None:
    with OpenAICompatServer(lambda b, i: Reply.answer("no idea")) as server:
        (res,) = fast_client(server, max_retries=2).run(reqs(1), int_answer)
        assert len(server.calls) == 3
    assert res.status == "failed" and res.value is None
    assert "invalid answer" in (res.error or "")
    assert res.raw == ["no idea"] * 3


def test_non_retryable_client_error_is_not_retried() -> None:
    with OpenAICompatServer(lambda b, i: Reply.http_error(400, "bad image", code="invalid_image")) as server:
        (res,) = fast_client(server).run(reqs(1), int_answer)
        assert len(server.calls) == 1
    assert res.status == "failed" and "400" in (res.error or "")


def test_content_filter_finish_reason_is_refused_without_retry() -> None:
    with OpenAICompatServer(lambda b, i: Reply.answer("", finish_reason="content_filter")) as server:
        (res,) = fast_client(server).run(reqs(1), int_answer)
        assert len(server.calls) == 1
    assert res.status == "refused" and res.value is None
    assert "content_filter" in (res.error or "")


def test_http_400_content_policy_is_refused_without_retry() -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        return Reply.http_error(
            400, "Your request was rejected by our safety system.", code="content_policy_violation"
        )

    with OpenAICompatServer(responder) as server:
        (res,) = fast_client(server).run(reqs(1), int_answer)
        assert len(server.calls) == 1
    assert res.status == "refused"


def test_retry_after_header_is_honoured() -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        return Reply.http_error(429, "wait", retry_after="0.2") if i == 0 else good(body, i)

    with OpenAICompatServer(responder) as server:
        (res,) = fast_client(server, backoff_base_s=0.001).run(reqs(1), int_answer)
        t = server.call_times
    assert res.status == "ok" and res.attempts == 2
    assert t[1] - t[0] >= 0.2


def test_retry_after_is_capped() -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        return Reply.http_error(429, "wait", retry_after="3600") if i == 0 else good(body, i)

    with OpenAICompatServer(responder) as server:
        start = time.monotonic()
        (res,) = fast_client(server, retry_after_max_s=0.1).run(reqs(1), int_answer)
    assert res.status == "ok"
    assert time.monotonic() - start < 5.0


def test_parse_retry_after_accepts_ms_seconds_and_dates() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (parse_retry_after({"retry-after": future}) or 0) <= 31


def test_timeouts_are_retried_then_reported() -> None:
    with OpenAICompatServer(lambda b, i: Reply.answer('{"n": 1}', delay_s=1.0)) as server:
        (res,) = fast_client(server, timeout_s=0.2, max_retries=1).run(reqs(1), int_answer)
    assert res.status == "failed" and res.attempts == 2
    assert "timeout" in (res.error or "")


def test_auth_error_stops_the_whole_run() -> None:
    with OpenAICompatServer(lambda b, i: Reply.http_error(401, "bad key", code="invalid_api_key")) as server:
        results = fast_client(server, max_concurrency=1).run(reqs(10), int_answer)
        assert len(server.calls) == 1
    assert all(r.status == "failed" for r in results)
    assert "not sent" in (results[5].error or "")


def test_temperature_seed_and_max_tokens_are_sent() -> None:
    with OpenAICompatServer(good) as server:
        client = fast_client(server, temperature=0.0, seed=1234)
        client.run([ChatRequest("a", [{"role": "user", "content": "x"}], max_tokens=77)], int_answer)
        body = server.calls[0]
    assert body["temperature"] == 0.0 and body["seed"] == 1234 and body["max_tokens"] == 77
    assert body["model"] == "judge-model"


def test_results_are_in_request_order_and_on_result_fires_once_each() -> None:
    def slow_first(body: dict[str, Any], i: int) -> Reply:
        reply = good(body, i)
        reply.delay_s = 0.3 if prompt_of(body) == "item0" else 0.0
        return reply

    finished: list[str] = []
    with OpenAICompatServer(slow_first) as server:
        results = fast_client(server).run(reqs(6), int_answer, on_result=lambda r: finished.append(r.key))
    assert [r.key for r in results] == [f"item{i}" for i in range(6)]
    assert sorted(finished) == sorted(r.key for r in results)
    assert finished[-1] == "item0"  # reported when it finished, not in request order


def test_concurrency_is_bounded_and_used() -> None:
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def responder(body: dict[str, Any], i: int) -> Reply:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return good(body, i)

    with OpenAICompatServer(responder) as server:
        fast_client(server, max_concurrency=4).run(reqs(24), int_answer)
    assert state["peak"] == 4


def test_cache_rerun_makes_zero_calls_and_revalidates(tmp_path: Path) -> None:
    with OpenAICompatServer(good) as server:
        first = fast_client(server, cache_dir=tmp_path).run(reqs(5), int_answer)
        server.reset_calls()
        client = fast_client(server, cache_dir=tmp_path)
        second = client.run(reqs(5), int_answer)
        assert server.calls == [] and client.calls_made == 0
        assert [r.value for r in second] == [r.value for r in first]
        assert all(r.cached and r.attempts == 0 and r.status == "ok" for r in second)

        def stricter(text: str) -> int:
            raise ValueError(f"rejects {text!r}, which the cache holds")

        third = fast_client(server, cache_dir=tmp_path, max_retries=0).run(reqs(5), stricter)
        assert len(server.calls) == 5  # every cached answer is rejected on load, so all are asked again
    assert all(r.status == "failed" and not r.cached for r in third)


def test_failures_are_not_cached(tmp_path: Path) -> None:
    with OpenAICompatServer(lambda b, i: Reply.http_error(500, "down")) as server:
        fast_client(server, cache_dir=tmp_path, max_retries=0).run(reqs(2), int_answer)
    assert not list(tmp_path.rglob("*.json"))
    with OpenAICompatServer(good) as server:
        results = fast_client(server, cache_dir=tmp_path).run(reqs(2), int_answer)
        assert len(server.calls) == 2
    assert all(r.status == "ok" and not r.cached for r in results)


def test_cache_is_shared_across_endpoints_and_hashes_images(tmp_path: Path) -> None:
    url = image_to_data_url(Image.new("RGB", (8, 8), (200, 10, 10)))
    request = ChatRequest(
        "img",
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    )
    with OpenAICompatServer(good) as a:
        fast_client(a, cache_dir=tmp_path).run([request], int_answer)
    with OpenAICompatServer(good) as b:
        (res,) = fast_client(b, cache_dir=tmp_path).run([request], int_answer)
        assert b.calls == []
    assert res.cached
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1
    assert url.split(",", 1)[1][:40] not in files[0].read_text()
    other = image_to_data_url(Image.new("RGB", (8, 8), (10, 200, 10)))
    msgs_other = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": other}}],
        }
    ]
    assert cache_key("m", request.messages, 1024, 0.0, 0) != cache_key("m", msgs_other, 1024, 0.0, 0)
    assert cache_key("m", request.messages, 1024, 0.0, 0) != cache_key("m", request.messages, 1024, 0.0, 1)
    assert cache_key("m", request.messages, 1024, 0.0, 0) != cache_key("m2", request.messages, 1024, 0.0, 0)


def test_api_key_is_sent_but_never_leaks(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    def leaky(body: dict[str, Any], i: int) -> Reply:
        # A hostile or buggy server that echoes the credential back in its error message.
        return Reply.http_error(500, f"bad things happened for key {FAKE_KEY}") if i == 0 else good(body, i)

    collected: list[ChatResult[int]] = []
    with OpenAICompatServer(leaky) as server:
        client = fast_client(server, cache_dir=tmp_path, max_retries=0)
        results = client.run(reqs(1), int_answer, on_result=collected.append, progress=True)
        results += client.run(reqs(1), int_answer, progress=True)
        assert server.call_headers[0]["authorization"] == f"Bearer {FAKE_KEY}"
    assert results[0].status == "failed" and "***" in (results[0].error or "")
    assert FAKE_KEY not in repr(results) + repr(collected) + repr(client)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert FAKE_KEY not in f.read_text()
    out, err = capfd.readouterr()
    assert FAKE_KEY not in out + err


def test_missing_key_without_base_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(RuntimeError, match="MY_JUDGE_KEY"):
        ChatClient("gpt-4.1", api_key_env="MY_JUDGE_KEY")


def test_missing_key_with_local_base_url_uses_a_placeholder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with OpenAICompatServer(good) as server:
        (res,) = ChatClient("m", base_url=server.base_url).run(reqs(1), int_answer)
        assert server.call_headers[0]["authorization"].startswith("Bearer ")
    assert res.status == "ok"


def test_run_works_inside_a_running_event_loop() -> None:
    async def caller(server: OpenAICompatServer) -> list[ChatResult[int]]:
        return fast_client(server).run(reqs(3), int_answer)

    with OpenAICompatServer(good) as server:
        results = asyncio.run(caller(server))
    assert [r.status for r in results] == ["ok"] * 3


def test_fault_injector_schedule_is_reproducible() -> None:
    inj_a = FaultInjector(good, p429=0.2, p500=0.2, p_malformed=0.2, seed=3)
    inj_b = FaultInjector(good, p429=0.2, p500=0.2, p_malformed=0.2, seed=3)
    body = {"messages": [{"role": "user", "content": "x"}]}
    seq_a = [(r.status, r.text) for r in (inj_a(body, i) for i in range(200))]
    seq_b = [(r.status, r.text) for r in (inj_b(body, i) for i in range(200))]
    assert seq_a == seq_b
    assert inj_a.injected["429"] > 20 and inj_a.injected["500"] > 20 and inj_a.injected["malformed"] > 20


def test_image_to_data_url_round_trips_and_keeps_file_bytes(tmp_path: Path) -> None:
    img = Image.new("RGBA", (5, 4), (1, 2, 3, 128))
    png = image_to_data_url(img)
    assert png.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1])))
    assert decoded.size == (5, 4) and decoded.getpixel((0, 0)) == (1, 2, 3, 128)
    jpg = image_to_data_url(img, fmt="jpeg")
    assert jpg.startswith("data:image/jpeg;base64,")
    path = tmp_path / "x.jpg"
    img.convert("RGB").save(path)
    assert base64.b64decode(image_to_data_url(path).split(",", 1)[1]) == path.read_bytes()
    bmp = tmp_path / "x.bmp"
    img.convert("RGB").save(bmp)
    assert image_to_data_url(str(bmp)).startswith("data:image/png;base64,")


def test_corrupt_cache_entry_is_ignored_and_replaced(tmp_path: Path) -> None:
    with OpenAICompatServer(good) as server:
        fast_client(server, cache_dir=tmp_path).run(reqs(1), int_answer)
        (entry,) = list(tmp_path.rglob("*.json"))
        entry.write_text("{not json")
        server.reset_calls()
        (res,) = fast_client(server, cache_dir=tmp_path).run(reqs(1), int_answer)
        assert len(server.calls) == 1
    assert res.status == "ok" and not res.cached
    assert json.loads(entry.read_text())["raw"] == '{"n": 5}'
