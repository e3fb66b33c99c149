"""Client for OpenAI-compatible chat endpoints, shared by the MLLM judge and the grounding tool.

Judging 300 samples on two criteria, or grounding a whole training set, means thousands of
paid calls against a rate-limited API. The peers' scripts lose money and honesty there:
they retry after success, and turn unparsable answers into random or zero scores. This
client stops at the first answer the caller's ``validate`` accepts, retries only what can
succeed on retry, records every failure as a failure, and caches accepted answers on disk
so that an interrupted or repeated run does not pay twice.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import urlparse

import openai

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

T = TypeVar("T")

Status = Literal["ok", "failed", "refused"]

# Sent instead of a key to servers on this machine (vLLM, the test server), which do not
# check it; the openai client refuses to start without some key.
LOCAL_PLACEHOLDER_KEY = "local-no-key"

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_CACHE_FORMAT = 1
# Status codes whose cause is on the server's side or is temporary; anything else in the
# 4xx range will fail the same way again, so retrying it only spends money.
_RETRYABLE_STATUS = {408, 409, 429}
# These mean every further call will fail too (bad key, no access, unknown model/route).
_FATAL_STATUS = {401, 403, 404}
_POLICY_RE = re.compile(r"content[ _-]?(filter|policy|management)|safety[ _-]system|responsibleai", re.I)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to obtain; ``key`` is the caller's id and is echoed in the result."""

    key: str
    messages: list[dict]
    max_tokens: int = 1024


@dataclass
class ChatResult(Generic[T]):
    """Outcome of one request; ``value`` is only ever what ``validate`` returned for a real answer."""

    key: str
    status: Status
    value: T | None
    attempts: int
    error: str | None
    raw: list[str] = field(default_factory=list)
    model_reported: str | None = None
    cached: bool = False


