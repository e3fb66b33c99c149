"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

Mocking the openai client would test our assumptions about it, not the client itself: its
error classes, header handling and connection pool are exactly where retry and
Retry-After bugs hide. So tests talk HTTP to this server, whose answers, errors and
latency are scripted by a ``responder``. It lives with the benchmarks, which need it at run
time (``python experiments/benchmarks/bench_judge.py``, installed like the rest of the package);
the tests import it from here too.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "fake-judge-1"


@dataclass
class Reply:
    """What the server sends for one call: an answer (``status`` 200) or an HTTP error."""

    text: str | None = None
    finish_reason: str = "stop"
    model: str = DEFAULT_MODEL
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    refusal: str | None = None

    @classmethod
    def answer(
        cls, text: str, finish_reason: str = "stop", model: str = DEFAULT_MODEL, delay_s: float = 0.0
    ) -> Reply:
        return cls(text=text, finish_reason=finish_reason, model=model, delay_s=delay_s)

    @classmethod
    def http_error(
        cls,
        status: int,
        message: str = "error",
        code: str | None = None,
        retry_after: float | str | None = None,
        delay_s: float = 0.0,
    ) -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        err = {"message": message, "type": "error", "code": code, "param": None}
        return cls(status=status, error=err, headers=headers, delay_s=delay_s)


Responder = Callable[[dict[str, Any], int], Reply]


def echo_responder(body: dict[str, Any], call_index: int) -> Reply:
    """Default responder: a fixed valid judge-style answer, so a bare server is usable."""
    return Reply.answer('{"score": 5, "reasoning": "default test answer"}')


class FaultInjector:
    """Wraps a responder with the failures a real API produces, reproducibly.

    Randomness is drawn from ``(seed, call_index)`` rather than a shared stream, so the
    fault schedule by arrival order is the same on every run whatever the thread timing.
    """

    GARBAGE = (
        "I'm sorry, I can't determine a score for this image.",
        '{"score": ',
        "Score: very good",
        '```json\n{"reasoning": "missing the score field"}\n```',
        "",
    )

    def __init__(
        self,
        base: Responder,
        p429: float = 0.0,
        p500: float = 0.0,
        p_malformed: float = 0.0,
        latency_s: float | tuple[float, float] = 0.0,
        retry_after_s: float | None = None,
        seed: int = 0,
    ) -> None:
        if p429 + p500 + p_malformed > 1.0:
            raise ValueError("fault probabilities sum to more than 1")
        self.base = base
        self.p429 = p429
        self.p500 = p500
        self.p_malformed = p_malformed
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.seed = seed
        self._lock = threading.Lock()
        self.injected: dict[str, int] = {"429": 0, "500": 0, "malformed": 0, "ok": 0}

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def __call__(self, body: dict[str, Any], call_index: int) -> Reply:
        rng = random.Random(f"{self.seed}:{call_index}")
        if isinstance(self.latency_s, tuple):
            delay = rng.uniform(*self.latency_s)
        else:
            delay = float(self.latency_s)
        u = rng.random()
        if u < self.p429:
            self._count("429")
            reply = Reply.http_error(
                429, "Rate limit reached", code="rate_limit_exceeded", retry_after=self.retry_after_s
            )
        elif u < self.p429 + self.p500:
            self._count("500")
            reply = Reply.http_error(500, "The server had an error while processing your request.")
        elif u < self.p429 + self.p500 + self.p_malformed:
            self._count("malformed")
            base = self.base(body, call_index)
            reply = Reply.answer(rng.choice(self.GARBAGE), model=base.model)
        else:
            self._count("ok")
            reply = self.base(body, call_index)
        reply.delay_s += delay
        return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Python's default backlog of 5 makes the kernel drop SYNs when 16 clients connect at
    # once, which shows up as one-second stalls (SYN retransmit), not as errors.
    request_queue_size = 256
    owner: OpenAICompatServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (~40 ms), which would swamp the latency we simulate.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "test"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(
                404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}}
            )

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(
                404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}}
            )
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        owner = self.server.owner
        index = owner._record(body, {k.lower(): v for k, v in self.headers.items()})
        reply = owner.responder(body, index)
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            self._send_json(reply.status, {"error": reply.error or {"message": "error"}}, reply.headers)
            return
        message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": reply.refusal}
        payload = {
            "id": f"chatcmpl-test-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        self._send_json(200, payload, reply.headers)


class OpenAICompatServer:
    """Context manager running the fake API in a background thread on an ephemeral port."""

    def __init__(self, responder: Responder = echo_responder) -> None:
        self.responder = responder
        self._lock = threading.Lock()
        self._calls: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._times: list[float] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def _record(self, body: dict[str, Any], headers: dict[str, str]) -> int:
        with self._lock:
            self._calls.append(body)
            self._headers.append(headers)
            self._times.append(time.monotonic())
            return len(self._calls) - 1

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Request bodies received so far, in arrival order (a snapshot copy)."""
        with self._lock:
            return list(self._calls)

    @property
    def call_headers(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self._headers)

    @property
    def call_times(self) -> list[float]:
        """``time.monotonic()`` at the arrival of each call, to observe client-side waits."""
        with self._lock:
            return list(self._times)

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()
            self._headers.clear()
            self._times.clear()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAICompatServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAICompatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
