"""A fake OpenAI Batch API on 127.0.0.1: ``/v1/files`` and ``/v1/batches`` on top of the chat test server.

The batch client is tested over real HTTP with the real openai client (multipart upload,
binary download, the Batch model's validation), because that is where a batch integration
breaks. A batch finishes ``batch_delay_s`` after it is created; until then polls see
``validating`` / ``in_progress``. Each request line is answered by the same ``responder`` as
online calls, so both modes can be fed identical answers. Faults, drawn per line from
``(seed, line number)`` so they are reproducible:

* ``p_error_line``: the line lands in the error file with an error and no response;
* ``p_drop``: the line is missing from both files (as for an expired batch);
* ``p_malformed``: the output file gets a corrupt line instead of the answer;
* a responder's HTTP error reply (429, 500, 400 policy) becomes an error-file line with that
  ``status_code``, as the real API reports failed requests;
* ``batch_statuses``: the terminal status of the n-th batch created (0-based, e.g. ``expired``);
  such a batch returns results for the first half of its lines only;
* ``p_poll_error``: a poll answers 500.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from experiments.benchmarks.fake_chat_api import (
    OpenAICompatServer,
    Reply,
    Responder,
    _Handler,
    _Server,
    echo_responder,
)


@dataclass
class _Batch:
    id: str
    input_file_id: str
    created: float
    metadata: dict[str, Any]
    number: int
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "request_counts": self.counts,
            "metadata": self.metadata,
        }


class _BatchHandler(_Handler):
    server: _Server

    def _not_found(self) -> None:
        self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        owner: FakeBatchAPI = self.server.owner  # type: ignore[assignment]
        parts = self.path.rstrip("/").split("/")
        if self.path.startswith("/v1/files/") and parts[-1] == "content":
            data = owner._file_bytes(parts[-2])
            if data is None:
                self._send_json(404, {"error": {"message": "no such file", "type": "invalid_request_error"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if self.path.startswith("/v1/batches/"):
            status, payload = owner._retrieve(parts[-1])
            self._send_json(status, payload)
            return
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        owner: FakeBatchAPI = self.server.owner  # type: ignore[assignment]
        path = self.path.rstrip("/")
        if path == "/v1/files":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
            msg = BytesParser(policy=HTTP).parsebytes(head + raw)
            fields: dict[str, tuple[str | None, bytes]] = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
            if "file" not in fields or fields.get("purpose", (None, b""))[1] != b"batch":
                self._send_json(
                    400,
                    {"error": {"message": "need file and purpose=batch", "type": "invalid_request_error"}},
                )
                return
            self._send_json(200, owner._store_file(fields["file"][0] or "upload.jsonl", fields["file"][1]))
            return
        if path == "/v1/batches":
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length))
            status, payload = owner._create(body)
            self._send_json(status, payload)
            return
        if path.startswith("/v1/batches/") or path.startswith("/v1/files"):
            self._not_found()
            return
        super().do_POST()


class FakeBatchAPI(OpenAICompatServer):
    """Chat completions (inherited) plus files and batches; counters say what the client did."""

    def __init__(
        self,
        responder: Responder = echo_responder,
        *,
        batch_delay_s: float = 0.2,
        p_error_line: float = 0.0,
        p_drop: float = 0.0,
        p_malformed: float = 0.0,
        p_poll_error: float = 0.0,
        batch_statuses: dict[int, str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(responder)
        self.batch_delay_s = batch_delay_s
        self.p_error_line = p_error_line
        self.p_drop = p_drop
        self.p_malformed = p_malformed
        self.p_poll_error = p_poll_error
        self.batch_statuses = dict(batch_statuses or {})
        self.seed = seed
        self._block = threading.Lock()
        self.files: dict[str, tuple[str, bytes]] = {}
        self.batches: dict[str, _Batch] = {}
        self.uploads = 0
        self.polls = 0
        self.batch_lines = 0  # request lines received through batches (billed calls)
        self.batch_answered = 0  # of which reached the responder (not dropped, error-filed or corrupted)
        self.faults: dict[str, int] = {"error_line": 0, "drop": 0, "malformed": 0, "poll_error": 0}

    def start(self) -> FakeBatchAPI:
        self._httpd = _Server(("127.0.0.1", 0), _BatchHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __enter__(self) -> FakeBatchAPI:
        return self.start()

    # ------------------------------------------------------------------ files
    def _store_file(self, name: str, data: bytes) -> dict[str, Any]:
        with self._block:
            file_id = f"file-{len(self.files) + 1:04d}"
            self.files[file_id] = (name, data)
            if name != "output.jsonl" and name != "errors.jsonl":
                self.uploads += 1
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": "batch",
            "status": "processed",
        }

    def _file_bytes(self, file_id: str) -> bytes | None:
        with self._block:
            entry = self.files.get(file_id)
        return None if entry is None else entry[1]

    # ------------------------------------------------------------------ batches
    def _create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._block:
            if body.get("input_file_id") not in self.files:
                return 400, {"error": {"message": "unknown input_file_id", "type": "invalid_request_error"}}
            number = len(self.batches)
            batch = _Batch(
                f"batch_{number + 1:04d}",
                body["input_file_id"],
                time.time(),
                body.get("metadata") or {},
                number,
            )
            self.batches[batch.id] = batch
        return 200, batch.to_json()

    def _retrieve(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        with self._block:
            self.polls += 1
            poll_no = self.polls
            batch = self.batches.get(batch_id)
        if batch is None:
            return 404, {"error": {"message": f"no batch {batch_id}", "type": "invalid_request_error"}}
        if random.Random(f"{self.seed}:poll:{poll_no}").random() < self.p_poll_error:
            self.faults["poll_error"] += 1
            return 500, {"error": {"message": "poll failed", "type": "server_error"}}
        if batch.status in ("validating", "in_progress"):
            if time.time() - batch.created >= self.batch_delay_s:
                self._run(batch)
            elif time.time() - batch.created >= self.batch_delay_s / 2:
                batch.status = "in_progress"
        return 200, batch.to_json()

    def _run(self, batch: _Batch) -> None:
        """Answer every line of the batch's input file, with the configured faults."""
        lines = self.files[batch.input_file_id][1].decode("utf-8").splitlines()
        final = self.batch_statuses.get(batch.number, "completed")
        # an expired / cancelled / failed batch got through the first half of its lines only
        answered = lines if final == "completed" else lines[: len(lines) // 2]
        out: list[str] = []
        err: list[str] = []
        for text in answered:
            req = json.loads(text)
            with self._block:
                line_no = self.batch_lines
                self.batch_lines += 1
            rng = random.Random(f"{self.seed}:line:{line_no}")
            u = rng.random()
            cid = req["custom_id"]
            if u < self.p_drop:
                self.faults["drop"] += 1
                continue
            if u < self.p_drop + self.p_error_line:
                self.faults["error_line"] += 1
                err.append(
                    json.dumps(
                        {
                            "id": f"req-{line_no}",
                            "custom_id": cid,
                            "response": None,
                            "error": {"code": "server_error", "message": "line failed"},
                        }
                    )
                )
                continue
            if u < self.p_drop + self.p_error_line + self.p_malformed:
                self.faults["malformed"] += 1
                out.append(
                    f'{{"id": "req-{line_no}", "custom_id": "{cid}", "response": {{"status_code": 2'
                )
                continue
            index = self._record(req["body"], {})
            with self._block:
                self.batch_answered += 1
            reply: Reply = self.responder(req["body"], index)
            if reply.status != 200:
                err.append(
                    json.dumps(
                        {
                            "id": f"req-{line_no}",
                            "custom_id": cid,
                            "error": None,
                            "response": {
                                "status_code": reply.status,
                                "request_id": f"r{line_no}",
                                "body": {"error": reply.error},
                            },
                        }
                    )
                )
                continue
            completion = {
                "id": f"chatcmpl-batch-{line_no}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": reply.model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": reply.finish_reason,
                        "logprobs": None,
                        "message": {"role": "assistant", "content": reply.text, "refusal": reply.refusal},
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            out.append(
                json.dumps(
                    {
                        "id": f"req-{line_no}",
                        "custom_id": cid,
                        "error": None,
                        "response": {"status_code": 200, "request_id": f"r{line_no}", "body": completion},
                    }
                )
            )
        with self._block:
            self.batch_lines += len(lines) - len(answered)  # sent, never answered
        batch.status = final
        if out:
            batch.output_file_id = self._store_file("output.jsonl", ("\n".join(out) + "\n").encode())["id"]
        if err:
            batch.error_file_id = self._store_file("errors.jsonl", ("\n".join(err) + "\n").encode())["id"]
        batch.counts = {"total": len(lines), "completed": len(out), "failed": len(lines) - len(out)}

    @property
    def batches_created(self) -> int:
        return len(self.batches)

    @property
    def online_calls(self) -> int:
        """Chat completions received online (``/v1/chat/completions``), not through a batch."""
        return len(self.calls) - self.batch_answered