def _is_local(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    return host in _LOCAL_HOSTS


def _hash_images(obj: Any) -> Any:
    """Replace inline images by their digest so cache keys stay small and exact."""
    if isinstance(obj, dict):
        return {k: _hash_images(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_hash_images(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("data:"):
        return "sha256:" + hashlib.sha256(obj.encode("utf-8")).hexdigest()
    return obj


def cache_key(model: str, messages: list[dict], max_tokens: int, temperature: float, seed: int | None) -> str:
    """Digest of everything that determines the answer; the endpoint URL is left out on purpose
    so that the same model reached through a proxy or another region reuses the cache."""
    payload = {
        "model": model,
        "messages": _hash_images(messages),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def parse_retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``retry-after``
    (delta-seconds, fractional accepted, or an HTTP date); None when absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def image_to_data_url(image: Image.Image | str | Path, fmt: str = "PNG") -> str:
    """Inline an image for the chat API; files already in a web format are sent byte-for-byte
    so the judge sees exactly what was generated, without a lossy or slow re-encode."""
    from PIL import Image as PILImage

    if isinstance(image, str) and image.startswith("data:"):
        return image
    if isinstance(image, str | Path):
        path = Path(image)
        mime = {
            ".png": "image/png",
            ".jpg": "image/jpeg",
            ".jpeg": "image/jpeg",
            ".webp": "image/webp",
            ".gif": "image/gif",
        }.get(path.suffix.lower())
        if mime is not None:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f"data:{mime};base64,{data}"
        with PILImage.open(path) as opened:
            opened.load()
            return image_to_data_url(opened.copy(), fmt)
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    img = image
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    elif img.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{data}"


class ChatClient:
    """Bounded-concurrency, retrying, caching chat client.

    ``max_retries`` bounds the extra HTTP calls per request, whatever their cause (HTTP
    error, timeout, or an answer ``validate`` rejects), so the worst-case cost of a run is
    ``len(requests) * (1 + max_retries)`` calls and is known before it starts.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        temperature: float = 0.0,
        seed: int | None = 0,
        cache_dir: str | Path | None = None,
        retry_after_max_s: float = 60.0,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.temperature = temperature
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = os.environ.get(api_key_env) or None
        if key is None:
            if base_url is None or not _is_local(base_url):
                where = "the OpenAI API" if base_url is None else base_url
                raise RuntimeError(
                    f"No API key for {where}: set the environment variable {api_key_env} "
                    f"(or pass api_key_env=<name of the variable that holds it>)."
                )
            key = LOCAL_PLACEHOLDER_KEY
        # Kept out of __dict__-printing paths: repr() is overridden and the key is only
        # handed to the openai client.
        self.__api_key = key
        self._calls = 0
        self._calls_lock = threading.Lock()  # run() may be used from several threads at once
        self._rng = random.Random()

    def __repr__(self) -> str:
        return (
            f"ChatClient(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})"
        )

    def _openai_client(self, asynchronous: bool = False) -> openai.OpenAI | openai.AsyncOpenAI:
        """An openai client with this client's key, endpoint and timeout, retries left to us;
        the batch client uses it for the files and batches endpoints."""
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(api_key=self.__api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s)

    def _online_copy(self, max_retries: int) -> ChatClient:
        """A plain online client with this one's key, endpoint, cache and settings but its own call
        count and retry budget: the batch client sends retries through it (``retry_mode=online``)."""
        clone = ChatClient.__new__(ChatClient)
        clone.__dict__.update(self.__dict__)
        clone.max_retries = max_retries
        clone._calls = 0
        clone._calls_lock = threading.Lock()
        return clone

    @property
    def calls_made(self) -> int:
        """HTTP calls issued by this client since construction (all runs), for cost accounting."""
        return self._calls

    # ------------------------------------------------------------------ public entry points
    def run(
        self,
        requests: Sequence[ChatRequest],
        validate: Callable[[str], T],
        on_result: Callable[[ChatResult[T]], None] | None = None,
        progress: bool = False,
    ) -> list[ChatResult[T]]:
        """Blocking entry point; results come back in request order, ``on_result`` fires in the
        calling thread as each request settles so callers can persist incrementally."""
        coro_factory = lambda: self.arun(requests, validate, on_result=on_result, progress=progress)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        # Called from inside an event loop (a notebook, an async app): asyncio.run would
        # refuse, so run our loop in a worker thread. on_result then fires in that thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(lambda: asyncio.run(coro_factory())).result()

    async def arun(
        self,
        requests: Sequence[ChatRequest],
        validate: Callable[[str], T],
        on_result: Callable[[ChatResult[T]], None] | None = None,
        progress: bool = False,
    ) -> list[ChatResult[T]]:
        """Async twin of :meth:`run` for callers that already own an event loop."""
        results: list[ChatResult[T] | None] = [None] * len(requests)
        keys = [
            cache_key(self.model, r.messages, r.max_tokens, self.temperature, self.seed) for r in requests
        ]
        bar = _Progress(len(requests)) if progress else None

        def settle(i: int, res: ChatResult[T]) -> None:
            results[i] = res
            if bar is not None:
                bar.update(res.status)
            if on_result is not None:
                on_result(res)

        todo: list[int] = []
        for i, req in enumerate(requests):
            hit = self._cache_load(keys[i], req.key, validate)
            if hit is not None:
                settle(i, hit)
            else:
                todo.append(i)

        if todo:
            client = self._openai_client(asynchronous=True)
            sem = asyncio.Semaphore(self.max_concurrency)
            fatal: list[str] = []

            async def one(i: int) -> None:
                res = await self._request(client, sem, requests[i], validate, fatal)
                if res.status == "ok":
                    self._cache_store(keys[i], requests[i].key, res)
                settle(i, res)

            try:
                await asyncio.gather(*(one(i) for i in todo))
            finally:
                await client.close()
        if bar is not None:
            bar.close()
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ internals
    def _scrub(self, text: str) -> str:
        key = self.__api_key
        return text.replace(key, "***") if key and key != LOCAL_PLACEHOLDER_KEY else text

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter. A server's Retry-After is obeyed even above
        ``backoff_max_s`` (calling earlier just earns another 429), but only up to
        ``retry_after_max_s`` so that one misbehaving header cannot stall a run for hours."""
        expo = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempt - 1)))
        delay = expo * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max_s))
        return delay

    async def _request(
        self,
        client: openai.AsyncOpenAI,
        sem: asyncio.Semaphore,
        req: ChatRequest,
        validate: Callable[[str], T],
        fatal: list[str],
    ) -> ChatResult[T]:
        raw: list[str] = []
        attempts = 0
        error: str | None = None
        model_reported: str | None = None
        extra: dict[str, Any] = {}
        if self.seed is not None:
            extra["seed"] = self.seed
        while attempts <= self.max_retries:
            if fatal:
                return ChatResult(
                    req.key, "failed", None, attempts, f"not sent: {fatal[0]}", raw, model_reported
                )
            retry_after: float | None = None
            async with sem:
                if fatal:
                    continue
                attempts += 1
                with self._calls_lock:
                    self._calls += 1
                try:
                    resp = await client.chat.completions.create(
                        model=self.model,
                        messages=req.messages,  # type: ignore[arg-type]
                        max_tokens=req.max_tokens,
                        temperature=self.temperature,
                        **extra,
                    )
                except openai.APIStatusError as exc:
                    status = exc.status_code
                    msg = self._scrub(f"HTTP {status}: {_error_text(exc)}")
                    if status == 400 and _is_policy_error(exc):
                        return ChatResult(req.key, "refused", None, attempts, msg, raw, model_reported)
                    if status in _FATAL_STATUS:
                        fatal.append(msg)
                        return ChatResult(req.key, "failed", None, attempts, msg, raw, model_reported)
                    if status not in _RETRYABLE_STATUS and status < 500:
                        return ChatResult(req.key, "failed", None, attempts, msg, raw, model_reported)
                    error = msg
                    retry_after = parse_retry_after(exc.response.headers)
                except openai.APITimeoutError:
                    error = f"timeout after {self.timeout_s:g} s"
                except openai.APIConnectionError as exc:
                    error = self._scrub(f"connection error: {exc}")
                except openai.APIError as exc:
                    # e.g. a 200 whose body is not a chat completion: the server misbehaved
                    # this time; treat it like a bad answer and try again.
                    error = self._scrub(f"bad response: {exc}")
                else:
                    model_reported = getattr(resp, "model", None) or model_reported
                    outcome = _read_choice(resp)
                    if outcome[0] == "refused":
                        if outcome[1]:
                            raw.append(self._scrub(outcome[1]))
                        return ChatResult(req.key, "refused", None, attempts, outcome[2], raw, model_reported)
                    text = self._scrub(outcome[1]) if outcome[1] is not None else None
                    if text is None:
                        error = outcome[2]
                    else:
                        raw.append(text)
                        try:
                            value = validate(text)
                        except ValueError as exc:
                            error = self._scrub(f"invalid answer: {exc}")
                        else:
                            return ChatResult(req.key, "ok", value, attempts, None, raw, model_reported)
            if attempts <= self.max_retries:
                await asyncio.sleep(self._backoff(attempts, retry_after))
        return ChatResult(
            req.key,
            "failed",
            None,
            attempts,
            f"gave up after {attempts} calls; last error: {error}",
            raw,
            model_reported,
        )

    def _cache_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_load(self, key: str, req_key: str, validate: Callable[[str], T]) -> ChatResult[T] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("format") != _CACHE_FORMAT or not isinstance(entry.get("raw"), str):
                return None
            # Validation runs again so that a stricter validator (or a fixed parser bug)
            # takes effect on cached answers too; a rejected entry is simply re-requested.
            value = validate(entry["raw"])
        except (OSError, ValueError) as exc:
            log.warning("ignoring cache entry %s: %s", path.name, exc)
            return None
        return ChatResult(req_key, "ok", value, 0, None, [entry["raw"]], entry.get("model_reported"), True)

    def _cache_store(self, key: str, req_key: str, res: ChatResult[T]) -> None:
        path = self._cache_path(key)
        if path is None or not res.raw:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "format": _CACHE_FORMAT,
            "model": self.model,
            "request_key": req_key,
            "raw": res.raw[-1],
            "model_reported": res.model_reported,
            "temperature": self.temperature,
            "seed": self.seed,
            "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(entry, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("code", "message") if body.get(k)]
        if parts:
            return " - ".join(parts)
    return exc.message


