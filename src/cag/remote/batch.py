"""The judge at half price: the same chat requests sent through the OpenAI Batch API.

The Batch API answers within a completion window (24 h) at half the price of online calls,
which is what a 300-sample, two-criterion evaluation of several methods needs. Everything
that makes the online client trustworthy is kept, because a cheaper judge that scores
differently is a different measurement:

* the same request bodies (model, messages, max_tokens, temperature, seed) and the same
  cache (:func:`cag.remote.chat.cache_key`; the batch line's ``custom_id`` *is* the cache
  key), so an answer obtained online is reused in batch mode and the other way round;
* the same validation: an answer the caller's ``validate`` rejects is retried, in a
  follow-up batch (``retry_mode="batch"``) or online (``"online"``), within the same budget
  of ``1 + max_retries`` calls per request; a refusal is recorded, never retried;
* the same failure rules: a request that runs out of attempts is a failure with its
  reason, never a score;
* resumable: the batch id, its input file and the ``custom_id`` of every line are written to
  ``state_dir`` as soon as the batch exists, so a rerun after an interruption (Ctrl-C, a
  machine going away, ``max_wait_s`` reached) polls the same batch instead of paying again.

Lines of the output and error files that cannot be read (malformed JSON, no ``custom_id``)
and requests a batch returns nothing for (expired, cancelled, failed) count as a failed
attempt of the requests concerned and are retried like any other transient error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import openai

from cag.remote.chat import (
    _FATAL_STATUS,
    _POLICY_RE,
    _RETRYABLE_STATUS,
    ChatClient,
    ChatRequest,
    ChatResult,
    _Progress,
    _read_choice,
    cache_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDPOINT = "/v1/chat/completions"
STATE_PREFIX = "batch-"
SPOOL_PREFIX = "input-"
# statuses after which a batch will not change any more
TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchPendingError(RuntimeError):
    """Batches are still running when ``max_wait_s`` ran out; rerunning the same command resumes them."""

    def __init__(self, batch_ids: Sequence[str], state_dir: Path) -> None:
        super().__init__(
            f"judge batch(es) {', '.join(batch_ids)} not finished yet; their ids are stored in {state_dir}: "
            "rerun the same command to resume them (nothing is sent again)"
        )
        self.batch_ids = list(batch_ids)
        self.state_dir = state_dir


@dataclass
class _Pending:
    """One distinct request (one ``custom_id``) and everything learnt about it so far."""

    custom_id: str
    callers: list[str]
    spool: Path | None = None
    attempts: int = 0
    raw: list[str] = field(default_factory=list)
    error: str | None = None
    model_reported: str | None = None
    retry: bool = False  # the last attempt failed in a way another attempt can fix
    batch_id: str | None = None


Outcome = tuple[Literal["ok", "refused", "failed", "retry"], Any, str | None]


class BatchChatClient(ChatClient):
    """A :class:`ChatClient` whose calls go through ``/v1/files`` + ``/v1/batches``.

    Use :meth:`run` like the online client, or :meth:`session` to add requests in chunks
    (the judge encodes images a chunk at a time; the request lines go to a spool file on
    disk, not to memory) and submit them as one set of batches when the block ends.
    ``calls_made`` counts request lines sent (each one is a billed call) plus online
    retries; ``api_calls`` counts the HTTP calls to the files and batches endpoints.
    """

    def __init__(
        self,
        model: str,
        *args: Any,
        state_dir: str | Path | None = None,
        poll_interval_s: float = 30.0,
        max_wait_s: float = 26 * 3600.0,
        completion_window: str = "24h",
        retry_mode: str = "batch",
        max_requests_per_batch: int = 50_000,
        max_batch_bytes: int = 190_000_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        if retry_mode not in ("batch", "online"):
            raise ValueError(f"retry_mode={retry_mode!r} must be 'batch' or 'online'")
        if state_dir is None:
            if self.cache_dir is None:
                raise ValueError(
                    "BatchChatClient needs state_dir (or cache_dir) to keep batch ids for resuming"
                )
            state_dir = self.cache_dir / "batches"
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.poll_interval_s = poll_interval_s
        self.max_wait_s = max_wait_s
        self.completion_window = completion_window
        self.retry_mode = retry_mode
        self.max_requests_per_batch = max(1, int(max_requests_per_batch))
        self.max_batch_bytes = max(1, int(max_batch_bytes))
        self.api_calls = 0
        self.batches_created: list[str] = []
        self.batches_resumed: list[str] = []

    def __repr__(self) -> str:
        return f"BatchChatClient(model={self.model!r}, base_url={self.base_url!r}, state_dir={str(self.state_dir)!r})"

    # ------------------------------------------------------------------ public entry points
    def run(
        self,
        requests: Sequence[ChatRequest],
        validate: Callable[[str], T],
        on_result: Callable[[ChatResult[T]], None] | None = None,
        progress: bool = False,
    ) -> list[ChatResult[T]]:
        """Same contract as :meth:`ChatClient.run`: results in request order, each one settled once."""
        by_key: dict[str, ChatResult[T]] = {}

        def keep(res: ChatResult[T]) -> None:
            by_key[res.key] = res
            if on_result is not None:
                on_result(res)

        with self.session(validate, on_result=keep, progress=progress) as s:
            s.add(requests)
        return [by_key[r.key] for r in requests]

    @contextlib.contextmanager
    def session(
        self,
        validate: Callable[[str], T],
        on_result: Callable[[ChatResult[T]], None] | None = None,
        progress: bool = False,
    ) -> Iterator[_Session[T]]:
        """Collect requests with ``.add()``; on leaving the block they are sent, polled and settled.

        Cache hits settle at once; everything else settles before the block is left, or
        :class:`BatchPendingError` is raised (the batches keep running and a rerun picks them up).
        """
        sess: _Session[T] = _Session(self, validate, on_result, progress)
        try:
            yield sess
        except BaseException:
            sess._close_spool(submit=False)  # nothing is sent for a block that failed; its lines stay on disk
            raise
        sess.finish()


class _Session(Generic[T]):
    """The requests of one :meth:`BatchChatClient.session` block and their progress through the batches."""

    def __init__(
        self,
        client: BatchChatClient,
        validate: Callable[[str], T],
        on_result: Callable[[ChatResult[T]], None] | None,
        progress: bool,
    ) -> None:
        self.c = client
        self.validate = validate
        self.on_result = on_result
        self.progress = progress
        self.bar: _Progress | None = None
        self.pending: dict[str, _Pending] = {}
        self.settled: set[str] = set()
        self.seen_callers: set[str] = set()
        self.active: dict[str, dict[str, Any]] = {}  # batch id -> state
        self.adopted = self._open_states()
        self.stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.spool_count = 0
        self.spool_fh: Any = None
        self.spool_path: Path | None = None
        self.spool_ids: list[str] = []
        self.spool_bytes = 0
        self.malformed_lines = 0

    # ------------------------------------------------------------------ collecting
    def _open_states(self) -> dict[str, dict[str, Any]]:
        """Unfinished batches of this model from earlier runs: custom_id -> batch state."""
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self.c.state_dir.glob(f"{STATE_PREFIX}*.json")):
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable batch state %s: %s", path.name, exc)
                continue
            if state.get("done") or state.get("model") != self.c.model:
                continue
            state["_path"] = str(path)
            for cid in state.get("custom_ids", []):
                out[cid] = state
        return out

    def add(self, requests: Sequence[ChatRequest]) -> None:
        """Queue requests: a cached answer settles now, a request already in an unfinished batch of
        an earlier run joins that batch, anything else goes into the next input file."""
        for req in requests:
            if req.key in self.seen_callers:
                raise ValueError(f"duplicate request key {req.key!r}")
            self.seen_callers.add(req.key)
            cid = cache_key(self.c.model, req.messages, req.max_tokens, self.c.temperature, self.c.seed)
            hit = self.c._cache_load(cid, req.key, self.validate)
            if hit is not None:
                self._emit(hit)
                continue
            if cid in self.pending:
                self.pending[cid].callers.append(req.key)
                continue
            p = _Pending(cid, [req.key])
            self.pending[cid] = p
            state = self.adopted.get(cid)
            if state is not None:
                p.batch_id = state["batch_id"]
                p.spool = self.c.state_dir / state["spool"]
                p.attempts = int(state.get("round", 1))  # that batch was one attempt, paid by the earlier run
                if p.batch_id not in self.active:
                    self.active[p.batch_id] = state
                    self.c.batches_resumed.append(p.batch_id)
                    log.info(
                        "resuming batch %s (%d requests) from %s",
                        p.batch_id,
                        len(state["custom_ids"]),
                        state["_path"],
                    )
                continue
            self._spool(p, self._body(req))

    def _body(self, req: ChatRequest) -> dict[str, Any]:
        """Exactly the body the online client sends for ``req``."""
        body: dict[str, Any] = {
            "model": self.c.model,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": self.c.temperature,
        }
        if self.c.seed is not None:
            body["seed"] = self.c.seed
        return body

    def _spool(self, p: _Pending, body: dict[str, Any]) -> None:
        line = (
            json.dumps(
                {"custom_id": p.custom_id, "method": "POST", "url": ENDPOINT, "body": body},
                ensure_ascii=False,
            )
            + "\n"
        )
        size = len(line.encode("utf-8"))
        if self.spool_fh is not None and (
            len(self.spool_ids) >= self.c.max_requests_per_batch
            or self.spool_bytes + size > self.c.max_batch_bytes
        ):
            self._close_spool(submit=True)
        if self.spool_fh is None:
            self.spool_count += 1
            self.spool_path = self.c.state_dir / f"{SPOOL_PREFIX}{self.stamp}-{self.spool_count:03d}.jsonl"
            self.spool_fh = self.spool_path.open("w", encoding="utf-8")
            self.spool_ids, self.spool_bytes = [], 0
        self.spool_fh.write(line)
        self.spool_ids.append(p.custom_id)
        self.spool_bytes += size
        p.spool = self.spool_path

    def _close_spool(self, submit: bool) -> None:
        if self.spool_fh is None:
            return
        self.spool_fh.close()
        path, ids = self.spool_path, list(self.spool_ids)
        self.spool_fh, self.spool_path, self.spool_ids, self.spool_bytes = None, None, [], 0
        if submit and path is not None and ids:
            self._submit(path, ids)

    # ------------------------------------------------------------------ talking to the API
    def _api(self, what: str, fn: Callable[[], Any]) -> Any:
        """One files/batches call with the online client's retry rules (fatal, retryable, other)."""
        attempt = 0
        while True:
            attempt += 1
            self.c.api_calls += 1
            try:
                return fn()
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in _FATAL_STATUS or (status < 500 and status not in _RETRYABLE_STATUS):
                    raise
                if attempt > self.c.max_retries:
                    raise
                delay = self.c._backoff(attempt, None)
            except (openai.APITimeoutError, openai.APIConnectionError):
                if attempt > self.c.max_retries:
                    raise
                delay = self.c._backoff(attempt, None)
            log.warning("%s failed (attempt %d), retrying in %.2f s", what, attempt, delay)
            time.sleep(delay)

    def _submit(self, spool: Path, ids: list[str]) -> None:
        """Upload one input file and create its batch; the state file is written right after creation."""
        client = self.c._openai_client()
        round_no = 1 + max(self.pending[cid].attempts for cid in ids)
        try:
            with spool.open("rb") as fh:
                data = fh.read()
            uploaded = self._api(
                "upload", lambda: client.files.create(file=(spool.name, data), purpose="batch")
            )
            batch = self._api(
                "create batch",
                lambda: client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=ENDPOINT,  # type: ignore[arg-type]
                    completion_window=self.c.completion_window,  # type: ignore[arg-type]
                    metadata={"purpose": "cag-judge", "round": str(round_no)},
                ),
            )
        except openai.APIError as exc:
            msg = self.c._scrub(f"not sent: {type(exc).__name__}: {exc}")
            for cid in ids:
                p = self.pending[cid]
                p.error, p.retry = msg, False
                self._settle(p, "failed", None)
            return
        finally:
            client.close()
        state = {
            "batch_id": batch.id,
            "input_file_id": uploaded.id,
            "spool": spool.name,
            "model": self.c.model,
            "round": round_no,
            "custom_ids": ids,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "done": False,
        }
        path = self.c.state_dir / f"{STATE_PREFIX}{batch.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        state["_path"] = str(path)
        self.active[batch.id] = state
        self.c.batches_created.append(batch.id)
        with self.c._calls_lock:
            self.c._calls += len(ids)
        for cid in ids:
            p = self.pending[cid]
            p.attempts += 1
            p.batch_id = batch.id
        log.info("batch %s: %d requests (round %d)", batch.id, len(ids), round_no)

    def _poll(self, deadline: float) -> None:
        """Wait for every active batch to end, processing each one as soon as it does."""
        client = self.c._openai_client()
        try:
            while self.active:
                for batch_id in list(self.active):
                    try:
                        batch = self._api("poll", lambda b=batch_id: client.batches.retrieve(b))
                    except openai.NotFoundError:
                        log.warning(
                            "batch %s is unknown to the server; its requests are sent again", batch_id
                        )
                        self._finish_batch(client, batch_id, None, "unknown to the server (404)")
                        continue
                    except openai.APIStatusError as exc:
                        if exc.status_code in _FATAL_STATUS:
                            raise
                        continue
                    except openai.APIError:
                        continue  # the server is flaky right now; poll again later
                    if batch.status in TERMINAL:
                        self._finish_batch(client, batch_id, batch, f"batch status {batch.status}")
                if not self.active:
                    break
                if time.monotonic() >= deadline:
                    raise BatchPendingError(sorted(self.active), self.c.state_dir)
                time.sleep(min(self.c.poll_interval_s, max(0.0, deadline - time.monotonic())))
        finally:
            client.close()

    def _download(self, client: openai.OpenAI, file_id: str | None) -> list[str]:
        if not file_id:
            return []
        content = self._api("download", lambda: client.files.content(file_id))
        return content.text.splitlines()

    def _finish_batch(self, client: openai.OpenAI, batch_id: str, batch: Any, why: str) -> None:
        """Read a finished batch's output and error files, settle or mark for retry every request in it."""
        state = self.active[batch_id]
        lines: list[str] = []
        if batch is not None:
            lines = self._download(client, batch.output_file_id) + self._download(client, batch.error_file_id)
        answered: set[str] = set()
        for text in lines:
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                cid = obj["custom_id"]
                if not isinstance(cid, str):
                    raise TypeError("custom_id is not a string")
            except (ValueError, KeyError, TypeError):
                self.malformed_lines += 1
                continue
            outcome = self._read_line(obj)
            answered.add(cid)
            p = self.pending.get(cid)
            if p is None or p.batch_id != batch_id or cid in self.settled:
                # a line of an adopted batch nobody asks for now: keep a valid answer for later
                if outcome[0] == "ok":
                    self._store(cid, outcome[1], outcome[2])
                continue
            self._apply(p, outcome)
        for cid in state.get("custom_ids", []):
            p = self.pending.get(cid)
            if p is not None and p.batch_id == batch_id and cid not in answered and cid not in self.settled:
                p.error, p.retry = f"no result line for this request ({why}, batch {batch_id})", True
        if self.malformed_lines:
            log.warning(
                "batch %s: %d unreadable result lines so far (their requests are retried)",
                batch_id,
                self.malformed_lines,
            )
        state["done"] = True
        state["finished_status"] = getattr(batch, "status", "unknown")
        path = Path(state.pop("_path"))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        del self.active[batch_id]

    def _read_line(self, obj: dict[str, Any]) -> Outcome:
        """One result line -> ("ok", raw text, model) / ("refused", text, reason) / ("failed"|"retry", None, reason).

        Mirrors ``ChatClient._request`` so that the same answer gets the same verdict online and in a batch.
        """
        error = obj.get("error")
        response = obj.get("response")
        if not isinstance(response, dict):
            detail = error.get("message") or error.get("code") if isinstance(error, dict) else None
            return "retry", None, self.c._scrub(f"batch error: {detail or 'no response'}")
        status = response.get("status_code")
        body = response.get("body")
        if status != 200:
            err = (body or {}).get("error") if isinstance(body, dict) else None
            err = err if isinstance(err, dict) else {}
            msg = self.c._scrub(
                f"HTTP {status}: " + " - ".join(str(err[k]) for k in ("code", "message") if err.get(k))
            )
            fields = [str(err.get(k) or "") for k in ("code", "type", "message")]
            if status == 400 and any(_POLICY_RE.search(f) for f in fields):
                return "refused", (None, None), msg
            if (
                not isinstance(status, int)
                or status in _FATAL_STATUS
                or (status < 500 and status not in _RETRYABLE_STATUS)
            ):
                return "failed", None, msg
            return "retry", None, msg
        try:
            from openai.types.chat import ChatCompletion

            resp = ChatCompletion.model_validate(body)
        except Exception as exc:  # the line is there but its body is not a chat completion
            return "retry", None, self.c._scrub(f"bad response: {type(exc).__name__}")
        kind, text, reason = _read_choice(resp)
        model = getattr(resp, "model", None)
        if kind == "refused":
            return "refused", (text, model), reason
        if text is None:
            return "retry", None, reason
        return "ok", self.c._scrub(text), model

    def _apply(self, p: _Pending, outcome: Outcome) -> None:
        kind, payload, info = outcome
        if kind == "ok":
            p.raw.append(payload)
            p.model_reported = info or p.model_reported
            try:
                value = self.validate(payload)
            except ValueError as exc:
                p.error, p.retry = self.c._scrub(f"invalid answer: {exc}"), True
                return
            self._store(p.custom_id, payload, p.model_reported)
            self._settle(p, "ok", value)
        elif kind == "refused":
            text, model = payload
            if text:
                p.raw.append(self.c._scrub(text))
            p.model_reported = model or p.model_reported
            p.error = info
            self._settle(p, "refused", None)
        elif kind == "failed":
            p.error, p.retry = info, False
            self._settle(p, "failed", None)
        else:
            p.error, p.retry = info, True

    def _store(self, cid: str, raw: str, model: str | None) -> None:
        try:
            self.validate(raw)
        except ValueError:
            return
        self.c._cache_store(cid, cid, ChatResult(cid, "ok", None, 1, None, [raw], model))

    # ------------------------------------------------------------------ settling
    def _emit(self, res: ChatResult[T]) -> None:
        if self.bar is not None:
            self.bar.update(res.status)
        if self.on_result is not None:
            self.on_result(res)

    def _settle(self, p: _Pending, status: str, value: Any) -> None:
        if p.custom_id in self.settled:
            return
        self.settled.add(p.custom_id)
        error = None if status == "ok" else p.error
        if status == "failed" and p.retry:
            error = f"gave up after {p.attempts} calls; last error: {p.error}"
        for caller in p.callers:
            self._emit(ChatResult(caller, status, value, p.attempts, error, list(p.raw), p.model_reported))  # type: ignore[arg-type]

    def _retry_online(self, todo: list[_Pending]) -> None:
        """Send what a batch could not settle through the online client, within each request's budget."""
        bodies = self._bodies(todo)
        by_budget: dict[int, list[_Pending]] = {}
        for p in todo:
            by_budget.setdefault(1 + self.c.max_retries - p.attempts, []).append(p)
        for budget, group in sorted(by_budget.items()):
            online = self.c._online_copy(max_retries=budget - 1)
            reqs = [
                ChatRequest(p.custom_id, bodies[p.custom_id]["messages"], bodies[p.custom_id]["max_tokens"])
                for p in group
            ]
            results = online.run(reqs, self.validate)
            with self.c._calls_lock:
                self.c._calls += online.calls_made
            for p, res in zip(group, results, strict=True):
                p.attempts += res.attempts
                p.raw.extend(res.raw)
                p.model_reported = res.model_reported or p.model_reported
                p.error, p.retry = res.error, False
                if res.status == "failed" and res.error and res.error.startswith("gave up"):
                    p.error = res.error.split("last error: ", 1)[-1]
                    p.retry = True
                self._settle(p, res.status, res.value)

    def _bodies(self, todo: Sequence[_Pending]) -> dict[str, dict[str, Any]]:
        """Request bodies read back from the spool files (they are not kept in memory)."""
        want: dict[Path, set[str]] = {}
        for p in todo:
            if p.spool is not None:
                want.setdefault(p.spool, set()).add(p.custom_id)
        out: dict[str, dict[str, Any]] = {}
        for path, ids in want.items():
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    obj = json.loads(line)
                    if obj["custom_id"] in ids:
                        out[obj["custom_id"]] = obj["body"]
        return out

    def finish(self) -> None:
        """Submit, poll, retry within budget, settle everything (or raise BatchPendingError)."""
        self._close_spool(submit=False)
        # spool files written but not yet submitted in this session
        unsent: dict[Path, list[str]] = {}
        for p in self.pending.values():
            if p.batch_id is None and p.custom_id not in self.settled and p.spool is not None:
                unsent.setdefault(p.spool, []).append(p.custom_id)
        for path, ids in sorted(unsent.items()):
            self._submit(path, ids)
        if self.progress:
            self.bar = _Progress(
                sum(len(p.callers) for p in self.pending.values() if p.custom_id not in self.settled)
            )
        deadline = time.monotonic() + self.c.max_wait_s
        while True:
            self._poll(deadline)
            todo = [p for p in self.pending.values() if p.custom_id not in self.settled]
            retry = [p for p in todo if p.retry and p.attempts < 1 + self.c.max_retries]
            for p in todo:
                if p not in retry:
                    self._settle(p, "failed", None)
            if not retry:
                break
            if self.c.retry_mode == "online":
                self._retry_online(retry)
                break
            bodies = self._bodies(retry)
            for p in retry:
                p.batch_id = None
                self._spool(p, bodies[p.custom_id])
            ids = list(self.spool_ids)
            path = self.spool_path
            self._close_spool(submit=False)
            if path is not None:
                self._submit(path, ids)
        if self.bar is not None:
            self.bar.close()
        self._remove_finished_spools()

    def _remove_finished_spools(self) -> None:
        """Delete the input files this session used once no unfinished batch needs them: they hold
        every image inline (hundreds of MB at paper scale); the small state files stay as the record."""
        used = {p.spool for p in self.pending.values() if p.spool is not None}
        still_needed: set[str] = set()
        for path in self.c.state_dir.glob(f"{STATE_PREFIX}*.json"):
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not state.get("done"):
                still_needed.add(str(state.get("spool")))
        for spool in used:
            if spool.name not in still_needed:
                spool.unlink(missing_ok=True)