def _is_policy_error(exc: openai.APIStatusError) -> bool:
    body = exc.body if isinstance(exc.body, dict) else {}
    fields = [exc.code or "", str(body.get("type") or ""), str(body.get("message") or ""), exc.message or ""]
    return any(_POLICY_RE.search(f) for f in fields)


def _read_choice(resp: Any) -> tuple[Literal["ok", "refused", "empty"], str | None, str | None]:
    """(kind, text, reason) of the first choice: a refusal is recognised by the content-filter
    finish reason or the API's explicit ``refusal`` field, not by guessing from the wording."""
    choices = getattr(resp, "choices", None) or []
    if not choices:
        return "empty", None, "response has no choices"
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None) if message is not None else None
    refusal = getattr(message, "refusal", None) if message is not None else None
    if choice.finish_reason == "content_filter":
        return "refused", text, "finish_reason=content_filter"
    if refusal:
        return "refused", str(refusal), "model refusal"
    if not isinstance(text, str) or not text.strip():
        return "empty", None, f"empty answer (finish_reason={choice.finish_reason})"
    return "ok", text, None


class _Progress:
    """Progress on stderr without making tqdm a hard dependency of the client."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.counts: dict[str, int] = {}
        self._bar: Any = None
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="chat", unit="req", file=sys.stderr)
        except ImportError:
            self._last = 0.0

    def update(self, status: str) -> None:
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(self.counts, refresh=False)
        elif time.monotonic() - self._last > 5 or self.done == self.total:
            self._last = time.monotonic()
            print(f"chat: {self.done}/{self.total} {self.counts}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
